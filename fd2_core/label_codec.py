"""Encode teacher logits into a `LabelEncoding`'s tensors and decode them for replay.

Every encoding is local to a row (one sample at one position of one epoch), so epochs encoded apart
and concatenated equal the epochs encoded at once: sharded relabel ranges join into the same file
whatever the format. Tensors, for R rows of K classes (k kept values; the layout of
`fd2_core.softlabels`):

- fp16, all classes: `logits` float16 [..., K]
- fp16, top-k: `topk_values` float16 [..., k], `topk_indices` uint8|int16|int32 [..., k]
- int8: `q_logits` uint8 [..., k or K], `q_scale` float16 [...], and with top-k `topk_indices`
- online: no logit tensors.
"""

from __future__ import annotations

import torch

from .label_formats import LabelEncoding, index_dtype_name
from .runtime import generator

MISSING_LOGIT = -1.0e4  # logits dropped by top-k: softmax gives them ~0 probability
_INDEX_DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}
_LEVELS = 255
_MIN_SCALE = 2.0**-14  # fp16's smallest normal number: a row of equal logits still gets a finite scale


def index_dtype(num_classes: int) -> torch.dtype:
    """torch's smallest integer type that holds a class index (`label_formats.index_dtype_name`)."""
    return _INDEX_DTYPES[index_dtype_name(num_classes)]


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., k] → (q uint8 [..., k], scale float16 [...]): q = round((max − x) / s), s = (max − min)
    / 255 rounded to float16 first, so replay multiplies by exactly the stored s (`label_formats`)."""
    values = values.float()
    top = values.amax(dim=-1, keepdim=True)
    scale = ((top - values.amin(dim=-1, keepdim=True)) / _LEVELS).clamp_min(_MIN_SCALE).half()
    q = ((top - values) / scale.float()).round().clamp(0, _LEVELS).to(torch.uint8)
    return q, scale.squeeze(-1)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x̂ = −q·s, float32 [..., k]: each row shifted so its maximum is 0."""
    return -(q.float() * scale.float().unsqueeze(-1))


def encode_logits(logits: torch.Tensor, encoding: LabelEncoding) -> dict[str, torch.Tensor]:
    """Teacher logits [..., K] (any float type) → the encoding's tensors (module docstring)."""
    if encoding.online:
        return {}
    num_classes = logits.shape[-1]
    kept = encoding.kept_values(num_classes)
    out: dict[str, torch.Tensor] = {}
    values = logits.float()
    if kept < num_classes:
        values, indices = values.topk(kept, dim=-1)
        out["topk_indices"] = indices.to(index_dtype(num_classes))
    if encoding.values == "int8":
        out["q_logits"], out["q_scale"] = quantize_rows(values)
    elif "topk_indices" in out:
        out["topk_values"] = values.half()
    else:
        out["logits"] = values.half()
    return out


def decode_logits(tensors: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor | None:
    """The stored rows (tensors already cut to them) → float32 logits [..., K]; None when the file
    stores none (online). Classes top-k dropped get MISSING_LOGIT."""
    if "logits" in tensors:
        return tensors["logits"].float()
    if "q_logits" in tensors:
        values = dequantize_rows(tensors["q_logits"], tensors["q_scale"])
    elif "topk_values" in tensors:
        values = tensors["topk_values"].float()
    else:
        return None
    if "topk_indices" not in tensors:
        return values
    full = torch.full((*values.shape[:-1], num_classes), MISSING_LOGIT)
    return full.scatter_(-1, tensors["topk_indices"].long(), values)


LOGIT_KEYS = ("logits", "topk_values", "topk_indices", "q_logits", "q_scale")


def kept_epochs(epochs: int, count: int, seed: int, stream: str) -> list[int]:
    """The `count` of `epochs` relabel epochs whose logits are recorded, sorted: the first `count` of a
    permutation seeded by (seed, stream, "kept-epochs"); all of them when count ≥ epochs."""
    if count >= epochs:
        return list(range(epochs))
    chosen = torch.randperm(epochs, generator=generator(seed, stream, "kept-epochs"))[:count]
    return sorted(int(e) for e in chosen)
