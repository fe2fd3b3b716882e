"""FKD-style soft labels: teacher logits at every position of a relabel walk, replayable by any student.

Layout of `soft_labels.safetensors`, format v5 (also written into the file's own metadata, key `layout`):
- `augment_digests` uint8 [E', 8]   8 bytes of SHA-256 of each recorded epoch's choices
                                    (`fd2_core.relabel_choices`)
- teacher logits of the E' recorded epochs in the file's `label_encoding` (`fd2_core.label_formats`):
  `logits` float16 [E', N, K] (the default: every class, fp16), or with top-k `topk_values` float16
  [E', N, k] + `topk_indices` [E', N, k] in the smallest integer type that holds a class index, or 8-bit
  `q_logits` uint8 [E', N, k or K] + `q_scale` float16 [E', N] (+ `topk_indices`); `online` files store none
  (the student forwards the shipped teacher).
The walk's choices (sample order, RandomResizedCrop boxes, flips, CutMix) are not stored: metadata
`augmentations` names the seed, stream, sizes and crop rule that regenerate epoch e from its own generator
(seeded by run seed, stream, e), and replay compares each regenerated epoch with its digest before using it;
a mismatch (another torch version can change a stream) is an `AugmentationMismatch`, never silent.
`epochs_kept` lists the E' recorded epochs of the `epochs` E the student trains (all of them unless the
encoding records a subset; student epoch e replays recorded epoch epochs_kept[e mod E']). Batches are
consecutive chunks of `batch_size` positions of an epoch's order. Images are in normalised space (`mean`/`std`
in the metadata); each box is cropped and resized to `image_size` by the rule `SoftLabels.resampling` names.

Formats v1–v4 stored the choices as tensors: `order` int32 [E, N], `boxes` float32 [E, N, 4], `flips` uint8
[E, N], `cutmix_perm` int32 [E, N], `cutmix_box` int32 [E, B, 4], `cutmix_lam` float32 [E, B], and `logits`
float16 [E, N, K] or `topk_values` float16 + `topk_indices` int32 [E, N, k]. They replay as recorded:
format v4 with torchvision's resized_crop (antialiased bilinear, `fd2_core.crops.resized_crop`), v1–v3 with
torchvision.ops.roi_align(aligned=True, sampling_ratio=2). v3 and v4 drew each epoch from its own stream (v4:
torchvision's crop rule, v3: boxes clamped into the image), so `fd2_core.soft_label_compaction` can rewrite
them as v5 files; v2 drew the whole walk from one stream, v1 has no protocol metadata.

How the logits were computed (metadata, formats v2–v5):
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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from .atomic import save_tensors
from .augment import RESIZED_CROP, ROI_ALIGN, CropFlip, CutMix, Resampling, apply_crop_flip, apply_cutmix
from .label_codec import LOGIT_KEYS, decode_logits, encode_logits
from .label_formats import FULL, LabelEncoding
from .relabel_choices import VERSION_KEYS, AugmentationStream, EpochChoices

FORMAT = "fd2.soft_labels.v5"
FORMAT_V4 = "fd2.soft_labels.v4"
FORMAT_V3 = "fd2.soft_labels.v3"
FORMAT_V2 = "fd2.soft_labels.v2"
FORMAT_V1 = "fd2.soft_labels.v1"
READABLE_FORMATS = (FORMAT, FORMAT_V4, FORMAT_V3, FORMAT_V2, FORMAT_V1)
FORMAT_VERSIONS = {FORMAT: 5, FORMAT_V4: 4, FORMAT_V3: 3, FORMAT_V2: 2, FORMAT_V1: 1}
PART_FORMAT = "fd2.soft_labels.v5.part"  # a range of epochs of a v5 recording; not a file a student replays
PART_FORMAT_V4 = "fd2.soft_labels.v4.part"
PART_FORMAT_V3 = "fd2.soft_labels.v3.part"
OLD_PART_FORMATS = (PART_FORMAT_V4, PART_FORMAT_V3)  # never joined into a v5 file: recorded again
PROTOCOL_KEYS = ("soft_label_source", "relabel_bn_mode", "forward_splits")
V5_KEYS = ("augmentations", "label_encoding", "epochs_kept", "epochs", "num_classes", "batch_size")
DIGESTS = "augment_digests"
CACHED_POSITIONS = 2_000_000  # regenerated choices a SoftLabels keeps (~50 MB)
V1_MIXED = "(1-r)*backbone + r*cal_head"  # the v1 `teacher_logits` value of a CAL teacher

TeacherLogits = Callable[[torch.Tensor], torch.Tensor]  # augmented images [b,3,S,S] → logits [b,K]


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
    _epoch_cache: dict[int, EpochChoices] = field(default_factory=dict, repr=False, compare=False)

    @property
    def format_version(self) -> int:
        """5 (choices regenerated from seeds), 4 (torchvision's crops, one stream per epoch), 3 (clamped crops,
        one stream per epoch), 2 (one stream for the whole walk) or 1 (no protocol metadata)."""
        return FORMAT_VERSIONS[self.metadata["format"]]

    @cached_property
    def stream(self) -> AugmentationStream | None:
        """What regenerates the walk's choices (format v5); None for files that store them."""
        if self.format_version < 5:
            return None
        return AugmentationStream.from_metadata(json.loads(self.metadata["augmentations"]))

    @cached_property
    def encoding(self) -> LabelEncoding:
        """How the logits are stored; an older file holds full fp16 logits or fp16 top-k."""
        if self.format_version >= 5:
            return LabelEncoding.from_metadata(json.loads(self.metadata["label_encoding"]))
        if "topk_values" in self.tensors:
            return LabelEncoding("fp16", int(self.tensors["topk_values"].shape[-1]))
        return FULL

    @cached_property
    def recorded_epochs(self) -> list[int]:
        """The relabel epochs whose logits the file holds, in order (all E but with epoch subsampling)."""
        if self.format_version >= 5:
            return [int(e) for e in json.loads(self.metadata["epochs_kept"])]
        return list(range(self.epochs))

    @property
    def epochs(self) -> int:
        """Epochs E the student trains (v5: also when only a subset was recorded)."""
        if self.format_version >= 5:
            return int(self.metadata["epochs"])
        return int(self.tensors["order"].shape[0])

    @property
    def num_images(self) -> int:
        stream = self.stream
        return stream.num_images if stream is not None else int(self.tensors["order"].shape[1])

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
    def needs_teacher(self) -> bool:
        """True for `online` files: the student computes the logits with the shipped teacher."""
        return self.encoding.online

    @property
    def resampling(self) -> Resampling:
        """How the recorded boxes are resampled on replay: resized_crop (v4, v5 of the torchvision rule) or
        roi_align (v1–v3 and their v5 rewrites); `batch` hands it on in its CropFlip, so `apply_crop_flip`
        replays any file as it was recorded."""
        if self.stream is not None:
            return self.stream.resampling
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

    def choices(self, row: int) -> EpochChoices:
        """The choices of recorded epoch number `row` (of `recorded_epochs`); v5 regenerates them and raises
        `AugmentationMismatch` when they are not the recorded ones. Regenerated epochs are kept while they
        hold at most `CACHED_POSITIONS` positions in all (about 26 bytes each, what v4 stored), so a
        shuffled replay of a small set regenerates each epoch once; in order, one epoch at a time suffices."""
        if row in self._epoch_cache:
            self._epoch_cache[row] = self._epoch_cache.pop(row)  # most recently used last
        else:
            t = self.tensors
            if self.stream is None:
                choices = EpochChoices(t["order"][row], t["boxes"][row].float(), t["flips"][row],
                                       t["cutmix_perm"][row], t["cutmix_box"][row], t["cutmix_lam"][row])
            else:
                epoch = self.recorded_epochs[row]
                choices = self.stream.checked_epoch(epoch, bytes(t[DIGESTS][row].tolist()))
            keep = max(1, CACHED_POSITIONS // max(1, self.num_images))
            while len(self._epoch_cache) >= keep:
                self._epoch_cache.pop(next(iter(self._epoch_cache)))
            self._epoch_cache[row] = choices
        return self._epoch_cache[row]

    def verify_augmentations(self) -> None:
        """Regenerate every recorded epoch and compare it with its digest (v5; older files store their
        choices). Raises AugmentationMismatch at the first that differs."""
        if self.stream is not None:
            for row, epoch in enumerate(self.recorded_epochs):
                self.stream.checked_epoch(epoch, bytes(self.tensors[DIGESTS][row].tolist()))

    def batch(self, step: int) -> tuple[torch.Tensor, CropFlip, CutMix | None, torch.Tensor | None]:
        """(sample indices, crop/flip, CutMix, full teacher logits [b,K]) of global batch number `step`; the
        logits are None for an `online` file (`needs_teacher`)."""
        e, b = divmod(step, self.batches_per_epoch)
        row = e % len(self.recorded_epochs)
        idx, crop, cutmix = self.choices(row).batch(b, self.batch_size, self.resampling)
        sl = slice(b * self.batch_size, b * self.batch_size + idx.numel())
        stored = {key: self.tensors[key][row, sl] for key in LOGIT_KEYS if key in self.tensors}
        logits = decode_logits(stored, self.num_classes)
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


def record_soft_labels(
    teacher: TeacherLogits,
    images: torch.Tensor,
    *,
    epochs: int | range,
    stream: AugmentationStream,
    encoding: LabelEncoding = FULL,
    kept: Sequence[int] | None = None,
    forward_splits: int = 1,
    num_classes: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Walk the set over `epochs` (a count E = range(E), or a range of epochs), augment + CutMix each batch and
    record the teacher's logits at the epochs of `kept` (default: every epoch) inside that range, in
    `encoding`; tensors [recorded epochs in range, …] in the v5 layout above. An online encoding forwards no
    teacher and records only the digests of every epoch.

    Epoch e draws only from `stream.epoch(e)`, so recording range(a, b) and range(b, c) and joining them
    equals recording range(a, c). `teacher` is called once per part of `forward_parts(batch, forward_splits)`
    (published relabel: a batch of 20 as two halves), so a train-mode BatchNorm sees each part's statistics;
    the random choices do not depend on the split. `on_batch(done, total)` counts this call's batches.
    `num_classes` K shapes the tensors of a range that holds no recorded epoch (default: the teacher's
    output width; ValueError when neither is known).
    """
    walk = range(epochs) if isinstance(epochs, int) else epochs
    chosen = set(walk if encoding.online or kept is None else kept)
    recorded = [e for e in walk if e in chosen]
    n = images.shape[0]
    nb = math.ceil(n / stream.batch_size)
    digests = torch.zeros(len(recorded), 8, dtype=torch.uint8)
    epochs_encoded: list[dict[str, torch.Tensor]] = []  # encoded per epoch: memory is the file's, not fp32's
    total = len(recorded) * (1 if encoding.online else nb)
    for r, epoch in enumerate(recorded):
        choices = stream.epoch(epoch)
        digests[r] = torch.tensor(list(choices.digest()), dtype=torch.uint8)
        if encoding.online:
            if on_batch is not None:
                on_batch(r + 1, total)
            continue
        rows: list[torch.Tensor] = []
        for b in range(nb):
            idx, crop, cutmix = choices.batch(b, stream.batch_size, stream.resampling)
            x = apply_cutmix(apply_crop_flip(images[idx.to(images.device)], crop), cutmix)
            with torch.no_grad():
                for part in forward_parts(x.shape[0], forward_splits):
                    rows.append(teacher(x[part]).float().cpu())
            if on_batch is not None:
                on_batch(r * nb + b + 1, total)
        epochs_encoded.append(encode_logits(torch.cat(rows).unsqueeze(0), encoding))
    out = {DIGESTS: digests}
    if encoding.online:
        return out
    if not epochs_encoded:
        if num_classes is None:
            raise ValueError("no epoch of this range is recorded: pass num_classes to shape its tensors")
        out.update(encode_logits(torch.zeros(0, n, num_classes), encoding))
        return out
    out.update({key: torch.cat([epoch[key] for epoch in epochs_encoded]) for key in epochs_encoded[0]})
    return out


def _encoded(metadata: dict[str, object]) -> dict[str, str]:
    missing = [key for key in (*PROTOCOL_KEYS, *V5_KEYS) if key not in metadata]
    if missing:
        raise ValueError(f"soft-label metadata lacks {', '.join(missing)}")
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def save_soft_labels(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    """Write a v5 file; `metadata` must name how the logits were computed (`PROTOCOL_KEYS`) and how the walk
    regenerates and the logits are stored (`V5_KEYS`)."""
    meta = _encoded(metadata)
    _check_rows(json.loads(meta["epochs_kept"]), int(meta["epochs"]), int(tensors[DIGESTS].shape[0]))
    meta["format"] = FORMAT
    meta["layout"] = layout_of(tensors)
    return save_tensors(path, tensors, meta)


def _check_rows(kept: list[int], epochs: int, rows: int) -> None:
    """`epochs_kept` must name each file row's epoch: increasing, inside range(epochs), one per row;
    ValueError otherwise (the rows would be replayed with another epoch's crops)."""
    if kept != sorted(set(kept)) or any(not 0 <= e < epochs for e in kept) or len(kept) != rows:
        raise ValueError(f"epochs_kept must list {rows} increasing epochs below {epochs}, one per recorded "
                         f"row; got {kept[:10]}{'…' if len(kept) > 10 else ''}")


def layout_of(tensors: dict[str, torch.Tensor]) -> str:
    """One line naming the file's tensors and how its walk regenerates (the module docstring, docs/
    SOFT_LABELS.md, says the rest): a few hundred bytes where the whole docstring would outweigh the
    logits of a compressed file."""
    shapes = "; ".join(f"{key} {str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
                       for key, value in sorted(tensors.items()))
    return (f"{FORMAT}: {shapes}. Rows are recorded epochs (epochs_kept) x positions of the epoch's order; the "
            "order, crops, flips and CutMix regenerate from `augmentations` and are checked against "
            "augment_digests; logits in `label_encoding` (docs/SOFT_LABELS.md)")


def _rows_in(kept: Sequence[int], epochs: range) -> list[int]:
    return [e for e in kept if epochs.start <= e < epochs.stop]


@dataclass
class SoftLabelPart:
    """Epochs [first, stop) of a recording (its rows: the recorded epochs inside), with the metadata the whole
    file will have; `format` is the part file's format (`PART_FORMAT`, or an older part's, which never
    joins)."""

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
        if found not in (PART_FORMAT, *OLD_PART_FORMATS):
            raise ValueError(f"{path}: not a {PART_FORMAT} file")
        first, stop = json.loads(metadata.pop("part_epochs"))
        return cls(tensors, metadata, range(first, stop), found)

    def epochs_of(self, epochs: range) -> SoftLabelPart:
        """The part cut to `epochs`, which must lie inside its own."""
        if not (self.epochs.start <= epochs.start and epochs.stop <= self.epochs.stop):
            raise ValueError(f"epochs {epochs.start}-{epochs.stop} are not inside the part's "
                             f"{self.epochs.start}-{self.epochs.stop}")
        if self.format != PART_FORMAT:
            cut = slice(epochs.start - self.epochs.start, epochs.stop - self.epochs.start)
        else:
            mine = _rows_in(json.loads(self.metadata["epochs_kept"]), self.epochs)
            taken = [i for i, e in enumerate(mine) if epochs.start <= e < epochs.stop]
            cut = slice(taken[0], taken[-1] + 1) if taken else slice(0, 0)
        return SoftLabelPart({k: v[cut] for k, v in self.tensors.items()}, self.metadata, epochs, self.format)


def save_soft_label_part(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object], epochs: range
) -> Path:
    """Write epochs `epochs` of a recording (tensors [recorded epochs inside, …]) with the whole file's
    `metadata`."""
    kept = metadata["epochs_kept"]
    rows = len(_rows_in(json.loads(kept) if isinstance(kept, str) else kept, epochs))
    if int(tensors[DIGESTS].shape[0]) != rows:
        raise ValueError(f"a part of epochs {epochs.start}-{epochs.stop} records {rows} epochs, not "
                         f"{tensors[DIGESTS].shape[0]}")
    meta = _encoded(metadata)
    meta.update(format=PART_FORMAT, part_epochs=json.dumps([epochs.start, epochs.stop]))
    return save_tensors(path, tensors, meta)


def join_soft_label_parts(
    parts: Sequence[SoftLabelPart], epochs: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the whole recording from parts that cover range(epochs) one after another.

    Raises ValueError when the parts leave a gap, overlap, were recorded with different metadata (another
    protocol, encoding or torch version), or any part is not of the current `PART_FORMAT` (an older part is
    another layout: it must be recorded again).
    """
    ordered = sorted(parts, key=lambda part: part.epochs.start)
    reached = 0
    for part in ordered:
        if part.format != PART_FORMAT:
            raise ValueError(f"soft-label part of epochs {part.epochs.start}-{part.epochs.stop} is a {part.format} "
                             f"file, another layout: it does not join a {FORMAT} recording")
        if part.epochs.start != reached:
            raise ValueError(f"soft-label parts do not join: epoch {reached} is followed by a part from "
                             f"epoch {part.epochs.start}")
        if _without_versions(part.metadata) != _without_versions(ordered[0].metadata):
            differing = sorted(k for k in {*part.metadata, *ordered[0].metadata}
                               if part.metadata.get(k) != ordered[0].metadata.get(k))
            raise ValueError(f"soft-label part of epochs {part.epochs.start}-{part.epochs.stop} was recorded with "
                             f"other metadata ({', '.join(differing)})")
        reached = part.epochs.stop
    if reached != epochs:
        raise ValueError(f"soft-label parts cover epochs 0-{reached}, not 0-{epochs}")
    keys = ordered[0].tensors.keys()
    return {k: torch.cat([part.tensors[k] for part in ordered]) for k in keys}, dict(ordered[0].metadata)


def _without_versions(metadata: dict[str, str]) -> dict[str, object]:
    """Metadata with the walk's library versions left out: parts recorded by other versions join
    when their digests regenerate here (the relabel stage checks each part)."""
    out: dict[str, object] = dict(metadata)
    if "augmentations" in metadata:
        walk = json.loads(metadata["augmentations"])
        out["augmentations"] = {k: v for k, v in walk.items() if k not in VERSION_KEYS}
    return out


def replay(
    images: torch.Tensor, soft: SoftLabels, device: torch.device | str = "cpu", teacher: TeacherLogits | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (augmented normalised images, teacher logits) exactly as recorded, batch by batch; an online file
    needs `teacher` (called per forwarded part, as at relabel). Raises ValueError when it is missing."""
    if soft.needs_teacher and teacher is None:
        raise ValueError("these soft labels are online: pass the teacher that computes them")
    for step in range(len(soft)):
        idx, crop, cutmix, logits = soft.batch(step)
        x = apply_cutmix(apply_crop_flip(images[idx.to(images.device)], crop), cutmix).to(device)
        if logits is None:
            assert teacher is not None
            with torch.no_grad():
                logits = torch.cat([teacher(x[part]).float() for part in soft.parts(step)])
        yield x, logits.to(device)
