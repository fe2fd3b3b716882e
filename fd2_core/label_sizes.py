"""How many bytes a soft-label file of format v5 takes, computed without writing it.

Torch-free, so the API can size the labels of a job at submit time and pick the encoding that fits
a user's `label_budget_bytes` (`fd2_core.spec_resolution.fit_label_budget`). The tensor part follows
the layout of docs/SOFT_LABELS.md exactly; the header is safetensors' own (8-byte length, then JSON
of the tensor entries and the metadata, padded with spaces to a multiple of 8), of which only the
metadata has to be estimated before the file exists (`estimated_metadata_bytes`).
tests/core/test_label_sizes.py checks both against files recorded and saved by
`fd2_core.softlabels`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

from .label_formats import FULL, LabelEncoding, index_dtype_name, kept_epoch_count

# safetensors' dtype names and widths of the tensors a v5 file holds
_DTYPES = {"uint8": ("U8", 1), "int16": ("I16", 2), "float16": ("F16", 2), "int32": ("I32", 4)}
# safetensors writes tensors by dtype in the reverse order of its Dtype enum, then by name
_WRITE_ORDER = {"I32": 0, "F16": 1, "I16": 2, "U8": 3}
DIGEST_BYTES = 8  # `augment_digests`: 8 bytes of SHA-256 per recorded epoch

# What `estimated_metadata_bytes` assumes for class names it is not given: CUB's
# "001.Black_footed_Albatross" and Stanford Cars' "AM General Hummer SUV 2000" have 26 characters,
# FGVC-Aircraft's variants ("707-320") far fewer; 32 leaves room.
ASSUMED_CLASS_NAME_CHARS = 32
# The fixed words of `softlabels.layout_of` (the metadata `layout` line) around its tensor list.
_LAYOUT_WORDS = 251

# Provisional order from the most faithful encoding to the smallest; `fit_label_budget` takes the
# first whose file fits. Replace it by the measured order of docs/BENCHMARKS.md (student accuracy
# per encoding) once that is measured. A top-k of k ≥ K stores every class: `budget_candidates`
# tries the same encoding without top-k in its place.
BUDGET_ORDER: tuple[LabelEncoding, ...] = (
    FULL,
    LabelEncoding("fp16", 0, 0.5),
    LabelEncoding("fp16", 20),
    LabelEncoding("fp16", 10),
    LabelEncoding("fp16", 5),
    LabelEncoding("int8"),
    LabelEncoding("int8", 20),
    LabelEncoding("int8", 10),
    LabelEncoding("int8", 5),
    LabelEncoding("int8", 5, 0.5),
    LabelEncoding("int8", 5, 0.25),
    LabelEncoding("int8", 5, 0.1),
)
# `online` is never chosen by a budget: its labels are the teacher file (`storage_report` counts them
# so), whose size a budget on the labels file cannot see; a user asks for it by name.


def recorded_epoch_count(encoding: LabelEncoding, epochs: int) -> int:
    """E': epochs whose rows the file holds (online files hold the digests of all E)."""
    return epochs if encoding.online else kept_epoch_count(epochs, encoding.epoch_fraction)


def label_tensor_shapes(
    encoding: LabelEncoding, epochs: int, num_images: int, num_classes: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (torch dtype name, shape)} of a v5 file: the table of docs/SOFT_LABELS.md."""
    rows = recorded_epoch_count(encoding, epochs)
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {"augment_digests": ("uint8", (rows, DIGEST_BYTES))}
    if encoding.online:
        return shapes
    kept = encoding.kept_values(num_classes)
    if kept < num_classes:
        shapes["topk_indices"] = (index_dtype_name(num_classes), (rows, num_images, kept))
    if encoding.values == "int8":
        shapes["q_logits"] = ("uint8", (rows, num_images, kept))
        shapes["q_scale"] = ("float16", (rows, num_images))
    elif kept < num_classes:
        shapes["topk_values"] = ("float16", (rows, num_images, kept))
    else:
        shapes["logits"] = ("float16", (rows, num_images, num_classes))
    return shapes


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * _DTYPES[dtype][1]


def label_tensor_bytes(encoding: LabelEncoding, epochs: int, num_images: int, num_classes: int) -> int:
    """The tensor data of a v5 file, exactly: digests E'·8, fp16 logits E'·N·K·2, top-k values
    E'·N·k·2 + indices E'·N·k·(1|2|4), int8 E'·N·k + scales E'·N·2; online the digests of all E
    epochs."""
    shapes = label_tensor_shapes(encoding, epochs, num_images, num_classes)
    return sum(_nbytes(dtype, shape) for dtype, shape in shapes.values())


def full_fp16_logit_bytes(epochs: int, num_images: int, num_classes: int) -> int:
    """E·N·K·2: fp16 logits of every recorded position, the reference compact formats are measured
    against (what v4 stored besides its walk, and v5's `fp16` without digests and header)."""
    return epochs * num_images * num_classes * 2


def _tensor_entries_json(shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> str:
    """The header's tensor entries as safetensors writes them: by dtype, then name, back to back."""
    order = sorted(shapes, key=lambda name: (_WRITE_ORDER[_DTYPES[shapes[name][0]][0]], name))
    entries, offset = [], 0
    for name in order:
        dtype, shape = shapes[name]
        end = offset + _nbytes(dtype, shape)
        entry = {"dtype": _DTYPES[dtype][0], "shape": list(shape), "data_offsets": [offset, end]}
        entries.append(f"{json.dumps(name)}:{json.dumps(entry, separators=(',', ':'))}")
        offset = end
    return ",".join(entries)


def metadata_json_bytes(metadata: Mapping[str, str]) -> int:
    """Bytes the metadata object `{"key":"value",…}` takes in a safetensors header (escaped JSON,
    UTF-8), given the strings a writer passes (`save_soft_labels` encodes non-strings as JSON)."""
    return len(json.dumps(dict(metadata), ensure_ascii=False, separators=(",", ":")).encode())


def label_file_bytes(
    encoding: LabelEncoding, epochs: int, num_images: int, num_classes: int, *, metadata_bytes: int
) -> int:
    """Size of a v5 soft-label file: the tensors (`label_tensor_bytes`) + the safetensors header,
    whose metadata object is `metadata_bytes` long (`metadata_json_bytes` of a file's metadata:
    exact; `estimated_metadata_bytes` before the file exists)."""
    shapes = label_tensor_shapes(encoding, epochs, num_images, num_classes)
    header = len('{"__metadata__":,}') + metadata_bytes + len(_tensor_entries_json(shapes).encode())
    padded = -(-header // 8) * 8
    return 8 + padded + label_tensor_bytes(encoding, epochs, num_images, num_classes)


def _int_list_chars(digits: int, count: int) -> int:
    """Characters of json.dumps of `count` integers of `digits` digits in all: "[a, b, …]"."""
    return 2 + digits + 2 * max(count - 1, 0)


def _digits_below(n: int) -> int:
    """Digits of 0, 1, …, n − 1 written out."""
    return sum(len(str(i)) for i in range(n))


def _layout_chars(shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    listed = "; ".join(f"{name} {dtype} {list(shape)}" for name, (dtype, shape) in sorted(shapes.items()))
    return _LAYOUT_WORDS + len(listed)


def _in_header(text: str) -> int:
    """Bytes a metadata string takes in the header without its quotes (escaped, UTF-8)."""
    return len(json.dumps(text, ensure_ascii=False).encode()) - 2


def _fixed_metadata(encoding: LabelEncoding, committee_size: int) -> dict[str, str]:
    """The metadata of `stages.relabel._metadata` and `_record` with their widest usual values (the
    mixed source's text, 17-digit channel statistics, a 10-digit seed, a CUDA torch version); the
    long lists are sized apart."""
    member = {"name": "0-densenet121", "backbone": "densenet121", "model_width": 128, "cal": True,
              "num_attention_maps": 16, "cal_ratio": 0.5, "weight": 1.0}
    logits = ("(1-r)*backbone + r*cal_head logits, r = cal_ratio; BatchNorm with the statistics of each forwarded "
              "part (train mode; running statistics unchanged); each batch forwarded in 2 part(s)")
    extra: dict[str, str] = {}
    if committee_size > 1:
        logits = f"weighted mean over a committee of {committee_size} teachers of each one's {logits}"
        extra["committee"] = json.dumps([member] * committee_size)
    stream = {"seed": 2**31 - 1, "stream": "relabel", "num_images": 0, "image_size": 224, "batch_size": 20,
              "cutmix_alpha": 1.0, "min_crop_scale": 0.08, "rule": "torchvision", "resampling": "resized_crop",
              "torch": "2.14.1+cu130"}
    stats = json.dumps([0.48560743859201234] * 3)
    return {
        "batch_size": "20", "epochs": "400", "num_images": "0", "num_classes": "0", "image_size": "224",
        "topk": str(encoding.topk), "cutmix_alpha": "1.0", "min_crop_scale": "0.08", "temperature": "20.0",
        "soft_label_source": "backbone", "relabel_bn_mode": "train", "forward_splits": "2",
        "teacher_logits": logits, **extra, "cal_ratio": "0.5", "labels": "", "classes": "", "mean": stats,
        "std": stats, "augmentations": json.dumps(stream), "label_encoding": json.dumps(encoding.as_metadata()),
        "epochs_kept": "", "format": "fd2.soft_labels.v5", "layout": "",
    }


def estimated_metadata_bytes(
    num_images: int,
    num_classes: int,
    epochs_kept_count: int,
    *,
    epochs: int | None = None,
    encoding: LabelEncoding = FULL,
    class_names: Sequence[str] | None = None,
    committee_size: int = 1,
) -> int:
    """`metadata_json_bytes` of a job's soft-label file before it exists, from what submit time
    knows.

    Exact for the long parts: `labels` (N images spread evenly over K classes, as ipc·K are),
    `epochs_kept` (E' of the E = `epochs` relabel epochs: exact digits when all are kept, their mean
    otherwise) and the `layout` line. Class names, when not given, are assumed to be
    `ASSUMED_CLASS_NAME_CHARS` ASCII characters each; the scalars and texts take their widest usual
    values, so the estimate errs on the large side by a few dozen bytes.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    epochs = epochs_kept_count if epochs is None else epochs
    per_class, extra = divmod(num_images, num_classes)
    each = [len(str(c)) for c in range(num_classes)]
    label_digits = per_class * sum(each) + sum(each[:extra])
    kept_digits = (_digits_below(epochs) if epochs_kept_count >= epochs
                   else math.ceil(epochs_kept_count * _digits_below(epochs) / epochs))
    if class_names is not None:
        classes = _in_header(json.dumps(list(class_names)))
    else:  # each name in escaped quotes, \"…\", then ", "
        classes = 2 + num_classes * (ASSUMED_CLASS_NAME_CHARS + 4) + 2 * max(num_classes - 1, 0)
    fixed = _fixed_metadata(encoding, committee_size)
    fixed.update(num_images=str(num_images), num_classes=str(num_classes))
    shapes = label_tensor_shapes(encoding, epochs, num_images, num_classes)
    return (metadata_json_bytes(fixed) + _int_list_chars(label_digits, num_images) + classes
            + _int_list_chars(kept_digits, epochs_kept_count) + _layout_chars(shapes))


def estimated_label_file_bytes(
    encoding: LabelEncoding,
    epochs: int,
    num_images: int,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    committee_size: int = 1,
) -> int:
    """`label_file_bytes` with the metadata estimated (`estimated_metadata_bytes`)."""
    kept = kept_epoch_count(epochs, encoding.epoch_fraction)
    metadata = estimated_metadata_bytes(num_images, num_classes, kept, epochs=epochs, encoding=encoding,
                                        class_names=class_names, committee_size=committee_size)
    return label_file_bytes(encoding, epochs, num_images, num_classes, metadata_bytes=metadata)


def budget_candidates(num_classes: int) -> list[LabelEncoding]:
    """`BUDGET_ORDER` for `num_classes` classes: a top-k of k ≥ K keeps every class, so it stands as the
    same encoding without top-k (once, where it first comes)."""
    seen: list[LabelEncoding] = []
    for encoding in BUDGET_ORDER:
        if encoding.topk >= num_classes:
            encoding = LabelEncoding(encoding.values, 0, encoding.epoch_fraction)
        if encoding not in seen:
            seen.append(encoding)
    return seen


class LabelBudgetError(ValueError):
    """A `label_budget_bytes` that cannot be met by any encoding, or not by the one the spec names;
    `code`, `message` (cause, then fix) and JSON `details` for an API answer, `field` the spec
    field."""

    field = "label_budget_bytes"

    def __init__(self, code: str, message: str, details: dict[str, object]) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details


__all__ = [
    "ASSUMED_CLASS_NAME_CHARS",
    "BUDGET_ORDER",
    "LabelBudgetError",
    "budget_candidates",
    "estimated_label_file_bytes",
    "estimated_metadata_bytes",
    "full_fp16_logit_bytes",
    "label_file_bytes",
    "label_tensor_bytes",
    "label_tensor_shapes",
    "metadata_json_bytes",
    "recorded_epoch_count",
]
