"""Backbones looked up by name: the one place that maps a spec's `backbone` string to a network."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor, nn

from .convnet import ConvNetBN
from .torchvision_nets import TORCHVISION_BUILDERS


class FeatureBackbone(Protocol):
    """What FD² needs from a backbone: the last feature map `F` and the classifier applied to it."""

    feature_channels: int
    num_classes: int

    def forward_features(self, x: Tensor) -> Tensor: ...

    def forward_head(self, feature_map: Tensor) -> Tensor: ...


# builder(num_classes, image_size, *, torchvision_weights=False, width=None) -> backbone module
BackboneBuilder = Callable[..., nn.Module]
DEFAULT_CONVNET_WIDTH = 128


def build_convnet(
    num_classes: int, image_size: int, *, torchvision_weights: bool = False, width: int | None = None
) -> ConvNetBN:
    if torchvision_weights:
        raise ValueError("torchvision has no ImageNet weights for convnet; set torchvision_weights to false")
    return ConvNetBN(num_classes, image_size, width=width or DEFAULT_CONVNET_WIDTH)


BACKBONES: dict[str, BackboneBuilder] = {"convnet": build_convnet, **TORCHVISION_BUILDERS}


def build_backbone(
    name: str, num_classes: int, image_size: int, *, torchvision_weights: bool = False, width: int | None = None
) -> nn.Module:
    """Instantiate a registered backbone; unknown names raise ValueError listing the valid ones.

    `width` sets the convnet's channels (default 128); torchvision backbones ignore it.
    """
    try:
        builder = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}") from None
    return builder(num_classes, image_size, torchvision_weights=torchvision_weights, width=width)
