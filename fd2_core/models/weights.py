"""Reading and writing FD² model weights as local files (safetensors preferred, `.pt` state dicts allowed).

A file may hold a whole `FD2Model` state dict (keys `backbone.*`, `cal_head.*`, other top-level keys are
ignored) or a bare backbone state dict. The backbone must match exactly; the CAL head is loaded when the file
has one and the model wants one, otherwise the model keeps its fresh head.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

BACKBONE_PREFIX = "backbone."
CAL_PREFIX = "cal_head."


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


def _sub_state(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _load_strict(module: nn.Module, state: Mapping[str, Tensor], what: str, path: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            problems.append(f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''} ({len(keys)})")
    if problems:
        raise ValueError(
            f"weights in {path} do not fit the {what} (check backbone, image_size, num_classes and "
            f"num_attention_maps): " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into an `FD2Model`; raises ValueError naming mismatched keys."""
    path = Path(path)
    state = read_state_dict(path)
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
