"""ConvNet-BN: the small low-resolution teacher of dataset-distillation work.

Each block is Conv3x3 → BatchNorm → ReLU → AvgPool2d(2). The feature map `F` handed to the CAL head is the
last block's activations *before* its pool (after its BatchNorm and ReLU), so a 32 px input still yields an
8×8 map for attention; the classifier applies that last pool, flattens and projects.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


def convnet_depth(image_size: int) -> int:
    """Depth 3 up to 32 px, one more block per doubling (4 at 64 px), never below 3."""
    return max(3, 3 + round(math.log2(max(image_size, 1) / 32)))


def _block(in_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    )


class ConvNetBN(nn.Module):
    """ConvNet-BN with the FD² backbone interface (`forward_features`, `forward_head`)."""

    def __init__(
        self, num_classes: int, image_size: int, *, width: int = 128, depth: int | None = None
    ) -> None:
        super().__init__()
        depth = depth if depth is not None else convnet_depth(image_size)
        layers: list[nn.Module] = []
        side = image_size
        for index in range(depth):
            layers.append(_block(3 if index == 0 else width, width))
            if index < depth - 1:
                layers.append(nn.AvgPool2d(2))
                side //= 2
        if side < 2:
            raise ValueError(f"image_size {image_size} is too small for a ConvNet of depth {depth}")
        self.features = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2)
        self.classifier = nn.Linear(width * (side // 2) ** 2, num_classes)
        self.feature_channels = width
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, feature_map: Tensor) -> Tensor:
        return self.classifier(self.pool(feature_map).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
