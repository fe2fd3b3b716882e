"""Soft-label files in the layouts of formats v1–v4, made from a current (v5) recording: the walk's
choices stored as tensors, as those formats did."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from fd2_core.soft_label_compaction import stored_choices
from fd2_core.softlabels import SoftLabels

V5_ONLY_KEYS = ("augmentations", "label_encoding", "epochs_kept", "layout", "format")


def stored_layout(soft: SoftLabels) -> dict[str, torch.Tensor]:
    """The tensors of a v1–v4 file holding `soft`'s walk and logits (every epoch recorded, fp16)."""
    assert soft.stream is not None and soft.recorded_epochs == list(range(soft.epochs))
    logits = {key: soft.tensors[key] for key in ("logits", "topk_values", "topk_indices") if key in soft.tensors}
    if "topk_indices" in logits:
        logits["topk_indices"] = logits["topk_indices"].int()
    return {**stored_choices(soft.stream, soft.epochs), **logits}


def write_old_format(path: Path, soft: SoftLabels, format_name: str, drop: tuple[str, ...] = ()) -> Path:
    """`soft` rewritten at `path` as `format_name` (e.g. fd2.soft_labels.v2), without the metadata keys
    only v5 has and those in `drop`."""
    meta = {k: v for k, v in soft.metadata.items() if k not in (*V5_ONLY_KEYS, *drop)}
    save_file(stored_layout(soft), str(path), metadata={**meta, "format": format_name})
    return path
