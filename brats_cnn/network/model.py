"""The two networks of Pereira et al. 2016 (Tables I and II).

Input ``(N, 4, 33, 33)`` float32 patches (channels T1, T1c, T2, FLAIR), output ``(N, classes)``
logits for the centre voxel. All convolutions are 3x3, stride 1, "same" padding; max-pooling is
3x3 stride 2 (33 -> 16 -> 7); LeakyReLU (alpha 0.333) follows every convolution and hidden FC layer;
dropout precedes every FC layer; weights use Xavier/Glorot uniform initialisation, biases zero.

Parameter counts with 5 outputs: HGG 2,118,213, LGG 1,933,701 (4 outputs: 2,117,956 / 1,933,444).

``model.context: k`` (k odd, > 1; a choice of ours, off in the paper's configs) adds DeepMedic's context
pathway (Kamnitsas et al. 2017): the input is then the ``(N, 4, 33k, 33k)`` neighbourhood; the usual
pathway reads its central 33x33 patch, a second stack of the same layers at half the widths reads the
whole neighbourhood averaged down ``k x k`` to 33x33, and the first FC layer reads both flattened
feature maps (the main one first). The HGG network with k = 3 has 3,032,804 parameters (4 outputs).
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


def context_layers(architecture: str) -> tuple[str, ...]:
    """The context pathway's layers: the main pathway's at half the widths ("c64" -> "c32")."""
    return tuple(op if op == "p" else f"c{int(op[1:]) // 2}" for op in LAYERS[architecture])


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


def _stack(ops: tuple[str, ...], in_channels: int, leaky_relu_slope: float) -> tuple[nn.Sequential, int]:
    """The convolution/pooling layers of ``ops`` and their output channels."""
    layers: list[nn.Module] = []
    channels = in_channels
    for op in ops:
        if op == "p":
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        else:
            width = int(op[1:])
            layers += [nn.Conv2d(channels, width, kernel_size=3, stride=1, padding=1),
                       nn.LeakyReLU(leaky_relu_slope)]
            channels = width
    return nn.Sequential(*layers), channels


class PereiraCNN(nn.Module):
    """One of the paper's patch classifiers.

    Attributes:
        features: the convolution/pooling stack, ``(N, 4, 33, 33) -> (N, 128, 7, 7)``.
        context_features: with ``context`` k > 1, the context pathway (:func:`context_layers`) on the
            ``k x k``-averaged neighbourhood, ``(N, 4, 33, 33) -> (N, 64, 7, 7)``; else None.
        classifier: flatten, then dropout + FC256 + LReLU, dropout + FC256 + LReLU, dropout + FC.
        input_size: side of the input patches, ``context * patch_size``.
    """

    def __init__(self, architecture: str = "hgg", num_classes: int = 5, dropout: float = 0.1,
                 leaky_relu_slope: float = 0.333, in_channels: int = IN_CHANNELS,
                 patch_size: int = PATCH_SIZE, context: int = 1):
        super().__init__()
        if architecture not in LAYERS:
            raise ValueError(f"architecture must be one of {list(LAYERS)}, got {architecture!r}")
        if context < 1 or (context > 1 and context % 2 == 0):
            raise ValueError(f"context must be 1 or an odd factor > 1, got {context}")
        self.architecture = architecture
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.context = context
        self.input_size = patch_size * context
        self.features, channels = _stack(LAYERS[architecture], in_channels, leaky_relu_slope)
        self.context_features = None
        if context > 1:
            self.context_features, context_channels = _stack(context_layers(architecture), in_channels,
                                                             leaky_relu_slope)
            channels += context_channels
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
        """``(N, 4, S, S)`` float (``S`` = :attr:`input_size`) -> ``(N, num_classes)`` logits."""
        if self.context_features is None:
            return self.classifier(self.features(patches))
        start = (self.input_size - self.patch_size) // 2
        centre = patches[:, :, start:start + self.patch_size, start:start + self.patch_size]
        wide = nn.functional.avg_pool2d(patches, self.context)  # block i averages input k*i .. k*i + k - 1
        return self.classifier(torch.cat([self.features(centre).flatten(1),
                                          self.context_features(wide).flatten(1)], dim=1))


def input_side(config) -> int:
    """Side of the patches a full config's network reads: ``sampling.patch_size`` times ``model.context``."""
    return int(config.sampling.patch_size) * int(getattr(config.model, "context", 1))


def build_network(config: ModelConfig, num_classes: int, *, patch_size: int) -> PereiraCNN:
    """The network described by ``config`` for ``patch_size`` patches with ``num_classes`` outputs.

    ``patch_size`` is ``config.sampling.patch_size`` of the full config (the patches the network
    is trained and run on); ConfigError if the architecture cannot take it (:func:`check_patch_size`).
    """
    check_patch_size(config.architecture, patch_size)
    context = int(getattr(config, "context", 1))
    if context > 1 and context % 2 == 0:
        raise ConfigError(f"model.context={context} must be odd (the averaged blocks are centred on voxels)")
    return PereiraCNN(config.architecture, num_classes, dropout=config.dropout,
                      leaky_relu_slope=config.leaky_relu_slope, patch_size=patch_size, context=context)


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
