"""How a soft-label file stores its teacher logits: full fp16, top-k, 8-bit, a subset of epochs, or
none at all (`online`).

Torch-free, so the API can name formats and size them from a spec without loading torch
(`fd2_core.label_codec` encodes and decodes the tensors). One `LabelEncoding` per file, written into
its metadata (`label_encoding`) and read back by every replay:

- `values`: `fp16` keeps each kept logit as float16; `int8` as one byte per logit plus one float16
  scale per row (below); `online` stores no logits: the student forwards the shipped teacher in the
  recorded relabel mode.
- `topk`: keep the k largest logits of each row with their class indices (the smallest integer
  type that holds a class index); 0 keeps all K.
- `epoch_fraction`: record the teacher on a seeded subset of ⌈f·E⌉ of the E relabel epochs (at
  least 1); the student still trains E epochs and replays recorded epoch kept[e mod m] at epoch e,
  as label pruning does (a smaller pool of augmentations and their labels, cycled).

Why 8 bits with one fp16 scale and no offset per row: the student's loss is a softmax of the
logits (`soft_label_loss`, KL at temperature T), which no constant added to a row changes, so a row
is stored relative to its maximum: q = round((max − x) / s), s = (max − min) / 255, and replayed as
x̂ = −q·s (error ≤ s/2 per logit). A per-row offset would add 2–4 bytes to rows of K = 20 one-byte
values for nothing the loss can see; a per-file scale would be too coarse for rows whose spread
differs tenfold. Users' code that reads the raw values sees each row shifted so its maximum is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Values = Literal["fp16", "int8", "online"]
VALUES: tuple[Values, ...] = ("fp16", "int8", "online")


def index_dtype_name(num_classes: int) -> str:
    """The smallest integer type that holds a class index 0..K−1: uint8, int16 or int32."""
    if num_classes <= 2**8:
        return "uint8"
    if num_classes <= 2**15:
        return "int16"
    return "int32"


def kept_epoch_count(epochs: int, fraction: float) -> int:
    """m = ⌈f·E⌉, at least 1 and at most E (f rounded to 1e-9 first, so 0.1·30 is 3, not 4)."""
    return max(1, min(epochs, math.ceil(round(fraction * epochs, 9))))


@dataclass(frozen=True)
class LabelEncoding:
    """One soft-label storage format (module docstring). Raises ValueError for a combination that
    cannot be replayed."""

    values: Values = "fp16"
    topk: int = 0
    epoch_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.values not in VALUES:
            raise ValueError(f"unknown soft-label values {self.values!r}; expected one of {VALUES}")
        if self.topk < 0:
            raise ValueError(f"topk must be 0 (all) or positive, got {self.topk}")
        if not 0.0 < self.epoch_fraction <= 1.0:
            raise ValueError(f"epoch_fraction must lie in (0, 1], got {self.epoch_fraction}")
        if self.online and (self.topk or self.epoch_fraction != 1.0):
            raise ValueError("online soft labels store no logits: topk and epoch_fraction do not apply")

    @property
    def online(self) -> bool:
        return self.values == "online"

    @property
    def name(self) -> str:
        """e.g. `fp16`, `top5-int8`, `int8-epochs0.1`, `online`."""
        if self.online:
            return "online"
        parts = ([f"top{self.topk}"] if self.topk else []) + [self.values]
        if self.epoch_fraction != 1.0:
            parts.append(f"epochs{self.epoch_fraction:g}")
        return "-".join(parts)

    def for_classes(self, num_classes: int) -> LabelEncoding:
        """The encoding a file of `num_classes` classes really has: a top-k of k ≥ K keeps every class,
        so it is the same encoding without top-k (and named so)."""
        if self.topk and self.topk >= num_classes:
            return LabelEncoding(self.values, 0, self.epoch_fraction)
        return self

    def kept_values(self, num_classes: int) -> int:
        """Logits kept per row: min(k, K), or K."""
        return min(self.topk, num_classes) if self.topk else num_classes

    def as_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "values": self.values, "topk": self.topk, "epoch_fraction": self.epoch_fraction,
                "online": self.online}

    @classmethod
    def from_metadata(cls, fields: dict[str, Any]) -> LabelEncoding:
        return cls(fields["values"], int(fields["topk"]), float(fields["epoch_fraction"]))

    @classmethod
    def from_spec(cls, spec: Any) -> LabelEncoding:
        """The encoding a `JobSpec` asks for (`soft_label_values`, `topk`, `label_epoch_fraction`)."""
        return cls(spec.soft_label_values, spec.topk, spec.label_epoch_fraction)


FULL = LabelEncoding()
