"""ResNet-18/50, MobileNetV2 and DenseNet-121 from torchvision, with the FD² backbone interface.

The subclasses keep torchvision's parameter names, so torchvision checkpoints load into them. Below 65 px the
stem is made low-resolution (ResNet: 3×3 stride-1 conv1 and no max-pool; MobileNetV2: stride 1 in the first
conv and in the first stride-2 inverted residual; DenseNet-121: 3×3 stride-1 conv0 and no pool0) so a 32 px
image still gives a 4×4 feature map for attention. The architecture never depends on whether ImageNet weights
are used, so a checkpoint trained either way loads into a fresh model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

LOW_RESOLUTION_MAX_SIZE = 64

logger = logging.getLogger(__name__)


class ResNetBackbone(tvm.ResNet):
    """torchvision ResNet whose feature map `F` is the output of `layer4`."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int, image_size: int
    ) -> None:
        super().__init__(block, layers, num_classes=num_classes)
        if image_size <= LOW_RESOLUTION_MAX_SIZE:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        self.feature_channels = self.fc.in_features
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, feature_map: Tensor) -> Tensor:
        return self.fc(self.avgpool(feature_map).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class MobileNetV2Backbone(tvm.MobileNetV2):
    """torchvision MobileNetV2 whose feature map `F` is the output of `features` (1280 channels)."""

    def __init__(self, num_classes: int, image_size: int) -> None:
        super().__init__(num_classes=num_classes)
        if image_size <= LOW_RESOLUTION_MAX_SIZE:
            self.features[0][0].stride = (1, 1)
            self.features[2].conv[1][0].stride = (1, 1)
        self.feature_channels = self.last_channel
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, feature_map: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(feature_map, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class DenseNetBackbone(tvm.DenseNet):
    """torchvision DenseNet-121 whose feature map `F` is `relu(features(x))` (1024 channels), the map its own
    classifier pools."""

    def __init__(self, num_classes: int, image_size: int) -> None:
        super().__init__(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=num_classes)
        if image_size <= LOW_RESOLUTION_MAX_SIZE:
            self.features.conv0 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.features.conv0.weight)
            self.features.pool0 = nn.Identity()
        self.feature_channels = self.classifier.in_features
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        return F.relu(self.features(x))

    def forward_head(self, feature_map: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(feature_map, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# torchvision's published DenseNet checkpoints name layers `norm.1` where the module is `norm1` (its own loader
# renames them the same way).
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _current_key(key: str) -> str:
    match = _DENSENET_OLD_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def _load_imagenet_weights(model: nn.Module, weights: tvm.WeightsEnum, name: str) -> None:
    """Copy torchvision's ImageNet weights, skipping the classifier and any resized stem."""
    logger.warning(
        "loading torchvision ImageNet weights %s for %s (fetched once into the torch hub cache)",
        weights,
        name,
    )
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as error:  # network or cache failure: say what to do instead
        raise RuntimeError(
            f"could not fetch torchvision ImageNet weights for {name} ({error}); "
            "set torchvision_weights to false or pass a local weights file"
        ) from error
    state = {_current_key(k): v for k, v in state.items()}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    if skipped:
        logger.warning(
            "%s: kept fresh initialisation for %d tensors not matching ImageNet weights: %s",
            name,
            len(skipped),
            ", ".join(skipped[:6]) + (" …" if len(skipped) > 6 else ""),
        )


def build_resnet18(
    num_classes: int, image_size: int, *, torchvision_weights: bool = False, width: int | None = None
) -> ResNetBackbone:
    model = ResNetBackbone(BasicBlock, [2, 2, 2, 2], num_classes, image_size)
    if torchvision_weights:
        _load_imagenet_weights(model, tvm.ResNet18_Weights.DEFAULT, "resnet18")
    return model


def build_resnet50(
    num_classes: int, image_size: int, *, torchvision_weights: bool = False, width: int | None = None
) -> ResNetBackbone:
    model = ResNetBackbone(Bottleneck, [3, 4, 6, 3], num_classes, image_size)
    if torchvision_weights:
        _load_imagenet_weights(model, tvm.ResNet50_Weights.DEFAULT, "resnet50")
    return model


def build_mobilenetv2(
    num_classes: int, image_size: int, *, torchvision_weights: bool = False, width: int | None = None
) -> MobileNetV2Backbone:
    model = MobileNetV2Backbone(num_classes, image_size)
    if torchvision_weights:
        _load_imagenet_weights(model, tvm.MobileNet_V2_Weights.DEFAULT, "mobilenetv2")
    return model


def build_densenet121(
    num_classes: int, image_size: int, *, torchvision_weights: bool = False, width: int | None = None
) -> DenseNetBackbone:
    model = DenseNetBackbone(num_classes, image_size)
    if torchvision_weights:
        _load_imagenet_weights(model, tvm.DenseNet121_Weights.DEFAULT, "densenet121")
    return model


# `width` belongs to the convnet; torchvision architectures have fixed widths and ignore it.
TORCHVISION_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "mobilenetv2": build_mobilenetv2,
    "densenet121": build_densenet121,
}
