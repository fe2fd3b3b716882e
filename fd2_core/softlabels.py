"""FKD-style soft labels: recorded augmentations + teacher logits, replayable by any student.

Layout of `soft_labels.safetensors` (also written into the file's own metadata, key `layout`):
- `order`        int32   [E, N]     sample visited at each position of epoch e; batches are consecutive
                                    chunks of `batch_size` positions
- `boxes`        float32 [E, N, 4]  RandomResizedCrop box (x1, y1, x2, y2) in source pixels, per position
                                    (format v4: integer-valued, end exclusive, torchvision's get_params rule)
- `flips`        uint8   [E, N]     horizontal flip after the crop
- `cutmix_perm`  int32   [E, N]     partner position inside the same batch (batch-local index)
- `cutmix_box`   int32   [E, B, 4]  pasted box (x1, y1, x2, y2) per batch; all zeros = no CutMix
- `cutmix_lam`   float32 [E, B]     share of the original image kept
- `logits`       float16 [E, N, K]  teacher logits of the augmented, mixed image at each position
  or, with top-k, `topk_values` float16 [E, N, k] and `topk_indices` int32 [E, N, k].
Images are in normalised space (`mean`/`std` in the metadata); each box is cropped and resized to `image_size`
by the rule `SoftLabels.resampling` names: format v4 with torchvision's resized_crop (antialiased bilinear,
`fd2_core.crops.resized_crop`), formats v1–v3 with torchvision.ops.roi_align(aligned=True, sampling_ratio=2).

How the random choices were drawn (formats v3 and v4): each epoch e from its own generator, seeded by (run seed,
stream, e), so a range of epochs can be recorded alone and the ranges joined in epoch order
(`join_soft_label_parts`) give the same file as one recording of every epoch. Format v2 files drew the whole
walk from one stream; their layout and metadata are the same, and they replay the same way. Formats v1–v3 drew
boxes clamped into the image instead of torchvision's redraws, so an older file is another augmentation stream:
it replays as recorded but is never reused for a new recording.

How the logits were computed (metadata, formats v2–v4):
- `soft_label_source`  backbone | cal | mixed — the backbone's own classifier, the CAL head, or
                       (1 − r)·backbone + r·CAL head with r = `cal_ratio`;
- `relabel_bn_mode`    train = BatchNorm normalised with the statistics of each forwarded part (the teacher's
                       running statistics untouched), eval = running statistics;
- `forward_splits`     P: each recorded batch was forwarded in P consecutive parts (`forward_parts`: sizes
                       differ by at most one, the larger first, empty parts skipped); a student replaying the
                       published protocol uses these parts as its micro-batches.
Format v1 files have none of these keys: one forward pass per batch in eval mode, the source named by
`teacher_logits`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .atomic import save_tensors
from .augment import (
    RESIZED_CROP,
    ROI_ALIGN,
    CropFlip,
    CutMix,
    Resampling,
    apply_crop_flip,
    apply_cutmix,
    sample_crop_flip,
    sample_cutmix,
)

FORMAT = "fd2.soft_labels.v4"
FORMAT_V3 = "fd2.soft_labels.v3"
FORMAT_V2 = "fd2.soft_labels.v2"
FORMAT_V1 = "fd2.soft_labels.v1"
READABLE_FORMATS = (FORMAT, FORMAT_V3, FORMAT_V2, FORMAT_V1)
FORMAT_VERSIONS = {FORMAT: 4, FORMAT_V3: 3, FORMAT_V2: 2, FORMAT_V1: 1}
PART_FORMAT = "fd2.soft_labels.v4.part"  # a range of epochs of a v4 recording; not a file a student replays
PART_FORMAT_V3 = "fd2.soft_labels.v3.part"  # never joined into a v4 file: another augmentation stream
PROTOCOL_KEYS = ("soft_label_source", "relabel_bn_mode", "forward_splits")
MISSING_LOGIT = -1.0e4  # logits dropped by top-k: softmax gives them ~0 probability
V1_MIXED = "(1-r)*backbone + r*cal_head"  # the v1 `teacher_logits` value of a CAL teacher


def forward_parts(batch: int, parts: int) -> list[slice]:
    """Consecutive slices of a batch of `batch` items in `parts` parts (published relabel: 20 → 10 + 10).

    Sizes differ by at most one, the larger first (torch.tensor_split); empty parts are left out, so a short
    last batch may have fewer parts.
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    base, extra = divmod(batch, parts)
    slices, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        if size:
            slices.append(slice(start, start + size))
        start += size
    return slices


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

    @property
    def format_version(self) -> int:
        """4 (torchvision's crops, one stream per epoch), 3 (clamped crops, one stream per epoch), 2 (one stream
        for the whole walk) or 1 (no protocol metadata)."""
        return FORMAT_VERSIONS[self.metadata["format"]]

    @property
    def resampling(self) -> Resampling:
        """How the recorded boxes are resampled on replay: resized_crop (v4) or roi_align (v1–v3); `batch`
        hands it on in its CropFlip, so `apply_crop_flip` replays any file as it was recorded."""
        return RESIZED_CROP if self.format_version >= 4 else ROI_ALIGN

    @property
    def soft_label_source(self) -> str:
        """backbone | cal | mixed; for a v1 file read from `teacher_logits` ("unknown" when absent)."""
        if self.format_version == 1:
            named = self.metadata.get("teacher_logits")
            return {V1_MIXED: "mixed", "backbone": "backbone"}.get(named or "", "unknown")
        return self.metadata["soft_label_source"]

    @property
    def bn_mode(self) -> str:
        """train | eval: how the teacher's BatchNorm normalised at relabel (v1: eval)."""
        return "eval" if self.format_version == 1 else self.metadata["relabel_bn_mode"]

    @property
    def forward_splits(self) -> int:
        """Parts each recorded batch was forwarded in (v1: 1)."""
        return 1 if self.format_version == 1 else int(self.metadata["forward_splits"])

    def parts(self, step: int) -> list[slice]:
        """Batch-local slices of the parts the teacher forwarded for global batch `step`."""
        b = step % self.batches_per_epoch
        size = min(self.batch_size, self.num_images - b * self.batch_size)
        return forward_parts(size, self.forward_splits)

    def __len__(self) -> int:
        return self.epochs * self.batches_per_epoch

    def batch(self, step: int) -> tuple[torch.Tensor, CropFlip, CutMix | None, torch.Tensor]:
        """(sample indices, crop/flip, CutMix, full teacher logits) of global batch number `step`."""
        e, b = divmod(step, self.batches_per_epoch)
        sl = slice(b * self.batch_size, min((b + 1) * self.batch_size, self.num_images))
        t = self.tensors
        idx = t["order"][e, sl].long()
        crop = CropFlip(t["boxes"][e, sl].float(), t["flips"][e, sl].bool(), self.resampling)
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
        if metadata.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{path}: not a {' or '.join(READABLE_FORMATS)} file")
        return cls(tensors, metadata)


EpochGenerator = Callable[[int], torch.Generator]  # epoch e → the generator all of epoch e's choices come from


def record_soft_labels(
    teacher: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    epochs: int | range,
    batch_size: int,
    generator: EpochGenerator,
    cutmix_alpha: float,
    min_crop_scale: float,
    topk: int = 0,
    forward_splits: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Walk the set for `epochs` (a count E = range(E), or a range of epochs), augment + CutMix each batch,
    store teacher logits (fp16) and the choices; tensors [len(epochs), …] in the layout above.

    Epoch e draws only from `generator(e)` (formats v3 and v4), so recording range(a, b) and range(b, c) and joining
    them equals recording range(a, c). `teacher` is called once per part of `forward_parts(batch,
    forward_splits)` (published relabel: a batch of 20 as two halves), so a train-mode BatchNorm sees each part's
    statistics; the random choices do not depend on the split. `on_batch(done, total)` counts this call's batches.
    """
    walk = range(epochs) if isinstance(epochs, int) else epochs
    count = len(walk)
    n, _, _, size = images.shape
    nb = math.ceil(n / batch_size)
    order = torch.empty(count, n, dtype=torch.int32)
    boxes = torch.empty(count, n, 4)
    flips = torch.empty(count, n, dtype=torch.uint8)
    perm = torch.zeros(count, n, dtype=torch.int32)
    cm_box = torch.zeros(count, nb, 4, dtype=torch.int32)
    cm_lam = torch.ones(count, nb)
    logits_all: list[torch.Tensor] = []
    total = count * nb
    for e, epoch in enumerate(walk):
        g = generator(epoch)
        order[e] = torch.randperm(n, generator=g).int()
        for b in range(nb):
            sl = slice(b * batch_size, min((b + 1) * batch_size, n))
            idx = order[e, sl].long()
            crop = sample_crop_flip(idx.numel(), size, g, scale=(min_crop_scale, 1.0))
            cutmix = sample_cutmix(idx.numel(), size, cutmix_alpha, g)
            boxes[e, sl], flips[e, sl] = crop.boxes, crop.flips.to(torch.uint8)
            if cutmix is not None:
                perm[e, sl] = cutmix.permutation.int()
                cm_box[e, b] = torch.tensor(cutmix.box, dtype=torch.int32)
                cm_lam[e, b] = cutmix.lam
            x = apply_cutmix(apply_crop_flip(images[idx.to(images.device)], crop), cutmix)
            with torch.no_grad():
                for part in forward_parts(x.shape[0], forward_splits):
                    logits_all.append(teacher(x[part]).float().cpu())
            if on_batch is not None:
                on_batch(e * nb + b + 1, total)
    logits = torch.cat(logits_all).view(count, n, -1)
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


def _encoded(metadata: dict[str, object]) -> dict[str, str]:
    missing = [key for key in PROTOCOL_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"soft-label metadata lacks {', '.join(missing)}")
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def save_soft_labels(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    """Write a v4 file; `metadata` must name how the logits were computed (`PROTOCOL_KEYS`)."""
    meta = _encoded(metadata)
    meta["format"] = FORMAT
    meta["layout"] = __doc__ or ""
    return save_tensors(path, tensors, meta)


@dataclass
class SoftLabelPart:
    """Epochs [first, stop) of a recording, with the metadata the whole file will have; `format` is the part
    file's format (`PART_FORMAT`, or `PART_FORMAT_V3` for a part of an older recording, which never joins)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    epochs: range
    format: str = PART_FORMAT

    @classmethod
    def load(cls, path: str | Path) -> SoftLabelPart:
        tensors = {}
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
        found = metadata.pop("format", None)
        if found not in (PART_FORMAT, PART_FORMAT_V3):
            raise ValueError(f"{path}: not a {PART_FORMAT} file")
        first, stop = json.loads(metadata.pop("part_epochs"))
        return cls(tensors, metadata, range(first, stop), found)

    def epochs_of(self, epochs: range) -> SoftLabelPart:
        """The part cut to `epochs`, which must lie inside its own."""
        if not (self.epochs.start <= epochs.start and epochs.stop <= self.epochs.stop):
            raise ValueError(f"epochs {epochs.start}-{epochs.stop} are not inside the part's "
                             f"{self.epochs.start}-{self.epochs.stop}")
        cut = slice(epochs.start - self.epochs.start, epochs.stop - self.epochs.start)
        return SoftLabelPart({k: v[cut] for k, v in self.tensors.items()}, self.metadata, epochs, self.format)


def save_soft_label_part(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object], epochs: range
) -> Path:
    """Write epochs `epochs` of a recording (tensors [len(epochs), …]) with the whole file's `metadata`."""
    if int(tensors["order"].shape[0]) != len(epochs):
        raise ValueError(f"a part of epochs {epochs.start}-{epochs.stop} holds {tensors['order'].shape[0]} epochs")
    meta = _encoded(metadata)
    meta.update(format=PART_FORMAT, part_epochs=json.dumps([epochs.start, epochs.stop]))
    return save_tensors(path, tensors, meta)


def join_soft_label_parts(
    parts: Sequence[SoftLabelPart], epochs: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the whole recording from parts that cover range(epochs) one after another.

    Raises ValueError when the parts leave a gap, overlap, were recorded with different metadata, or any part
    is not of the current `PART_FORMAT` (a v3 part is another augmentation stream: it must be recorded again).
    """
    ordered = sorted(parts, key=lambda part: part.epochs.start)
    reached = 0
    for part in ordered:
        if part.format != PART_FORMAT:
            raise ValueError(f"soft-label part of epochs {part.epochs.start}-{part.epochs.stop} is a {part.format} "
                             f"file, another augmentation stream: it does not join a {FORMAT} recording")
        if part.epochs.start != reached:
            raise ValueError(f"soft-label parts do not join: epoch {reached} is followed by a part from "
                             f"epoch {part.epochs.start}")
        if part.metadata != ordered[0].metadata:
            raise ValueError(f"soft-label part of epochs {part.epochs.start}-{part.epochs.stop} was recorded with "
                             "other metadata")
        reached = part.epochs.stop
    if reached != epochs:
        raise ValueError(f"soft-label parts cover epochs 0-{reached}, not 0-{epochs}")
    keys = ordered[0].tensors.keys()
    return {k: torch.cat([part.tensors[k] for part in ordered]) for k in keys}, dict(ordered[0].metadata)


def replay(
    images: torch.Tensor, soft: SoftLabels, device: torch.device | str = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (augmented normalised images, teacher logits) exactly as recorded, batch by batch."""
    for step in range(len(soft)):
        idx, crop, cutmix, logits = soft.batch(step)
        x = apply_cutmix(apply_crop_flip(images[idx.to(images.device)], crop), cutmix)
        yield x.to(device), logits.to(device)
