"""Stage 3 — record FKD-style soft labels for a set of images (distilled or random real).

Published relabel: the teacher's logits of the chosen source (default the backbone's own
classifier), BatchNorm in train mode on each forwarded part of a batch (default two halves), the
stored running statistics untouched. A committee's soft labels are the weighted mean of its members'
logits (`committee.ensemble_logits`). Crops are torchvision's RandomResizedCrop, drawn and resampled
as torchvision does. Every epoch draws from its own stream, so the file keeps only what regenerates
the walk (soft-label format v5), and a range of epochs can be recorded alone (`relabel_epochs`, one
shard of `fd2_core.shards`) and the ranges joined (`merge_relabel_parts`) into the very file
`relabel` writes. The logits are stored in the spec's encoding (`soft_label_values`, `topk`,
`label_epoch_fraction`; `fd2_core.label_formats`), which the protocol check includes: a file or part
of another encoding or an older format is recorded again, never reused or joined (students still
replay older files as they were recorded)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..label_codec import kept_epochs
from ..label_formats import LabelEncoding, kept_epoch_count
from ..models import FD2Model
from ..progress import StageReporter, unit_tracker
from ..relabel_choices import VERSION_KEYS, AugmentationMismatch, AugmentationStream
from ..softlabels import (
    DIGESTS,
    FORMAT,
    PART_FORMAT,
    SoftLabelPart,
    SoftLabels,
    TeacherLogits,
    join_soft_label_parts,
    record_soft_labels,
    save_soft_label_part,
    save_soft_labels,
)
from ..spec import JobSpec
from .committee import Committee, as_committee, ensemble_logits, member_fields, relabel_members
from .context import RunContext

SOFT_LABELS_FILE = "soft_labels.safetensors"
# under the stage folder: the epoch ranges of relabel shards before they are joined
PARTS_FOLDER = "relabel"

_SOURCE_TEXT = {
    "backbone": "backbone classifier logits",
    "cal": "CAL head logits W(100 z)",
    "mixed": "(1-r)*backbone + r*cal_head logits, r = cal_ratio",
}
_MODE_TEXT = {
    "train": "BatchNorm with the statistics of each forwarded part (train mode; running statistics unchanged)",
    "eval": "BatchNorm with the running statistics (eval mode)",
}


def describe_logits(source: str, bn_mode: str, forward_splits: int) -> str:
    """One line saying which logits a soft-label file holds and how they were computed
    (metadata text)."""
    return f"{_SOURCE_TEXT[source]}; {_MODE_TEXT[bn_mode]}; each batch forwarded in {forward_splits} part(s)"


def protocol_matches(soft: SoftLabels, spec: JobSpec) -> bool:
    """True when a recorded file used the source, BatchNorm mode and forward split the spec asks
    for, and stores its logits in the spec's encoding (`label_formats`)."""
    return (soft.soft_label_source, soft.bn_mode, soft.forward_splits, soft.encoding) == (
        spec.soft_label_source,
        spec.relabel_bn_mode,
        spec.relabel_forward_splits,
        LabelEncoding.from_spec(spec).for_classes(soft.num_classes),
    )


def augmentation_stream(spec: JobSpec, num_images: int, stream: str) -> AugmentationStream:
    """The relabel walk of `num_images` images: epoch e draws from the generator seeded by (seed,
    stream, e) alone, with torchvision's crop rule (soft-label format v5)."""
    return AugmentationStream(spec.seed, stream, int(num_images), spec.image_size, spec.relabel_batch_size,
                              spec.cutmix_alpha, spec.min_crop_scale)


def recorded_epochs(spec: JobSpec, stream: str) -> list[int]:
    """The relabel epochs whose logits are recorded: all, or the encoding's seeded subset."""
    encoding = LabelEncoding.from_spec(spec)
    count = kept_epoch_count(spec.relabel_epochs, encoding.epoch_fraction)
    return kept_epochs(spec.relabel_epochs, count, spec.seed, stream)


def _metadata_of(path: Path) -> dict[str, str]:
    """A safetensors file's metadata alone (a full soft-label file can hold gigabytes of logits)."""
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


# what a file's walk may differ in and still be the spec's: the set's size comes with the set, and
# the library versions are checked by the digests (`verified_here`)
_WALK_FREE_KEYS = ("num_images", *VERSION_KEYS)


def walk_matches(metadata: dict[str, str], spec: JobSpec, stream: str) -> bool:
    """Whether a v5 file's or part's metadata names the walk (seed, stream, sizes, crop rule) and the
    recorded epochs that `spec` records on `stream`."""
    try:
        walk, kept = json.loads(metadata["augmentations"]), json.loads(metadata["epochs_kept"])
    except (KeyError, ValueError):
        return False
    expected = augmentation_stream(spec, 0, stream).as_metadata()

    def fixed(fields: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in fields.items() if k not in _WALK_FREE_KEYS}

    return fixed(walk) == fixed(expected) and kept == recorded_epochs(spec, stream)


def verified_here(path: Path) -> bool:
    """Whether a v5 file or part recorded with other library versions still regenerates here (every
    digest compared); True at once when the versions are these."""
    metadata = _metadata_of(path)
    stream = AugmentationStream.from_metadata(json.loads(metadata["augmentations"]))
    if not stream.versions_differ():
        return True
    loaded = SoftLabelPart.load(path) if metadata.get("format") == PART_FORMAT else SoftLabels.load(path)
    kept = json.loads(metadata["epochs_kept"])
    epochs = loaded.epochs if isinstance(loaded, SoftLabelPart) else range(int(metadata["epochs"]))
    rows = [e for e in kept if e in epochs]
    digests = loaded.tensors[DIGESTS]
    try:
        for row, epoch in enumerate(rows):
            stream.checked_epoch(epoch, bytes(digests[row].tolist()))
    except AugmentationMismatch:
        return False
    return True


def recorded(path: Path, spec: JobSpec, stream: str = "relabel") -> bool:
    """Whether `path` holds soft labels of the current format recorded with the spec's protocol,
    encoding and walk; reads only the file's metadata (and, for a file of other library versions,
    regenerates its walk). An older format is another augmentation stream, so it does not count."""
    if not path.exists():
        return False
    metadata = _metadata_of(path)
    return (metadata.get("format") == FORMAT and protocol_matches(SoftLabels({}, metadata), spec)
            and walk_matches(metadata, spec, stream) and verified_here(path))


def reusable(path: Path, spec: JobSpec, stream: str = "relabel") -> SoftLabels | None:
    """The soft labels at `path` when `recorded` says they are this spec's; None otherwise (they are
    recorded again, as a new run would record them)."""
    return SoftLabels.load(path) if recorded(path, spec, stream) else None


@contextlib.contextmanager
def teacher_logits(ctx: RunContext, teacher: FD2Model | Committee) -> Iterator[TeacherLogits]:
    """The relabel's logits of augmented images [b,3,S,S] → [b,K] (the spec's source, BatchNorm mode
    and precision), for the block: what `relabel` records, and what a student of `online` soft
    labels computes instead of reading them. Raises ValueError when the source needs a CAL head the
    teacher lacks."""
    spec = ctx.spec
    committee = as_committee(ctx, teacher)
    if spec.soft_label_source != "backbone" and any(m.model.cal_head is None for m in committee.members):
        raise ValueError(f"soft_label_source {spec.soft_label_source!r} needs the CAL head (method fd2, cal on)")

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        with ctx.autocast():
            return ensemble_logits(committee, x, spec.soft_label_source)

    with relabel_members(committee, spec.relabel_bn_mode):
        yield logits_of


def _record(
    ctx: RunContext,
    teacher: FD2Model | Committee,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    epochs: range,
    stream: str,
    on_batch: Callable[[int, int], None],
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(tensors of `epochs`, the whole file's metadata): the one recording both `relabel` and
    `relabel_epochs` run."""
    spec = ctx.spec
    committee = as_committee(ctx, teacher)
    images = ctx.normalize(images_u8).float()
    walk = augmentation_stream(spec, images.shape[0], stream)
    encoding = LabelEncoding.from_spec(spec).for_classes(ctx.num_classes)
    kept = recorded_epochs(spec, stream)
    with teacher_logits(ctx, committee) as logits_of:
        tensors = record_soft_labels(
            logits_of,
            images,
            epochs=epochs,
            stream=walk,
            encoding=encoding,
            kept=kept,
            forward_splits=spec.relabel_forward_splits,
            num_classes=ctx.num_classes,
            on_batch=on_batch,
        )
    metadata = _metadata(ctx, images.shape[0], labels, committee)
    metadata.update(augmentations=walk.as_metadata(), label_encoding=encoding.as_metadata(), epochs_kept=kept)
    return tensors, metadata


def relabel_all_epochs(
    ctx: RunContext,
    teacher: FD2Model | Committee,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    path: Path,
    stream: str = "relabel",
    parent: StageReporter | None = None,
) -> SoftLabels:
    """Soft labels for `images_u8` (uint8 [N,3,S,S]); reuses the file when it already exists in the
    current format with this protocol, else records every epoch (format v5).

    A recording in one piece, for the random baseline inside `evaluate` and for benchmarks that
    relabel a set of their own; a job's relabel stage is `relabel`. With a `parent` reporter (the
    baseline) it only keeps polling the stop flag through the parent and emits no stage events of
    its own.
    """
    spec = ctx.spec
    reporter = parent or ctx.tracker.stage("relabel")
    if parent is None:
        reporter.begin(1)
    existing = reusable(path, spec, stream)
    if existing is not None:
        if parent is None:
            reporter.log(f"{path.name} already recorded; reusing it")
            reporter.end()
        return existing
    if path.exists() and parent is None:
        reporter.log(f"{path.name} was recorded with another relabel protocol; recording it again")

    def on_batch(done: int, total: int) -> None:
        if parent is None:
            reporter.total = total
            reporter.step(done)
        else:
            parent.poll()

    tensors, metadata = _record(ctx, teacher, images_u8, labels, range(spec.relabel_epochs), stream, on_batch)
    save_soft_labels(path, tensors, metadata)
    if parent is None:
        reporter.end()
    return SoftLabels.load(path)


# A relabel shard loads the data, the teachers and the set before its first batch; at least this
# many epochs keep that a small share of its work (the paper presets' 400 epochs split into at most
# 16 ranges).
MIN_RELABEL_EPOCHS = 25


def epoch_ranges(epochs: int, max_workers: int, min_epochs: int = MIN_RELABEL_EPOCHS) -> list[range]:
    """range(epochs) in at most `max_workers` consecutive ranges of whole
    epochs, each at least `min_epochs` long (one range when `epochs` is
    shorter); sizes differ by at most one, the larger first."""
    if max_workers < 1 or min_epochs < 1:
        raise ValueError(f"max_workers and min_epochs must be at least 1, got {max_workers} and {min_epochs}")
    count = max(1, min(max_workers, epochs // min_epochs))
    base, extra = divmod(epochs, count)
    ranges, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def relabel(
    ctx: RunContext, teacher: FD2Model | Committee, images_u8: torch.Tensor, labels: torch.Tensor
) -> SoftLabels:
    """Stage 3: the soft labels of the set (uint8 [N,3,S,S], labels [N]) in
    `stages/soft_labels.safetensors`.

    The stage runs its units in order, as the shards of `fd2_core.shards` do: the relabel walk in
    one range of epochs (`relabel_epochs`), then the join of the ranges into the file
    (`merge_relabel_parts`). A file already recorded with this protocol is reused; one recorded with
    another protocol is recorded again.
    """
    path = ctx.stage_dir / SOFT_LABELS_FILE
    existing = reusable(path, ctx.spec)
    if existing is not None:
        reporter = ctx.tracker.stage("relabel")
        reporter.begin(1)
        reporter.log(f"{path.name} already recorded; reusing it")
        reporter.end()
        return existing
    again = f"{path.name} was recorded with another relabel protocol; recording it again" if path.exists() else ""
    ranges = epoch_ranges(ctx.spec.relabel_epochs, 1)
    for i, epochs in enumerate(ranges):
        tracker = unit_tracker(ctx.tracker, "relabel", i, len(ranges), begin_message=again if i == 0 else "")
        relabel_epochs(dataclasses.replace(ctx, tracker=tracker), teacher, images_u8, labels, epochs,
                       end_message="relabel finished")
    return merge_relabel_parts(ctx, path)


def part_file(stage_dir: Path, epochs: range) -> Path:
    """Where a relabel shard saves epochs [start, stop):
    `stages/relabel/epochs_SSSS_EEEE.safetensors`."""
    return stage_dir / PARTS_FOLDER / f"epochs_{epochs.start:04d}_{epochs.stop:04d}.safetensors"


def part_path(ctx: RunContext, epochs: range) -> Path:
    return part_file(ctx.stage_dir, epochs)


def relabel_epochs(
    ctx: RunContext,
    teacher: FD2Model | Committee,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    epochs: range,
    stream: str = "relabel",
    end_message: str = "",
) -> Path:
    """Record only `epochs` of the relabel walk of `images_u8` into their part file (`part_path`,
    atomic; skipped when it exists). The part holds exactly those epochs of what
    `relabel_all_epochs` records. One unit of the relabel stage (`relabel`), or one shard of
    `fd2_core.shards`."""
    path = part_path(ctx, epochs)
    reporter = ctx.tracker.stage("relabel")
    reporter.begin(1)
    if part_recorded(path, ctx.spec):
        reporter.log(f"epochs {epochs.start}-{epochs.stop} already recorded; reusing them")
        reporter.end()
        return path

    def on_batch(done: int, total: int) -> None:
        reporter.total = total
        reporter.step(done)

    tensors, metadata = _record(ctx, teacher, images_u8, labels, epochs, stream, on_batch)
    save_soft_label_part(path, tensors, metadata, epochs)
    reporter.end(end_message or f"relabel epochs {epochs.start}-{epochs.stop} recorded")
    return path


def part_recorded(path: Path, spec: JobSpec) -> bool:
    """Whether `path` is a part file of the current format recorded with the spec's protocol,
    encoding and walk (`recorded`'s checks); an older part, or one of another encoding or walk, is
    recorded again and never joined."""
    if not path.exists():
        return False
    metadata = _metadata_of(path)
    if metadata.get("format") != PART_FORMAT:
        return False
    return (protocol_matches(SoftLabels({}, {**metadata, "format": FORMAT}), spec)
            and walk_matches(metadata, spec, "relabel") and verified_here(path))


def _saved_parts(stage_dir: Path, spec: JobSpec) -> list[tuple[range, Path]]:
    """Every saved part file of the current format and the spec's protocol with its epochs, in
    file-name order."""
    parts = []
    for path in sorted((stage_dir / PARTS_FOLDER).glob("epochs_*.safetensors")):
        first, stop = (int(v) for v in path.stem.removeprefix("epochs_").split("_"))
        if part_recorded(path, spec):
            parts.append((range(first, stop), path))
    return parts


def _joining_parts(parts: list[tuple[range, Path]], epochs: int) -> tuple[list[tuple[Path, range]], list[range]]:
    """(the parts to join with the epochs taken from each, the epochs no part holds): from epoch 0
    on, the part that holds the next epoch and reaches furthest. Parts of two plans (another
    `max_workers`) may overlap; every part is a slice of the same walk, so any of them serves."""
    chain: list[tuple[Path, range]] = []
    gaps: list[range] = []
    reached = 0
    while reached < epochs:
        holding = [(r, path) for r, path in parts if r.start <= reached < r.stop]
        if holding:
            r, path = max(holding, key=lambda item: item[0].stop)
            chain.append((path, range(reached, r.stop)))
            reached = r.stop
        else:
            after = min((r.start for r, _ in parts if r.start > reached), default=epochs)
            gaps.append(range(reached, after))
            reached = after
    return chain, gaps


def missing_epochs(stage_dir: Path, spec: JobSpec) -> list[range]:
    """The ranges of relabel epochs no saved part file of the spec's protocol holds (empty:
    `merge_relabel_parts` can join them)."""
    return _joining_parts(_saved_parts(stage_dir, spec), spec.relabel_epochs)[1]


def merge_relabel_parts(ctx: RunContext, path: Path) -> SoftLabels:
    """Join the saved epoch ranges in epoch order into `path`, the file `relabel` writes when it
    records every epoch at once (same tensors, same metadata), then remove the part files; a file at
    `path` with this protocol is kept as it is. Raises ValueError naming the first epochs no part
    holds."""
    existing = reusable(path, ctx.spec)
    parts = _saved_parts(ctx.stage_dir, ctx.spec)
    if existing is None:
        chain, gaps = _joining_parts(parts, ctx.spec.relabel_epochs)
        if gaps:
            raise ValueError(f"relabel epochs {gaps[0].start}-{gaps[0].stop} are not recorded yet: their relabel "
                             "shard has not finished")
        pieces = [SoftLabelPart.load(part).epochs_of(taken) for part, taken in chain]
        tensors, metadata = join_soft_label_parts(pieces, ctx.spec.relabel_epochs)
        save_soft_labels(path, tensors, dict(metadata))
        existing = SoftLabels.load(path)
    # older-format parts too
    for part in (ctx.stage_dir / PARTS_FOLDER).glob("epochs_*.safetensors"):
        part.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # a folder that still holds something stays
        (ctx.stage_dir / PARTS_FOLDER).rmdir()
    return existing


def _metadata(ctx: RunContext, num_images: int, labels: torch.Tensor, committee: Committee) -> dict[str, object]:
    spec = ctx.spec
    logits = describe_logits(spec.soft_label_source, spec.relabel_bn_mode, spec.relabel_forward_splits)
    extra: dict[str, object] = {}
    if len(committee) > 1:
        logits = f"weighted mean over a committee of {len(committee)} teachers of each one's {logits}"
        extra["committee"] = [{"name": m.name, **member_fields(m)} for m in committee.members]
    return {
        "batch_size": spec.relabel_batch_size,
        "epochs": spec.relabel_epochs,
        "num_images": int(num_images),
        "num_classes": ctx.num_classes,
        "image_size": spec.image_size,
        "topk": spec.topk,
        "cutmix_alpha": spec.cutmix_alpha,
        "min_crop_scale": spec.min_crop_scale,
        "temperature": spec.eval_temperature,
        "soft_label_source": spec.soft_label_source,
        "relabel_bn_mode": spec.relabel_bn_mode,
        "forward_splits": spec.relabel_forward_splits,
        "teacher_logits": logits,
        **extra,
        "cal_ratio": spec.cal_ratio,
        "labels": labels.tolist(),
        "classes": ctx.data.classes,
        "mean": list(ctx.data.mean),
        "std": list(ctx.data.std),
    }
