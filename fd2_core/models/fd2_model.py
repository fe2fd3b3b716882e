"""The FD² model: a backbone and, optionally, the CAL head on its last feature map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .cal_head import CALHead, CALOutput
from .registry import build_backbone
from .weights import load_model_weights


class ModelOutput(NamedTuple):
    logits: Tensor  # backbone classifier logits [B, K]
    feature_map: Tensor  # F [B, C, H, W], the backbone's last feature map before pooling
    cal: CALOutput | None  # None when the model has no CAL head


class FD2Model(nn.Module):
    """Backbone + optional CAL head; `forward` returns a `ModelOutput`, never a tuple."""

    def __init__(self, backbone: nn.Module, num_classes: int, cal_head: CALHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.cal_head = cal_head
        self.num_classes = num_classes
        self.feature_channels: int = backbone.feature_channels

    def forward(self, x: Tensor, *, counterfactual: bool = False) -> ModelOutput:
        feature_map = self.backbone.forward_features(x)
        logits = self.backbone.forward_head(feature_map)
        if self.cal_head is None:
            if counterfactual:
                raise ValueError("counterfactual logits need the CAL head (build the model with cal=True)")
            return ModelOutput(logits, feature_map, None)
        return ModelOutput(logits, feature_map, self.cal_head(feature_map, counterfactual=counterfactual))

    def bn_layers(self) -> list[_BatchNorm]:
        """Backbone BatchNorms in registration order (= forward order; the stem's first), then the CAL BN."""
        layers = [m for m in self.backbone.modules() if isinstance(m, _BatchNorm)]
        if self.cal_head is not None:
            layers.append(self.cal_head.bn)
        return layers


def build_model(
    backbone: str,
    num_classes: int,
    image_size: int,
    *,
    cal: bool,
    num_attention_maps: int = 8,
    weights_path: str | Path | None = None,
    torchvision_weights: bool = False,
    width: int | None = None,
    weights_mode: str = "full",
    classes: Sequence[str] | None = None,
) -> FD2Model:
    """Build a registered backbone (+ CAL head) and optionally load a local weights file.

    `width` is the convnet's channel count (default 128; torchvision backbones ignore it).

    `torchvision_weights` fetches torchvision's ImageNet weights (once, into the torch hub cache); a
    `weights_path` is loaded afterwards in `weights_mode` (`full` | `backbone`) with the class names
    `classes` (see `fd2_core.models.weights.load_model_weights` for the checks and errors).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    net = build_backbone(backbone, num_classes, image_size, torchvision_weights=torchvision_weights, width=width)
    head = CALHead(net.feature_channels, num_classes, num_attention_maps) if cal else None
    model = FD2Model(net, num_classes, head)
    if weights_path is not None:
        load_model_weights(model, weights_path, mode=weights_mode, classes=classes)
    return model
