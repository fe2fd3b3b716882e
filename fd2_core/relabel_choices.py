"""The relabel walk's random choices, regenerated from their seed instead of stored.

Each relabel epoch e draws, from its own CPU generator seeded by (run seed, stream, e), the sample
order, then per batch a RandomResizedCrop box and flip per sample and one CutMix (partner
permutation, box, λ). Those draws are all a soft-label file needs besides the logits, so format v5
stores only what regenerates them (`AugmentationStream`: seed, stream, crop rule, sizes, the torch
and numpy versions) plus an 8-byte digest per recorded epoch. Replay draws the epoch again and
compares digests first: another torch or numpy version (or a change of a generator's algorithm) can
change a stream, and a silent change would pair the logits with other crops. Generators stay on the
CPU, where torch's streams do not depend on the device.

Two crop rules: `torchvision` (RandomResizedCrop.get_params's rule, integer boxes; format v4's
walk) and `clamped` (boxes drawn once and clamped into the image, float corners; the walk of format
v3 files), so files of either walk can be kept without their stored choices
(`fd2_core.soft_label_compaction`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .augment import RESIZED_CROP, ROI_ALIGN, CropFlip, CutMix, Resampling, sample_crop_flip, sample_cutmix
from .runtime import generator

CropRule = Literal["torchvision", "clamped"]
CROP_RULES: tuple[CropRule, ...] = ("torchvision", "clamped")
RESAMPLINGS = (RESIZED_CROP, ROI_ALIGN)
DIGEST_BYTES = 8
# the order in which an epoch's choices enter its digest (and the keys of `EpochChoices.tensors`)
CHOICE_KEYS = ("order", "boxes", "flips", "cutmix_perm", "cutmix_box", "cutmix_lam")
# the library versions in a walk's metadata: checked by the digests, not by equality
VERSION_KEYS = ("torch", "numpy")


class AugmentationMismatch(ValueError):
    """The regenerated choices of an epoch differ from the ones the logits were recorded with."""


def sample_clamped_crop_flip(
    batch: int,
    size: int,
    g: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropFlip:
    """The crop rule of soft-label format v3: one draw of area and log-ratio per sample, width and
    height clamped to [1, size], a uniform float corner, then flips p = ½ (boxes [B, 4] float32)."""
    area = size * size
    target = area * torch.empty(batch).uniform_(scale[0], scale[1], generator=g)
    aspect = torch.exp(torch.empty(batch).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g))
    w = torch.sqrt(target * aspect).clamp(1.0, size)
    h = torch.sqrt(target / aspect).clamp(1.0, size)
    x1 = torch.rand(batch, generator=g) * (size - w)
    y1 = torch.rand(batch, generator=g) * (size - h)
    flips = torch.rand(batch, generator=g) < 0.5
    return CropFlip(torch.stack([x1, y1, x1 + w, y1 + h], dim=1).float(), flips)


@dataclass
class EpochChoices:
    """One epoch's choices; N images, B = ⌈N / batch_size⌉ batches. `cutmix_box` all zeros = no
    CutMix in that batch."""

    order: torch.Tensor  # int32 [N] sample at each position
    boxes: torch.Tensor  # float32 [N, 4] crop box per position, source pixels
    flips: torch.Tensor  # uint8 [N]
    cutmix_perm: torch.Tensor  # int32 [N] batch-local partner
    cutmix_box: torch.Tensor  # int32 [B, 4]
    cutmix_lam: torch.Tensor  # float32 [B]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in CHOICE_KEYS}

    def digest(self) -> bytes:
        """8 bytes of SHA-256 over every choice's raw bytes, in `CHOICE_KEYS` order."""
        h = hashlib.sha256()
        for key in CHOICE_KEYS:
            h.update(getattr(self, key).contiguous().numpy().tobytes())
        return h.digest()[:DIGEST_BYTES]

    def batch(self, b: int, batch_size: int, resampling: Resampling) -> tuple[torch.Tensor, CropFlip, CutMix | None]:
        """(sample indices int64, crop/flip, CutMix or None) of batch `b`."""
        sl = slice(b * batch_size, min((b + 1) * batch_size, self.order.numel()))
        crop = CropFlip(self.boxes[sl], self.flips[sl].bool(), resampling)
        box = tuple(int(v) for v in self.cutmix_box[b])
        cutmix = None
        if any(box):
            cutmix = CutMix(self.cutmix_perm[sl].long(), float(self.cutmix_lam[b]), box)
        return self.order[sl].long(), crop, cutmix


def draw_epoch(
    g: torch.Generator,
    num_images: int,
    image_size: int,
    batch_size: int,
    cutmix_alpha: float,
    min_crop_scale: float,
    rule: CropRule = "torchvision",
) -> EpochChoices:
    """An epoch's choices from `g`, in the relabel walk's order of draws: the order, then per batch
    its crops and its CutMix. Raises ValueError for an unknown `rule`."""
    if rule not in CROP_RULES:
        raise ValueError(f"unknown crop rule {rule!r}; expected one of {CROP_RULES}")
    n, nb = num_images, math.ceil(num_images / batch_size)
    choices = EpochChoices(
        order=torch.randperm(n, generator=g).int(),
        boxes=torch.empty(n, 4),
        flips=torch.empty(n, dtype=torch.uint8),
        cutmix_perm=torch.zeros(n, dtype=torch.int32),
        cutmix_box=torch.zeros(nb, 4, dtype=torch.int32),
        cutmix_lam=torch.ones(nb),
    )
    for b in range(nb):
        sl = slice(b * batch_size, min((b + 1) * batch_size, n))
        count = sl.stop - sl.start
        scale = (min_crop_scale, 1.0)
        if rule == "torchvision":
            crop = sample_crop_flip(count, image_size, g, scale=scale)
        else:
            crop = sample_clamped_crop_flip(count, image_size, g, scale=scale)
        cutmix = sample_cutmix(count, image_size, cutmix_alpha, g)
        choices.boxes[sl], choices.flips[sl] = crop.boxes, crop.flips.to(torch.uint8)
        if cutmix is not None:
            choices.cutmix_perm[sl] = cutmix.permutation.int()
            choices.cutmix_box[b] = torch.tensor(cutmix.box, dtype=torch.int32)
            choices.cutmix_lam[b] = cutmix.lam
    return choices


@dataclass(frozen=True)
class AugmentationStream:
    """What regenerates every epoch of a relabel walk (stored as the file's `augmentations`
    metadata): epoch e's generator is `runtime.generator(seed, stream, e)`."""

    seed: int
    stream: str
    num_images: int
    image_size: int
    batch_size: int
    cutmix_alpha: float
    min_crop_scale: float
    rule: CropRule = "torchvision"
    resampling: Resampling = RESIZED_CROP
    torch_version: str = torch.__version__
    numpy_version: str = np.__version__  # CutMix's λ comes from numpy's Beta

    def versions_differ(self) -> list[str]:
        """The libraries whose version here differs from the recording's, as `name recorded → here`."""
        pairs = (("torch", self.torch_version, torch.__version__), ("numpy", self.numpy_version, np.__version__))
        return [f"{name} {then} → {now}" for name, then, now in pairs if then != now]

    def epoch(self, e: int) -> EpochChoices:
        return draw_epoch(generator(self.seed, self.stream, e), self.num_images, self.image_size,
                          self.batch_size, self.cutmix_alpha, self.min_crop_scale, self.rule)

    def checked_epoch(self, e: int, digest: bytes) -> EpochChoices:
        """Epoch e regenerated; raises AugmentationMismatch when it is not the recorded one."""
        choices = self.epoch(e)
        found = choices.digest()
        if found != digest:
            changed = self.versions_differ()
            if changed:
                why = (f"It was recorded with other library versions ({', '.join(changed)}), which draw another "
                       "stream: replay it with the recording's versions, or relabel again with these")
            else:
                why = ("The versions are the recording's, so the file's digests or its `augmentations` metadata "
                       "differ from what was recorded (a damaged or edited file): download it again, or relabel")
            raise AugmentationMismatch(
                f"relabel epoch {e}: the regenerated crops, flips and CutMix differ from the recorded ones "
                f"(digest {found.hex()} instead of {digest.hex()}). {why}")
        return choices

    def as_metadata(self) -> dict[str, Any]:
        return {"seed": self.seed, "stream": self.stream, "num_images": self.num_images,
                "image_size": self.image_size, "batch_size": self.batch_size, "cutmix_alpha": self.cutmix_alpha,
                "min_crop_scale": self.min_crop_scale, "rule": self.rule, "resampling": self.resampling,
                "torch": self.torch_version, "numpy": self.numpy_version}

    @classmethod
    def from_metadata(cls, fields: dict[str, Any]) -> AugmentationStream:
        """Raises ValueError for a rule or resampling this version does not know (a newer file)."""
        if fields["rule"] not in CROP_RULES or fields["resampling"] not in RESAMPLINGS:
            raise ValueError(f"unknown crop rule {fields['rule']!r} or resampling {fields['resampling']!r}: the file "
                             "was written by a newer version; replay it with that version")
        return cls(int(fields["seed"]), str(fields["stream"]), int(fields["num_images"]), int(fields["image_size"]),
                   int(fields["batch_size"]), float(fields["cutmix_alpha"]), float(fields["min_crop_scale"]),
                   fields["rule"], fields["resampling"], str(fields["torch"]), str(fields.get("numpy", "unknown")))
