"""One job as units that several workers can run at once (spec field `max_workers`), merged into
exactly the files an unsharded `pipeline.run` writes.

The units (`plan_shards`), each writing its outputs atomically under the job's work folder:
- `pretrain:m<i>`: member i of the teachers alone (the one teacher of a single-teacher run is
  `pretrain:m0`), in its own folder (`stages.committee.member_workdir`);
- `pretrain:scorer`: the plain cross-entropy teacher that scores the patch views, for a spec that
  trains one (`JobSpec.trains_scorer`: the published patch rule under FD²), in
  `teachers/scorer-<backbone>/`;
- `distill:c<KKKKK>`: every ipc index of the class block that starts at class KKKKK
  (`distill_batch_classes` classes; one block when it is 0), each index saved as
  `stages/distill/ipc_JJJ_cKKKKK.safetensors`;
- `distill:merge`: the blocks of each index joined into `stages/distill/ipc_JJJ.safetensors`;
- `relabel:e<SSSS>-<EEEE>`: epochs [S, E) of the relabel walk,
  `stages/relabel/epochs_SSSS_EEEE.safetensors`;
- `relabel:merge`: the epoch ranges joined into `stages/soft_labels.safetensors`;
- `evaluate:<student>`: one evaluation student (`stages/evaluate_<student>.safetensors`);
- `package`: `pipeline.run` on the finished folder, which trains nothing (every stage reuses what
  the shards saved), measures the committee, computes the metrics and writes the artifacts.

The merged files are the unsharded run's because a unit never reads another unit's random draws: a
class block's work (its patch ranking, its random streams per ipc index, the earlier indices SC
reads) is the block's own, the relabel walk draws each epoch from its own stream (soft-label formats
v3 and v4), and every student seeds its own initialisation.
Bit for bit on the same kind of device with the same thread count and library versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import read_json
from .data.dataset import DataSource
from .data.limits import DataLimits
from .pipeline import ARTIFACT_NAMES, PipelineResult, budget_as_recorded, checked_inputs, open_run, run
from .progress import EventSink, ProgressTracker, StopCheck
from .softlabels import SoftLabels
from .spec import JobSpec
from .spec_resolution import resolve_spec
from .stages.context import RunContext, stage_folder
from .stages.distill import distill_block
from .stages.distill_files import block_done, block_starts, ipc_file, load_distilled, merge_blocks
from .stages.evaluate import evaluation_student, student_file, student_names, student_steps
from .stages.package import quantize
from .stages.pretrain import load_committee, member_saved, pretrain_member, pretrain_scorer, scorer_saved
from .stages.relabel import (
    MIN_RELABEL_EPOCHS,
    SOFT_LABELS_FILE,
    epoch_ranges,
    merge_relabel_parts,
    missing_epochs,
    part_file,
    part_recorded,
    recorded,
    relabel_epochs,
)

STAGES = ("pretrain", "distill", "relabel", "evaluate", "package")
SCORER_ID = "pretrain:scorer"
_MEMBER = re.compile(r"pretrain:m(\d+)")
_BLOCK = re.compile(r"distill:c(\d{5})")
_EPOCHS = re.compile(r"relabel:e(\d{4})-(\d{4})")
_STUDENT = re.compile(r"evaluate:(\w+)")


@dataclass(frozen=True)
class Shard:
    """One unit of a job: its stable `id`, its `stage`, what it runs on (`params`: `member`,
    `scorer`, `first_class` and `num_classes`, `epochs` as [start, stop], or `student`) and the ids
    of the shards that must finish first."""

    id: str
    stage: str
    params: dict[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardResult:
    """What `run_shard` did: `ran` is False when the shard's outputs
    already existed and nothing was done.
    `pipeline_result` is the job's result for `package` (read from the
    artifacts when it had finished before)."""

    shard_id: str
    ran: bool
    message: str
    pipeline_result: PipelineResult | None = None


class ShardNotReady(RuntimeError):
    """A shard was asked to run before the shards it depends on finished; `missing` names them."""

    def __init__(self, shard_id: str, missing: list[str]) -> None:
        super().__init__(f"shard {shard_id} needs {', '.join(missing)} to finish first")
        self.shard_id, self.missing = shard_id, missing


def member_id(index: int) -> str:
    return f"pretrain:m{index}"


def block_id(first_class: int) -> str:
    return f"distill:c{first_class:05d}"


def epochs_id(epochs: range) -> str:
    return f"relabel:e{epochs.start:04d}-{epochs.stop:04d}"


def _relabel_range(spec: JobSpec, epochs: range) -> Shard:
    teachers = tuple(member_id(i) for i in range(len(spec.members)))
    return Shard(epochs_id(epochs), "relabel", {"epochs": [epochs.start, epochs.stop]}, (*teachers, "distill:merge"))


def plan_shards(
    spec: JobSpec, num_classes: int, max_workers: int | None = None, *, min_relabel_epochs: int = MIN_RELABEL_EPOCHS
) -> list[Shard]:
    """Every shard of a job on `num_classes` classes, in an order that respects the dependencies.

    pretrain members and the patch scorer (when the spec trains one) → distill blocks
    (`random` needs no teacher; the blocks also need the scorer) → distill merge →
    relabel ranges (at most `max_workers`, default the spec's, each at least
    `min_relabel_epochs` epochs; `epoch_ranges`) → relabel merge → evaluation students
    (`random` and `full_data` need neither the set nor its soft labels) → package.
    The ids depend only on the spec and the classes, and on `max_workers`
    for the relabel ranges alone.
    """
    workers = spec.max_workers if max_workers is None else max_workers
    teachers = tuple(member_id(i) for i in range(len(spec.members)))
    shards = [Shard(member_id(i), "pretrain", {"member": i}) for i in range(len(spec.members))]
    scorer = (SCORER_ID,) if spec.trains_scorer else ()
    shards += [Shard(SCORER_ID, "pretrain", {"scorer": True})] if scorer else []
    size = spec.distill_batch_classes or num_classes
    blocks = [
        Shard(block_id(s), "distill", {"first_class": s, "num_classes": min(size, num_classes - s)},
              () if spec.method == "random" else (*teachers, *scorer))
        for s in block_starts(num_classes, spec.distill_batch_classes)
    ]
    shards += [*blocks, Shard("distill:merge", "distill", {}, tuple(b.id for b in blocks))]
    ranges = [_relabel_range(spec, r) for r in epoch_ranges(spec.relabel_epochs, workers, min_relabel_epochs)]
    shards += [*ranges, Shard("relabel:merge", "relabel", {}, tuple(r.id for r in ranges))]
    merged = ("distill:merge", "relabel:merge")
    needs = {"distilled": merged, "distilled_hard_labels": merged, "random": teachers, "full_data": ()}
    students = [Shard(f"evaluate:{name}", "evaluate", {"student": name}, needs[name]) for name in student_names(spec)]
    shards += students
    shards.append(Shard("package", "package", {}, (*teachers, *scorer, "distill:merge", "relabel:merge",
                                                   *(s.id for s in students))))
    return shards


def _identify(spec: JobSpec, shard_id: str) -> tuple[str, dict[str, Any]]:
    """(stage, params) of a shard id, checked against the spec (not yet
    against the number of classes)."""
    if shard_id in ("distill:merge", "relabel:merge", "package"):
        return shard_id.split(":")[0], {}
    if shard_id == SCORER_ID and spec.trains_scorer:
        return "pretrain", {"scorer": True}
    if match := _MEMBER.fullmatch(shard_id):
        if int(match[1]) < len(spec.members):
            return "pretrain", {"member": int(match[1])}
    elif match := _BLOCK.fullmatch(shard_id):
        first, size = int(match[1]), spec.distill_batch_classes
        if first == 0 or (size and first % size == 0):
            return "distill", {"first_class": first}
    elif match := _EPOCHS.fullmatch(shard_id):
        start, stop = int(match[1]), int(match[2])
        if 0 <= start < stop <= spec.relabel_epochs:
            return "relabel", {"epochs": [start, stop]}
    elif (match := _STUDENT.fullmatch(shard_id)) and match[1] in student_names(spec):
        return "evaluate", {"student": match[1]}
    raise ValueError(f"{shard_id!r} is not a shard of this job; its shards are listed by plan_shards")


def _shard_of(spec: JobSpec, num_classes: int, shard_id: str) -> Shard:
    """The shard `shard_id` of this job with its dependencies; an epoch range of another plan
    (another `max_workers`) is one too.
    Raises ValueError for any other id."""
    stage, params = _identify(spec, shard_id)
    if stage == "relabel" and "epochs" in params:
        return _relabel_range(spec, range(*params["epochs"]))
    planned = {s.id: s for s in plan_shards(spec, num_classes, 1)}
    if shard_id not in planned:
        raise ValueError(f"{shard_id!r} is not a shard of this job; its shards are listed by plan_shards")
    return planned[shard_id]


def shard_done(spec: JobSpec | dict[str, Any], workdir: str | Path, shard_id: str) -> bool:
    """Whether the outputs of `shard_id` are in `workdir` (also when a
    later merge consumed them, or an unsharded run wrote them).
    Reads only file names and metadata: no data, no tensors."""
    spec = spec if isinstance(spec, JobSpec) else resolve_spec(spec)
    workdir = Path(workdir)
    stages = stage_folder(workdir)
    stage, params = _identify(spec, shard_id)
    if stage == "pretrain" and "scorer" in params:
        return scorer_saved(workdir, spec)
    if stage == "pretrain":
        return member_saved(workdir, spec, params["member"])
    if stage == "distill" and params:
        return block_done(stages, spec.ipc, params["first_class"])
    if stage == "distill":
        return all(ipc_file(stages, j).exists() for j in range(spec.ipc))
    if stage == "relabel":
        merged = recorded(stages / SOFT_LABELS_FILE, spec)
        return merged or bool(params) and part_recorded(part_file(stages, range(*params["epochs"])), spec)
    if stage == "evaluate":
        return student_file(stages, params["student"]).exists() or (stages / "evaluate.json").exists()
    return (workdir / "artifacts" / "report.json").exists()


def _finished_result(workdir: Path) -> PipelineResult:
    """The job's result from its artifacts, as `pipeline.run` returned it when it wrote them."""
    out = workdir / "artifacts"
    report = read_json(out / "report.json")
    return PipelineResult({name: out / name for name in ARTIFACT_NAMES}, report["metrics"], report)


def _distilled_set(ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    distilled = quantize(ctx, load_distilled(ctx))
    return distilled.images, distilled.labels


def _run_student(ctx: RunContext, name: str) -> None:
    images = labels = soft = None
    if name in ("distilled", "distilled_hard_labels"):
        images, labels = _distilled_set(ctx)
        soft = SoftLabels.load(ctx.stage_dir / SOFT_LABELS_FILE)
    # online soft labels are computed by the student from the teacher
    online = name == "distilled" and soft is not None and soft.needs_teacher
    teacher = load_committee(ctx) if name == "random" or online else None
    reporter = ctx.tracker.stage("evaluate")
    reporter.begin(student_steps(ctx, name))
    result = evaluation_student(ctx, name, teacher, images, labels, soft, reporter)
    reporter.end(f"student {name!r}: accuracy {result.accuracy:.3f}")


def _run_unit(ctx: RunContext, shard: Shard) -> None:
    """Run one shard's work in an opened run (its inputs are saved: the dependencies are done)."""
    params = shard.params
    if shard.stage == "pretrain" and "scorer" in params:
        pretrain_scorer(ctx, alone=True)
    elif shard.stage == "pretrain":
        pretrain_member(ctx, params["member"])
    elif shard.stage == "distill" and params:
        # distill_block adds the patch scorer
        teacher = None if ctx.spec.method == "random" else load_committee(ctx)
        first = params["first_class"]
        distill_block(ctx, teacher, torch.arange(first, first + params["num_classes"]))
    elif shard.stage == "distill":
        merge_blocks(ctx)
    elif shard.stage == "relabel" and params:
        images, labels = _distilled_set(ctx)
        relabel_epochs(ctx, load_committee(ctx), images, labels, range(*params["epochs"]))
    elif shard.stage == "relabel":
        merge_relabel_parts(ctx, ctx.stage_dir / SOFT_LABELS_FILE)
    else:
        _run_student(ctx, params["student"])


def _missing(spec: JobSpec, workdir: Path, shard: Shard) -> list[str]:
    """The shards `shard` still waits for.
    The relabel merge waits for the epochs no part file holds, whichever
    plan (`max_workers`) recorded the others."""
    if shard.id == "relabel:merge":
        stages = stage_folder(workdir)
        if recorded(stages / SOFT_LABELS_FILE, spec):
            return []
        return [epochs_id(gap) for gap in missing_epochs(stages, spec)]
    return [dep for dep in shard.depends_on if not shard_done(spec, workdir, dep)]


def run_shard(
    spec: JobSpec | dict[str, Any],
    dataset: DataSource,
    workdir: str | Path,
    shard_id: str,
    on_event: EventSink | None = None,
    should_stop: StopCheck | None = None,
    limits: DataLimits | None = None,
    teacher_weights: str | Path | None = None,
    drop_duplicates: bool = False,
) -> ShardResult:
    """Run one shard of the job in `workdir`, with `pipeline.run`'s arguments, checks and errors
    (DataError for bad input, StopRequested on a stop; a killed shard resumes from what it saved).

    Idempotent: a shard whose outputs exist (`shard_done`) does nothing (`ran` False, a `log` event
    says so), before the data is loaded.
    Raises ValueError for an id that is not a shard of this job and
    ShardNotReady when a shard it depends on has not finished.
    Events come from the shard's own stage, its progress 0 → 1.
    """
    spec = spec if isinstance(spec, JobSpec) else resolve_spec(spec)
    workdir = Path(workdir)
    stage, _ = _identify(spec, shard_id)
    tracker = ProgressTracker({stage: 1.0}, on_event, should_stop)
    # a label budget picks its encoding once the classes are known: a folder that holds the pick
    # stands in for it until the data is loaded (the service passes specs fitted at submit)
    spec = budget_as_recorded(spec, workdir)
    checked_inputs(spec, workdir, teacher_weights, drop_duplicates)
    if shard_done(spec, workdir, shard_id):
        message = f"shard {shard_id} already finished; nothing to do"
        tracker.stage(stage).log(message, fraction=1.0)
        return ShardResult(shard_id, False, message, _finished_result(workdir) if stage == "package" else None)
    opened = open_run(spec, dataset, workdir, on_event, should_stop, limits, teacher_weights, drop_duplicates)
    spec = opened.spec  # the budget fitted to the loaded classes
    shard = _shard_of(spec, len(opened.data.classes), shard_id)
    missing = _missing(spec, workdir, shard)
    if missing:
        raise ShardNotReady(shard_id, missing)
    if shard.stage == "package":
        result = run(spec, opened.data, workdir, on_event, should_stop, limits, teacher_weights, drop_duplicates)
        return ShardResult(shard_id, True, "artifacts written", result)
    torch.manual_seed(spec.seed)
    _run_unit(opened.context(tracker), shard)
    return ShardResult(shard_id, True, f"shard {shard_id} finished")


__all__ = [
    "MIN_RELABEL_EPOCHS",
    "STAGES",
    "Shard",
    "ShardNotReady",
    "ShardResult",
    "epoch_ranges",
    "plan_shards",
    "run_shard",
    "shard_done",
]
