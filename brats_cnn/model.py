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

# "c<N>" = 3x3 convolution with N filters + LeakyReLU, "p" = 3x3 stride-2 max-pooling.
LAYERS: dict[str, tuple[str, ...]] = {
    "hgg": ("c64", "c64", "c64", "p", "c128", "c128", "c128", "p"),  # Table I
    "lgg": ("c64", "c64", "p", "c128", "c128", "p"),  # Table II
}
FC_WIDTH = 256
PATCH_SIZE = 33
IN_CHANNELS = 4
FLOPS_PER_HGG_PATCH = 357.5e6  # multiply-adds x 2, forward, one 33x33 patch (SPEC.md)


def feature_size(architecture: str, patch_size: int = PATCH_SIZE) -> int:
    """Spatial size of the last feature map (7 for a 33x33 patch)."""
    size = patch_size
    for op in LAYERS[architecture]:
        if op == "p":
            size = (size - 3) // 2 + 1
    return size


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


def build_network(config: ModelConfig, num_classes: int) -> PereiraCNN:
    """The network described by ``config`` with ``num_classes`` outputs."""
    return PereiraCNN(config.architecture, num_classes, dropout=config.dropout,
                      leaky_relu_slope=config.leaky_relu_slope)


def count_parameters(network: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)
