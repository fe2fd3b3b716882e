"""Reading and writing FD² model weights as local files (safetensors preferred, `.pt` state dicts allowed).

A file may hold a whole `FD2Model` state dict (keys `backbone.*`, `cal_head.*`, other top-level keys are
ignored) or a bare backbone state dict. It starts a model in one of two modes (`WEIGHTS_MODES`):

- `full`: the whole teacher (backbone with its classifier, CAL head and its class prototypes) for the same
  classes. The class names stored in the file's metadata (`classes`, written by the pipeline's teacher) are
  compared with the caller's: the same set in another order is mapped (the per-class rows of the classifier,
  the CAL classifier and the prototypes are permuted), another set is refused (`ClassListMismatch`), a file
  without names is loaded as it is with a warning. Every tensor must fit exactly; the CAL head is loaded when
  the file has one and the model wants one, otherwise the model keeps its fresh head.
- `backbone`: only the feature extractor, for any class list: the classifier, the CAL head and the prototypes
  stay freshly initialised, every other backbone tensor must fit exactly.

A *feature extractor* file (safetensors whose metadata `format` is `fd2.feature_extractor.v1`, written by
`save_feature_extractor`) holds the backbone without its classifier, so it can only start a backbone (the
role ImageNet weights play at 224 px); `full` mode refuses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
WEIGHTS_MODES: tuple[str, ...] = ("full", "backbone")
# CAL head tensors with one row per class (the backbone's classifier is found by `classifier_name`).
CAL_CLASS_ROWS: tuple[str, ...] = ("classifier.weight", "prototypes")
UNNAMED_CLASSES = "teacher_classes_unnamed"
_SHOWN = 10


class ClassListMismatch(ValueError):
    """The file's teacher was trained on another set of classes; `missing` / `extra` name the difference."""

    def __init__(self, path: Path, missing: Sequence[str], extra: Sequence[str]) -> None:
        self.missing, self.extra = list(missing), list(extra)
        parts = []
        if missing:
            parts.append(f"dataset classes the file lacks: {_names(missing)}")
        if extra:
            parts.append(f"file classes the dataset lacks: {_names(extra)}")
        super().__init__(
            f"teacher weights in {path} were trained on another class list ({'; '.join(parts)}); use a teacher "
            f"trained on these classes, or set teacher_weights_mode=backbone to start only its feature extractor"
        )


@dataclass(frozen=True)
class WeightsLoad:
    """What `load_model_weights` did: the mode, how the class rows were matched, and warnings for a person.

    `classes`: `same_order`, `reordered` (rows permuted to the caller's order), `unnamed` (the file names no
    classes; loaded as it is), `unchecked` (the caller gave no class list) or `dropped` (backbone mode).
    `warnings`: dicts with `code` and `message` (not part of `as_dict`; a run reports them on their own).
    """

    mode: str
    classes: str
    warnings: tuple[dict[str, str], ...] = field(default=())

    def as_dict(self) -> dict[str, str]:
        return {"mode": self.mode, "classes": self.classes}


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return f"{shown}{f' … ({len(names)} in all)' if len(names) > _SHOWN else ''}"


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


def read_class_names(path: str | Path) -> list[str] | None:
    """Class names stored with the weights, in row order (metadata `classes`); None when the file has none.

    Raises ValueError when the entry is not a JSON list of distinct strings."""
    raw = read_metadata(path).get("classes")
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"metadata 'classes' of {path} is not a JSON list of distinct class names")
    return names


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


def _split_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone, CAL head) tensors of a whole-model state dict or of a bare backbone state dict."""
    backbone_state = _sub_state(state, BACKBONE_PREFIX)
    if not backbone_state:
        backbone_state = {k: v for k, v in state.items() if not k.startswith(CAL_PREFIX)}
    return backbone_state, _sub_state(state, CAL_PREFIX)


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


def class_order(stored: Sequence[str], wanted: Sequence[str], path: Path) -> list[int]:
    """Row of the file for each wanted class, in the wanted order; ClassListMismatch when the sets differ."""
    stored_set, wanted_set = set(stored), set(wanted)
    missing = [name for name in wanted if name not in stored_set]
    extra = [name for name in stored if name not in wanted_set]
    if missing or extra:
        raise ClassListMismatch(path, missing, extra)
    row = {name: i for i, name in enumerate(stored)}
    return [row[name] for name in wanted]


def permute_class_rows(
    backbone_state: Mapping[str, Tensor], cal_state: Mapping[str, Tensor], order: Sequence[int], classifier: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Reorder the per-class rows: row i of the result is row `order[i]` of the file.

    Per-class tensors: the backbone classifier's weight [K, D] and bias [K], the CAL classifier [K, M·C] and
    the prototypes [K, M·C]; everything else is returned unchanged."""
    index = torch.as_tensor(list(order), dtype=torch.long)

    def reorder(state: Mapping[str, Tensor], is_row: Callable[[str], bool]) -> dict[str, Tensor]:
        return {k: v.index_select(0, index) if is_row(k) else v for k, v in state.items()}

    return (
        reorder(backbone_state, lambda k: _is_classifier_key(k, classifier)),
        reorder(cal_state, lambda k: k in CAL_CLASS_ROWS),
    )


def _class_rows(backbone_state: Mapping[str, Tensor], cal_state: Mapping[str, Tensor], classifier: str) -> set[int]:
    rows = {v.shape[0] for k, v in backbone_state.items() if _is_classifier_key(k, classifier) and v.dim()}
    return rows | {v.shape[0] for k, v in cal_state.items() if k in CAL_CLASS_ROWS and v.dim()}


def _load_backbone_only(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """Every backbone key except the classifier's must match exactly; classifier and CAL head stay fresh.

    A feature extractor file must hold nothing else; any other file may (its classifier and CAL head are
    dropped)."""
    meta = read_metadata(path)
    made_for = ", ".join(f"{k} {meta[k]}" for k in ("backbone", "model_width", "image_size") if k in meta)
    backbone = model.backbone
    classifier = classifier_name(backbone)
    own = {k: v for k, v in backbone.state_dict().items() if not _is_classifier_key(k, classifier)}
    extra: list[str] = []
    if meta.get("format") == FEATURE_EXTRACTOR_FORMAT:
        what = "feature extractor"
        extra = sorted(k for k in state if not k.startswith(BACKBONE_PREFIX))
        backbone_state = _sub_state(state, BACKBONE_PREFIX)
        extra += sorted(BACKBONE_PREFIX + k for k in backbone_state if _is_classifier_key(k, classifier))
    else:
        what = "backbone of the weights"
        backbone_state, _ = _split_state(state)
        backbone_state = {k: v for k, v in backbone_state.items() if not _is_classifier_key(k, classifier)}
    problems = _key_problems(own, backbone_state)
    if extra:
        problems.append(f"not backbone features: {', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}")
    if problems:
        raise ValueError(
            f"{what} in {path} (made for {made_for or 'an unnamed backbone'}) does not fit the "
            f"backbone (check backbone, model_width and image_size): " + "; ".join(problems)
        )
    result = backbone.load_state_dict(backbone_state, strict=False)
    assert not result.unexpected_keys and all(_is_classifier_key(k, classifier) for k in result.missing_keys)


def load_model_weights(
    model: nn.Module, path: str | Path, *, mode: str = "full", classes: Sequence[str] | None = None
) -> WeightsLoad:
    """Load a weights file into an `FD2Model` in `mode` (`full` | `backbone`, see the module docstring).

    `classes`: the model's class names in row order, compared in `full` mode with the names stored in the
    file (None: not compared). Raises ClassListMismatch (another set of classes), ValueError naming
    mismatched keys or a feature extractor given to `full` mode, FileNotFoundError."""
    path = Path(path)
    if mode not in WEIGHTS_MODES:
        raise ValueError(f"unknown weights mode {mode!r}; expected one of {', '.join(WEIGHTS_MODES)}")
    state = read_state_dict(path)
    if mode == "backbone":
        _load_backbone_only(model, state, path)
        return WeightsLoad(mode, "dropped")
    if is_feature_extractor(path):
        raise ValueError(
            f"{path} holds a feature extractor (a backbone without classifier, CAL head or prototypes), which "
            f"cannot start a whole teacher; set teacher_weights_mode=backbone to start the backbone from it"
        )
    backbone_state, cal_state = _split_state(state)
    stored = read_class_names(path)
    warnings: tuple[dict[str, str], ...] = ()
    if classes is None:
        status = "unchecked"
    elif stored is None:
        status = "unnamed"
        warnings = (
            {
                "code": UNNAMED_CLASSES,
                "message": f"teacher weights {path.name} name no classes, so their classifier rows cannot be "
                f"checked against the dataset's {len(classes)} classes and are used in the dataset's order; "
                f"save the teacher with its class names (the pipeline's teacher.safetensors has them) or set "
                f"teacher_weights_mode=backbone",
            },
        )
    else:
        classifier = classifier_name(model.backbone)
        order = class_order(stored, classes, path)
        rows = _class_rows(backbone_state, cal_state, classifier)
        if rows - {len(stored)}:
            raise ValueError(
                f"weights in {path} name {len(stored)} classes but have class rows of {sorted(rows)}; the file "
                f"is inconsistent"
            )
        status = "same_order"
        if order != list(range(len(order))):
            backbone_state, cal_state = permute_class_rows(backbone_state, cal_state, order, classifier)
            status = "reordered"
    _load_strict(model.backbone, backbone_state, "backbone", path)
    if cal_state and model.cal_head is not None:
        _load_strict(model.cal_head, cal_state, "CAL head", path)
    return WeightsLoad(mode, status, warnings)


def _string_metadata(metadata: Mapping[str, object] | None) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in (metadata or {}).items()}


def save_model_weights(model: nn.Module, path: str | Path, metadata: Mapping[str, object] | None = None) -> None:
    """Write the model's full state dict as safetensors (atomically: temp file, then rename).

    Metadata values that are not strings are stored as JSON; `classes` (names in row order) lets `full`
    mode check and map the classes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=_string_metadata(metadata) or None)
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
