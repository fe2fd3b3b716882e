"""FKD-style soft labels: recorded augmentations + teacher logits, replayable by any student.

Layout of `soft_labels.safetensors` (also written into the file's own metadata, key `layout`):
- `order`        int32   [E, N]     sample visited at each position of epoch e; batches are consecutive
                                    chunks of `batch_size` positions
- `boxes`        float32 [E, N, 4]  RandomResizedCrop box (x1, y1, x2, y2) in source pixels, per position
- `flips`        uint8   [E, N]     horizontal flip after the crop
- `cutmix_perm`  int32   [E, N]     partner position inside the same batch (batch-local index)
- `cutmix_box`   int32   [E, B, 4]  pasted box (x1, y1, x2, y2) per batch; all zeros = no CutMix
- `cutmix_lam`   float32 [E, B]     share of the original image kept
- `logits`       float16 [E, N, K]  teacher logits of the augmented, mixed image at each position
  or, with top-k, `topk_values` float16 [E, N, k] and `topk_indices` int32 [E, N, k].
Images are in normalised space (`mean`/`std` in the metadata); crops are applied with
torchvision.ops.roi_align(aligned=True, sampling_ratio=2) and resized to `image_size`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .atomic import save_tensors
from .augment import CropFlip, CutMix, apply_crop_flip, apply_cutmix, sample_crop_flip, sample_cutmix

FORMAT = "fd2.soft_labels.v1"
MISSING_LOGIT = -1.0e4  # logits dropped by top-k: softmax gives them ~0 probability


@dataclass
class SoftLabels:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def epochs(self) -> int:
        return int(self.tensors["order"].shape[0])

    @property
    def num_images(self) -> int:
        return int(self.tensors["order"].shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.metadata["batch_size"])

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def __len__(self) -> int:
        return self.epochs * self.batches_per_epoch

    def batch(self, step: int) -> tuple[torch.Tensor, CropFlip, CutMix | None, torch.Tensor]:
        """(sample indices, crop/flip, CutMix, full teacher logits) of global batch number `step`."""
        e, b = divmod(step, self.batches_per_epoch)
        sl = slice(b * self.batch_size, min((b + 1) * self.batch_size, self.num_images))
        t = self.tensors
        idx = t["order"][e, sl].long()
        crop = CropFlip(t["boxes"][e, sl].float(), t["flips"][e, sl].bool())
        box = tuple(int(v) for v in t["cutmix_box"][e, b])
        cutmix = None
        if any(box):
            cutmix = CutMix(t["cutmix_perm"][e, sl].long(), float(t["cutmix_lam"][e, b]), box)
        if "logits" in t:
            logits = t["logits"][e, sl].float()
        else:
            values, indices = t["topk_values"][e, sl].float(), t["topk_indices"][e, sl].long()
            logits = torch.full((idx.numel(), self.num_classes), MISSING_LOGIT)
            logits.scatter_(1, indices, values)
        return idx, crop, cutmix, logits

    @classmethod
    def load(cls, path: str | Path) -> SoftLabels:
        tensors = {}
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        return cls(tensors, metadata)


def record_soft_labels(
    teacher: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    cutmix_alpha: float,
    min_crop_scale: float,
    topk: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Walk the set for `epochs`, augment + CutMix each batch, store teacher logits (fp16) and the choices."""
    n, _, _, size = images.shape
    nb = math.ceil(n / batch_size)
    order = torch.empty(epochs, n, dtype=torch.int32)
    boxes = torch.empty(epochs, n, 4)
    flips = torch.empty(epochs, n, dtype=torch.uint8)
    perm = torch.zeros(epochs, n, dtype=torch.int32)
    cm_box = torch.zeros(epochs, nb, 4, dtype=torch.int32)
    cm_lam = torch.ones(epochs, nb)
    logits_all: list[torch.Tensor] = []
    total = epochs * nb
    for e in range(epochs):
        order[e] = torch.randperm(n, generator=generator).int()
        for b in range(nb):
            sl = slice(b * batch_size, min((b + 1) * batch_size, n))
            idx = order[e, sl].long()
            crop = sample_crop_flip(idx.numel(), size, generator, scale=(min_crop_scale, 1.0))
            cutmix = sample_cutmix(idx.numel(), size, cutmix_alpha, generator)
            boxes[e, sl], flips[e, sl] = crop.boxes, crop.flips.to(torch.uint8)
            if cutmix is not None:
                perm[e, sl] = cutmix.permutation.int()
                cm_box[e, b] = torch.tensor(cutmix.box, dtype=torch.int32)
                cm_lam[e, b] = cutmix.lam
            x = apply_cutmix(apply_crop_flip(images[idx.to(images.device)], crop), cutmix)
            with torch.no_grad():
                logits_all.append(teacher(x).float().cpu())
            if on_batch is not None:
                on_batch(e * nb + b + 1, total)
    logits = torch.cat(logits_all).view(epochs, n, -1)
    out = {
        "order": order,
        "boxes": boxes,
        "flips": flips,
        "cutmix_perm": perm,
        "cutmix_box": cm_box,
        "cutmix_lam": cm_lam,
    }
    if topk and topk < logits.shape[-1]:
        values, indices = logits.topk(topk, dim=-1)
        out["topk_values"], out["topk_indices"] = values.half(), indices.int()
    else:
        out["logits"] = logits.half()
    return out


def save_soft_labels(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["format"] = FORMAT
    meta["layout"] = __doc__ or ""
    return save_tensors(path, tensors, meta)


def replay(
    images: torch.Tensor, soft: SoftLabels, device: torch.device | str = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (augmented normalised images, teacher logits) exactly as recorded, batch by batch."""
    for step in range(len(soft)):
        idx, crop, cutmix, logits = soft.batch(step)
        x = apply_cutmix(apply_crop_flip(images[idx.to(images.device)], crop), cutmix)
        yield x.to(device), logits.to(device)
