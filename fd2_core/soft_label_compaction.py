"""Rewrite a soft-label file of format v3 or v4 as v5: the stored choices dropped, regenerated from
their seed instead.

A v3 or v4 file stores every epoch's order, boxes, flips and CutMix (about 40 % of a file of 20
classes), although each epoch was drawn from its own generator seeded by (run seed, stream, e). The
files do not name the seed, so the caller gives it (the job's `spec.seed`; stream `relabel` for a
job's set, `baseline-relabel` for its random baseline). Every stored epoch is compared with the
regenerated one before anything is dropped: a wrong seed, another stream or a torch version whose
generators draw differently is refused, never written. The logits stay as stored (fp16, all classes
or top-k with the smallest index type), so a student replays the rewritten file exactly as the
original.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .label_codec import index_dtype
from .relabel_choices import CHOICE_KEYS, AugmentationMismatch, AugmentationStream
from .softlabels import DIGESTS, SoftLabels

_RULES = {3: "clamped", 4: "torchvision"}
_NEEDED = ("image_size", "cutmix_alpha", "min_crop_scale", "batch_size", "num_classes")


def stored_choices(stream: AugmentationStream, epochs: int) -> dict[str, torch.Tensor]:
    """The choices of epochs 0..E−1 stacked as formats v1–v4 stored them ([E, N], [E, N, 4], …)."""
    drawn = [stream.epoch(e).tensors() for e in range(epochs)]
    return {key: torch.stack([epoch[key] for epoch in drawn]) for key in CHOICE_KEYS}


def compact_soft_labels(
    soft: SoftLabels, seed: int, stream: str = "relabel"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of the v5 file that replays like `soft`, a v3 or v4 file recorded with
    `seed` and `stream`; write them with `softlabels.save_soft_labels`.

    Raises ValueError for another format or a file without the walk's sizes in its metadata, and
    AugmentationMismatch naming the first epoch and choice that the seed does not regenerate.
    """
    version = soft.format_version
    if version not in _RULES:
        raise ValueError(f"only soft-label formats v3 and v4 draw each epoch from its own seeded stream; this "
                         f"file is v{version}" + (", already compact" if version >= 5 else ""))
    missing = [key for key in _NEEDED if key not in soft.metadata]
    if missing:
        raise ValueError(f"the file's metadata lacks {', '.join(missing)}: its walk cannot be regenerated")
    meta = soft.metadata
    walk = AugmentationStream(seed, stream, soft.num_images, int(meta["image_size"]), soft.batch_size,
                              float(meta["cutmix_alpha"]), float(meta["min_crop_scale"]), _RULES[version],
                              soft.resampling)
    digests = torch.zeros(soft.epochs, 8, dtype=torch.uint8)
    for e in range(soft.epochs):
        drawn, kept = walk.epoch(e), soft.choices(e)
        for key in CHOICE_KEYS:
            if not torch.equal(getattr(drawn, key), getattr(kept, key).to(getattr(drawn, key).dtype)):
                raise AugmentationMismatch(
                    f"epoch {e}: the stored {key} are not what seed {seed}, stream {stream!r} draws with torch "
                    f"{torch.__version__} ({_RULES[version]} crops); check the seed and stream the file was "
                    "recorded with, or compact it with the torch version that recorded it")
        digests[e] = torch.tensor(list(drawn.digest()), dtype=torch.uint8)
    if "topk_values" in soft.tensors:
        logits = {"topk_values": soft.tensors["topk_values"],
                  "topk_indices": soft.tensors["topk_indices"].to(index_dtype(soft.num_classes))}
    else:
        logits = {"logits": soft.tensors["logits"]}
    carried = {k: v for k, v in meta.items() if k not in ("format", "layout")}
    metadata: dict[str, Any] = {
        **carried,
        "epochs": soft.epochs,
        "num_images": soft.num_images,
        "augmentations": walk.as_metadata(),
        "label_encoding": soft.encoding.as_metadata(),
        "epochs_kept": list(range(soft.epochs)),
        "compacted_from": json.dumps({"format": meta["format"], "seed": seed, "stream": stream}),
    }
    return {DIGESTS: digests, **logits}, metadata
