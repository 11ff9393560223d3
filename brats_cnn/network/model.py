"""The two networks of Pereira et al. 2016 (Tables I and II).

Input ``(N, 4, 33, 33)`` float32 patches (channels T1, T1c, T2, FLAIR), output ``(N, classes)``
logits for the centre voxel. All convolutions are 3x3, stride 1, "same" padding; max-pooling is
3x3 stride 2 (33 -> 16 -> 7); LeakyReLU (alpha 0.333) follows every convolution and hidden FC layer;
dropout precedes every FC layer; weights use Xavier/Glorot uniform initialisation, biases zero.

Parameter counts with 5 outputs: HGG 2,118,213, LGG 1,933,701 (4 outputs: 2,117,956 / 1,933,444).
"""

from __future__ import annotations


import torch
from torch import nn

from brats_cnn.config import ModelConfig
from brats_cnn.errors import ConfigError

# "c<N>" = 3x3 convolution with N filters + LeakyReLU, "p" = 3x3 stride-2 max-pooling.
LAYERS: dict[str, tuple[str, ...]] = {
    "hgg": ("c64", "c64", "c64", "p", "c128", "c128", "c128", "p"),  # Table I
    "lgg": ("c64", "c64", "p", "c128", "c128", "p"),  # Table II
}
FC_WIDTH = 256
PATCH_SIZE = 33  # the paper's patch side; the network takes its size from config.sampling.patch_size
IN_CHANNELS = 4
FLOPS_PER_HGG_PATCH = 357.5e6  # multiply-adds x 2, forward, one 33x33 patch (SPEC.md)


def feature_size(architecture: str, patch_size: int = PATCH_SIZE) -> int:
    """Spatial size of the last feature map (7 for a 33x33 patch); < 1 when the patch is too small."""
    size = patch_size
    for op in LAYERS[architecture]:
        if op == "p":
            size = (size - 3) // 2 + 1
    return size


def check_patch_size(architecture: str, patch_size: int) -> None:
    """Raise a one-line ConfigError unless the ``architecture`` network can take ``patch_size`` patches.

    The side must be odd (the label is the centre voxel's) and the last feature map must be odd
    and at least 1x1: the fast sliding window (``inference.predict.predict_fast``) centres the first FC
    layer's window on each voxel. For the paper's pooling (3x3, stride 2, twice) that allows
    ``8k - 1`` and ``8k + 1``: 7, 9, 15, 17, 23, 25, 31, 33, ...
    """
    valid = [p for p in range(3, 4 * max(int(patch_size), 16) + 8, 2)
             if feature_size(architecture, p) >= 1 and feature_size(architecture, p) % 2 == 1]
    if patch_size not in valid:
        near = [max((p for p in valid if p < patch_size), default=None), min(p for p in valid if p > patch_size)]
        raise ConfigError(f"sampling.patch_size={patch_size} does not fit the {architecture.upper()} network "
                          f"(odd side with an odd final feature map needed); nearest valid sizes: "
                          f"{', '.join(str(p) for p in near if p is not None)}")


class PereiraCNN(nn.Module):
    """One of the paper's patch classifiers.

    Attributes:
        features: the convolution/pooling stack, ``(N, 4, 33, 33) -> (N, 128, 7, 7)``.
        classifier: flatten, then dropout + FC256 + LReLU, dropout + FC256 + LReLU, dropout + FC.
    """

    def __init__(self, architecture: str = "hgg", num_classes: int = 5, dropout: float = 0.1,
                 leaky_relu_slope: float = 0.333, in_channels: int = IN_CHANNELS,
                 patch_size: int = PATCH_SIZE):
        super().__init__()
        if architecture not in LAYERS:
            raise ValueError(f"architecture must be one of {list(LAYERS)}, got {architecture!r}")
        self.architecture = architecture
        self.num_classes = num_classes
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        channels = in_channels
        for op in LAYERS[architecture]:
            if op == "p":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            else:
                width = int(op[1:])
                layers += [nn.Conv2d(channels, width, kernel_size=3, stride=1, padding=1),
                           nn.LeakyReLU(leaky_relu_slope)]
                channels = width
        self.features = nn.Sequential(*layers)
        flat = channels * feature_size(architecture, patch_size) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(flat, FC_WIDTH), nn.LeakyReLU(leaky_relu_slope),
            nn.Dropout(dropout), nn.Linear(FC_WIDTH, FC_WIDTH), nn.LeakyReLU(leaky_relu_slope),
            nn.Dropout(dropout), nn.Linear(FC_WIDTH, num_classes),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier/Glorot uniform weights and zero biases (paper)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``(N, 4, 33, 33)`` float -> ``(N, num_classes)`` logits."""
        return self.classifier(self.features(patches))


def build_network(config: ModelConfig, num_classes: int, *, patch_size: int) -> PereiraCNN:
    """The network described by ``config`` for ``patch_size`` patches with ``num_classes`` outputs.

    ``patch_size`` is ``config.sampling.patch_size`` of the full config (the patches the network
    is trained and run on); ConfigError if the architecture cannot take it (:func:`check_patch_size`).
    """
    check_patch_size(config.architecture, patch_size)
    return PereiraCNN(config.architecture, num_classes, dropout=config.dropout,
                      leaky_relu_slope=config.leaky_relu_slope, patch_size=patch_size)


def freeze_for(network: PereiraCNN, trainable: str) -> int:
    """Freeze every layer except those ``trainable`` names ("all": none frozen; "output": only the last
    fully connected layer trains, as the second training phase of Havaei et al. 2017); the number of
    trainable parameters left."""
    for parameter in network.parameters():
        parameter.requires_grad_(trainable == "all")
    if trainable == "output":
        for parameter in network.classifier[-1].parameters():
            parameter.requires_grad_(True)
    return count_parameters(network)


def count_parameters(network: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)
