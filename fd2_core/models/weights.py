"""Reading and writing FD² model weights as local files (safetensors preferred, `.pt` state dicts allowed).

A file may hold a whole `FD2Model` state dict (keys `backbone.*`, `cal_head.*`, other top-level keys are
ignored) or a bare backbone state dict. The backbone must match exactly; the CAL head is loaded when the file
has one and the model wants one, otherwise the model keeps its fresh head.

A *feature extractor* file (safetensors whose metadata `format` is `fd2.feature_extractor.v1`, written by
`save_feature_extractor`) holds the backbone without its classifier, so it serves any number of classes: every
other backbone key must match exactly, the classifier and the CAL head stay freshly initialised. This is how a
teacher starts from a backbone pretrained on other classes (the role ImageNet weights play at 224 px).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

BACKBONE_PREFIX = "backbone."
CAL_PREFIX = "cal_head."
FEATURE_EXTRACTOR_FORMAT = "fd2.feature_extractor.v1"
# Attribute holding the final linear layer: `classifier` (ConvNet-BN, MobileNetV2) or `fc` (ResNet).
CLASSIFIER_NAMES: tuple[str, ...] = ("classifier", "fc")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load tensors from a `.safetensors` file or a `.pt`/`.pth` state dict (never unpickling objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return dict(state)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a `.safetensors` file (empty for `.pt` files, which carry none)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})


def is_feature_extractor(path: str | Path) -> bool:
    """True when the file says it holds a backbone without classifier (see the module docstring)."""
    return read_metadata(path).get("format") == FEATURE_EXTRACTOR_FORMAT


def classifier_name(backbone: nn.Module) -> str:
    """Name of the backbone's final linear layer, whose shape depends on the number of classes."""
    for name in CLASSIFIER_NAMES:
        if isinstance(getattr(backbone, name, None), nn.Module):
            return name
    raise ValueError(f"{type(backbone).__name__} has no classifier attribute ({', '.join(CLASSIFIER_NAMES)})")


def _is_classifier_key(key: str, classifier: str) -> bool:
    return key == classifier or key.startswith(classifier + ".")


def _sub_state(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _key_problems(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> list[str]:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            problems.append(f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''} ({len(keys)})")
    return problems


def _load_strict(module: nn.Module, state: Mapping[str, Tensor], what: str, path: Path) -> None:
    problems = _key_problems(module.state_dict(), state)
    if problems:
        raise ValueError(
            f"weights in {path} do not fit the {what} (check backbone, image_size, num_classes and "
            f"num_attention_maps): " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)


def _load_feature_extractor(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """Every backbone key except the classifier's must match exactly; classifier and CAL head stay fresh."""
    meta = read_metadata(path)
    made_for = ", ".join(f"{k} {meta[k]}" for k in ("backbone", "model_width", "image_size") if k in meta)
    backbone = model.backbone
    classifier = classifier_name(backbone)
    extra = sorted(k for k in state if not k.startswith(BACKBONE_PREFIX))
    backbone_state = _sub_state(state, BACKBONE_PREFIX)
    extra += sorted(BACKBONE_PREFIX + k for k in backbone_state if _is_classifier_key(k, classifier))
    own = {k: v for k, v in backbone.state_dict().items() if not _is_classifier_key(k, classifier)}
    problems = _key_problems(own, backbone_state)
    if extra:
        problems.append(f"not backbone features: {', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}")
    if problems:
        raise ValueError(
            f"feature extractor in {path} (made for {made_for or 'an unnamed backbone'}) does not fit the "
            f"backbone (check backbone, model_width and image_size): " + "; ".join(problems)
        )
    result = backbone.load_state_dict(backbone_state, strict=False)
    assert not result.unexpected_keys and all(_is_classifier_key(k, classifier) for k in result.missing_keys)


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into an `FD2Model`; raises ValueError naming mismatched keys.

    A feature extractor file (see the module docstring) leaves the classifier and the CAL head fresh."""
    path = Path(path)
    state = read_state_dict(path)
    if is_feature_extractor(path):
        _load_feature_extractor(model, state, path)
        return
    backbone_state = _sub_state(state, BACKBONE_PREFIX)
    if not backbone_state:
        backbone_state = {k: v for k, v in state.items() if not k.startswith(CAL_PREFIX)}
    _load_strict(model.backbone, backbone_state, "backbone", path)
    cal_state = _sub_state(state, CAL_PREFIX)
    if cal_state and model.cal_head is not None:
        _load_strict(model.cal_head, cal_state, "CAL head", path)


def save_model_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's full state dict as safetensors (atomically: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    tmp.replace(path)


def feature_extractor_state(model: nn.Module) -> dict[str, Tensor]:
    """`backbone.*` tensors of an `FD2Model` without the classifier (and without any CAL head)."""
    classifier = classifier_name(model.backbone)
    return {
        BACKBONE_PREFIX + k: v.detach().cpu().contiguous().clone()
        for k, v in model.backbone.state_dict().items()
        if not _is_classifier_key(k, classifier)
    }


def save_feature_extractor(model: nn.Module, path: str | Path, metadata: Mapping[str, object] | None = None) -> Path:
    """Write the backbone without its classifier as safetensors marked as a feature extractor (atomically).

    Metadata values that are not strings are stored as JSON; `format` is always set."""
    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta["format"] = FEATURE_EXTRACTOR_FORMAT
    meta.setdefault("classifier", f"absent ({classifier_name(model.backbone)}.* left out)")
    tmp = path.with_name(path.name + ".tmp")
    save_file(feature_extractor_state(model), str(tmp), metadata=meta)
    tmp.replace(path)
    return path

