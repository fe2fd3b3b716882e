"""Sharded jobs (fd2_core.shards): the plan, and the shards run in any order their dependencies
allow give the files of an unsharded `pipeline.run`, tensor for tensor; finished shards do nothing,
killed ones resume, old soft-label files and another `max_workers` keep a work folder usable."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from old_soft_labels import write_old_format
from pipeline_helpers import TINY_DATA, tiny_spec
from safetensors import safe_open

import fd2_core.relabel_choices as relabel_choices_module
import fd2_core.stages.distill_files as distill_files
import fd2_core.stages.fadrm_phases as fadrm_phases
from fd2_core.cost import DatasetSize, stage_image_passes
from fd2_core.data.dataset import load_dataset
from fd2_core.distilled import SoftLabelReplay
from fd2_core.label_codec import kept_epochs
from fd2_core.label_formats import LabelEncoding, kept_epoch_count
from fd2_core.pipeline import run
from fd2_core.relabel_choices import AugmentationStream
from fd2_core.shards import (
    MIN_RELABEL_EPOCHS,
    ShardNotReady,
    epoch_ranges,
    plan_shards,
    run_shard,
    shard_done,
)
from fd2_core.softlabels import (
    FORMAT_V2,
    SoftLabelPart,
    SoftLabels,
    join_soft_label_parts,
    record_soft_labels,
    save_soft_label_part,
)
from fd2_core.spec import ValidationError
from fd2_core.spec_compat import spec_changes
from fd2_core.spec_resolution import resolve_spec

TWO_CONVNETS = [{"backbone": "convnet", "model_width": 8}, {"backbone": "convnet", "model_width": 12, "weight": 3}]
CONFIGS = {  # ipc 2 with SC on, two class blocks or more, relabel in two epoch ranges or more
    "fd2-sre2l": tiny_spec(ipc=2, distill_batch_classes=3, relabel_epochs=4, max_workers=3),
    "fd2-fadrm": tiny_spec(ipc=2, base="fadrm+", fadrm_phase_steps=[2, 2, 3], distill_batch_classes=2,
                           relabel_epochs=3, max_workers=2),
    "committee": tiny_spec(ipc=2, committee=TWO_CONVNETS, distill_batch_classes=2, relabel_epochs=3, max_workers=3),
    # the published patch rule under FD²: one more shard pretrains the
    # plain scorer the blocks select with (with the rest of the published
    # data path: one crop per step, JPEG storage of every finished index)
    "fd2-published": tiny_spec(ipc=2, patch_rule="published", distill_crop="batch", synthetic_format="jpeg",
                               distill_batch_classes=2, relabel_epochs=2, max_workers=2),
}


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset(TINY_DATA, 32, seed=0)


@pytest.fixture(scope="module")
def plain(tiny_data, tmp_path_factory):
    """An unsharded run of each config, made once."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp(f"plain-{name}")
            run(CONFIGS[name], tiny_data, made[name])
        return made[name]

    return get


def _run_shuffled(raw: dict, data, workdir: Path, seed: int = 0) -> list[str]:
    """Every shard of the plan (epoch ranges of one epoch or more), each picked at random among
    those whose dependencies finished; returns the order."""
    rng, done, order = random.Random(seed), set(), []
    pending = plan_shards(resolve_spec(raw), len(data.classes), min_relabel_epochs=1)
    while pending:
        shard = rng.choice([s for s in pending if set(s.depends_on) <= done])
        assert run_shard(raw, data, workdir, shard.id).ran, shard.id
        done.add(shard.id)
        order.append(shard.id)
        pending.remove(shard)
    return order


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def _assert_same_file(a: Path, b: Path) -> None:
    """The same tensors and metadata (safetensors writes its metadata in a
    per-process order, so not bytes)."""
    (ta, ma), (tb, mb) = _tensors(a), _tensors(b)
    assert ma == mb, a
    assert ta.keys() == tb.keys(), a
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), (a, key)


def _assert_same_job(plain: Path, sharded: Path, ipc: int) -> None:
    for j in range(ipc):
        _assert_same_file(plain / "stages" / "distill" / f"ipc_{j:03d}.safetensors",
                          sharded / "stages" / "distill" / f"ipc_{j:03d}.safetensors")
    _assert_same_file(plain / "stages" / "soft_labels.safetensors", sharded / "stages" / "soft_labels.safetensors")
    # committee members, the scorer
    for teacher in (plain / "teachers").glob("*/stages/teacher.safetensors"):
        _assert_same_file(teacher, sharded / teacher.relative_to(plain))
    for name in ("soft_labels.safetensors", "teacher.safetensors"):
        _assert_same_file(plain / "artifacts" / name, sharded / "artifacts" / name)
    tar = "artifacts/distilled.tar.gz"  # labels.csv, the images and the manifest, byte for byte
    assert (plain / tar).read_bytes() == (sharded / tar).read_bytes()
    reports = [json.loads((p / "artifacts" / "report.json").read_text()) for p in (plain, sharded)]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[0]["teacher"] == reports[1]["teacher"] and reports[0]["distill"] == reports[1]["distill"]
    leftovers = [p.name for p in (sharded / "stages").rglob("*.safetensors") if "_c" in p.name or "epochs_" in p.name]
    assert leftovers == []  # block files and epoch ranges are gone once merged


def _forbid_training(monkeypatch) -> None:
    def trained(*args, **kwargs):
        raise AssertionError("a finished job must not train again")

    monkeypatch.setattr("fd2_core.stages.pretrain.teacher_optimizer", trained)
    monkeypatch.setattr("fd2_core.stages.synthesis.committee_step", trained)
    monkeypatch.setattr("fd2_core.stages.fadrm_phases.committee_step", trained)
    monkeypatch.setattr("fd2_core.stages.patches.rank_patches", trained)
    monkeypatch.setattr("fd2_core.stages.patches.build_patch_files", trained)
    monkeypatch.setattr("fd2_core.stages.relabel.record_soft_labels", trained)
    monkeypatch.setattr("fd2_core.stages.evaluate.train_student", trained)
    monkeypatch.setattr("fd2_core.stages.evaluate.train_full_data_student", trained)


# --- the plan -------------------------------------------------------------------------------------


def test_plan_lists_every_unit_with_its_dependencies() -> None:
    # the ranked patch rule: no scorer unit (the published rule's `pretrain:scorer` is tested on its own)
    spec = resolve_spec({"distill_batch_classes": 4, "relabel_epochs": 300, "max_workers": 4,
                         "patch_rule": "ranked"})
    plan = plan_shards(spec, num_classes=10)
    assert [s.id for s in plan] == [
        "pretrain:m0", "distill:c00000", "distill:c00004", "distill:c00008", "distill:merge",
        "relabel:e0000-0075", "relabel:e0075-0150", "relabel:e0150-0225", "relabel:e0225-0300", "relabel:merge",
        "evaluate:distilled", "evaluate:random", "package",
    ]
    by_id = {s.id: s for s in plan}
    assert by_id["distill:c00008"].params == {"first_class": 8, "num_classes": 2}
    assert by_id["distill:c00004"].depends_on == ("pretrain:m0",)
    assert by_id["distill:merge"].depends_on == ("distill:c00000", "distill:c00004", "distill:c00008")
    assert by_id["relabel:e0075-0150"].params == {"epochs": [75, 150]}
    assert by_id["relabel:e0075-0150"].depends_on == ("pretrain:m0", "distill:merge")
    assert by_id["relabel:merge"].depends_on == tuple(f"relabel:e{a:04d}-{a + 75:04d}" for a in (0, 75, 150, 225))
    assert by_id["evaluate:distilled"].depends_on == ("distill:merge", "relabel:merge")
    # the random subset needs no distilled set
    assert by_id["evaluate:random"].depends_on == ("pretrain:m0",)
    assert set(by_id["package"].depends_on) == {"pretrain:m0", "distill:merge", "relabel:merge",
                                                "evaluate:distilled", "evaluate:random"}
    seen: set[str] = set()
    for shard in plan:  # listed in an order that runs
        assert set(shard.depends_on) <= seen, shard.id
        seen.add(shard.id)


def test_plan_follows_the_committee_the_method_and_the_students() -> None:
    committee = plan_shards(resolve_spec({"committee": ["convnet"] * 3, "patch_rule": "ranked"}), num_classes=5)
    ids = [s.id for s in committee]
    # 0 = all classes, one block
    assert ids[:4] == ["pretrain:m0", "pretrain:m1", "pretrain:m2", "distill:c00000"]
    assert committee[3].depends_on == ("pretrain:m0", "pretrain:m1", "pretrain:m2")
    random_set = {s.id: s for s in plan_shards(resolve_spec({"method": "random"}), num_classes=5)}
    assert random_set["distill:c00000"].depends_on == ()  # real images need no teacher
    hlr = {s.id: s for s in plan_shards(resolve_spec({"eval_hlr": True, "eval_random_baseline": False}), 5)}
    assert [i for i in hlr if i.startswith("evaluate:")] == ["evaluate:distilled", "evaluate:distilled_hard_labels",
                                                             "evaluate:full_data"]
    assert hlr["evaluate:full_data"].depends_on == ()
    silent = [s.id for s in plan_shards(resolve_spec({"evaluate": False}), 5)]
    assert not [i for i in silent if i.startswith("evaluate:")] and silent[-1] == "package"


def test_plan_ids_are_stable_and_only_the_epoch_ranges_follow_max_workers() -> None:
    spec = resolve_spec({"distill_batch_classes": 3, "relabel_epochs": 100})
    first, again = plan_shards(spec, 7, 2), plan_shards(spec, 7, 2)
    assert first == again
    wide = plan_shards(spec, 7, 64)
    assert [s.id for s in first if s.stage != "relabel"] == [s.id for s in wide if s.stage != "relabel"]
    assert [s.id for s in first if s.stage == "relabel"] == ["relabel:e0000-0050", "relabel:e0050-0100",
                                                              "relabel:merge"]
    assert [s.id for s in wide if s.stage == "relabel"] == [  # at least MIN_RELABEL_EPOCHS each
        "relabel:e0000-0025", "relabel:e0025-0050", "relabel:e0050-0075", "relabel:e0075-0100", "relabel:merge"]
    assert MIN_RELABEL_EPOCHS == 25
    assert plan_shards(spec, 7) == plan_shards(spec, 7, spec.max_workers)  # default: the spec's


@pytest.mark.parametrize(("epochs", "workers", "least", "sizes"), [
    (300, 4, 25, [75, 75, 75, 75]),
    (10, 3, 1, [4, 3, 3]),
    (30, 8, 25, [30]),  # shorter than two minimum ranges: one
    (400, 64, 25, [25] * 16),
    (2, 5, 1, [1, 1]),
])
def test_epoch_ranges_cover_every_epoch_in_order(epochs, workers, least, sizes) -> None:
    ranges = epoch_ranges(epochs, workers, least)
    assert [len(r) for r in ranges] == sizes
    assert [e for r in ranges for e in r] == list(range(epochs))


def test_ids_that_are_not_shards_of_the_job_are_refused(tmp_path) -> None:
    spec = tiny_spec(distill_batch_classes=2)
    for bad in ("distill:c00001", "pretrain:m1", "relabel:e0001-0001", "relabel:e0000-0003", "evaluate:full_data",
                "compile", "distill:c1"):
        with pytest.raises(ValueError, match="not a shard of this job"):
            shard_done(spec, tmp_path, bad)
    # any range of whole epochs is one
    assert shard_done(spec, tmp_path, "relabel:e0001-0002") is False


# --- sharded equals unsharded ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shards_in_any_order_give_the_unsharded_files(tmp_path, tiny_data, plain, monkeypatch, name) -> None:
    raw = CONFIGS[name]
    order = _run_shuffled(raw, tiny_data, tmp_path / "sharded", seed=len(name))
    assert order[-1] == "package" and sum(i.startswith("relabel:e") for i in order) >= 2
    assert sum(i.startswith("distill:c") for i in order) >= 2
    _assert_same_job(plain(name), tmp_path / "sharded", raw["ipc"])

    # the whole job again on the finished folder: everything is reused
    _forbid_training(monkeypatch)
    again = run(raw, tiny_data, tmp_path / "sharded")
    assert again.metrics == json.loads((plain(name) / "artifacts" / "report.json").read_text())["metrics"]
    _assert_same_job(plain(name), tmp_path / "sharded", raw["ipc"])


@pytest.mark.parametrize("encoding", [LabelEncoding(), LabelEncoding("fp16", 2), LabelEncoding("int8"),
                                      LabelEncoding("int8", 2, 0.4), LabelEncoding("online")],
                         ids=lambda encoding: encoding.name)
def test_epoch_ranges_join_into_one_recording(encoding: LabelEncoding) -> None:
    """Every encoding is local to a row, so ranges recorded apart join into the recording of every
    epoch at once (with a subset of epochs, a range may hold none of them)."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    images = torch.randn(7, 3, 16, 16)
    stream = AugmentationStream(50, "relabel", 7, 16, 3, 1.0, 0.08)
    kept = kept_epochs(5, kept_epoch_count(5, encoding.epoch_fraction), 50, "relabel")

    def walk(epochs):
        return record_soft_labels(teacher, images, epochs=epochs, stream=stream, encoding=encoding, kept=kept,
                                  num_classes=4)

    whole = walk(5)
    meta = {"soft_label_source": "backbone", "relabel_bn_mode": "eval", "forward_splits": 1, "epochs_kept": kept}
    parts = [SoftLabelPart(walk(r), meta, r) for r in (range(3, 5), range(0, 2), range(2, 3))]
    joined, joined_meta = join_soft_label_parts(parts, 5)
    assert joined.keys() == whole.keys() and joined_meta == meta
    for key in whole:
        assert torch.equal(joined[key], whole[key]), key
    with pytest.raises(ValueError, match="do not join"):
        join_soft_label_parts(parts[:2], 5)


# --- redelivery, kills, old files, max_workers ----------------------------------------------------


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("finished")
    _run_shuffled(CONFIGS["fd2-sre2l"], tiny_data, workdir, seed=3)
    return workdir


def test_a_redelivered_finished_shard_does_nothing_and_says_so(tmp_path, tiny_data, finished) -> None:
    raw = CONFIGS["fd2-sre2l"]
    workdir = tmp_path / "copy"
    shutil.copytree(finished, workdir)
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    plan = plan_shards(resolve_spec(raw), len(tiny_data.classes), min_relabel_epochs=1)
    for shard in plan:
        events = []
        result = run_shard(raw, tmp_path / "no-data-needed", workdir, shard.id, on_event=events.append)
        assert not result.ran and shard_done(raw, workdir, shard.id), shard.id
        assert [e.message for e in events] == [f"shard {shard.id} already finished; nothing to do"]
    assert result.pipeline_result is not None  # package: the job's result, read from its artifacts
    assert result.pipeline_result.metrics == json.loads((workdir / "artifacts" / "report.json").read_text())["metrics"]
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == before


def test_a_shard_reports_its_own_progress_from_start_to_end(tmp_path, tiny_data) -> None:
    raw = tiny_spec(committee=TWO_CONVNETS, distill_batch_classes=2, distill_iterations=2)
    for shard, stage, words in (("pretrain:m1", "pretrain", "teacher 2/2 (1-convnet)"),
                                ("pretrain:m0", "pretrain", "teacher 1/2 (0-convnet)"),
                                ("distill:c00002", "distill", "ipc index 1/1 of classes 2-3 distilled")):
        events = []
        run_shard(raw, tiny_data, tmp_path, shard, on_event=events.append)
        assert {e.stage for e in events} == {stage}, shard
        assert events[0].kind == "stage_start" and events[-1].kind == "stage_end", shard
        progress = [e.progress for e in events]
        assert progress == sorted(progress) and progress[0] == 0.0 and progress[-1] == 1.0, shard
        assert any(words in e.message for e in events), shard


def test_a_shard_before_its_dependencies_is_refused(tmp_path, tiny_data) -> None:
    raw = CONFIGS["fd2-sre2l"]
    with pytest.raises(ShardNotReady) as err:
        run_shard(raw, tiny_data, tmp_path, "distill:c00003")
    assert err.value.missing == ["pretrain:m0"]
    assert not (tmp_path / "stages" / "distill").exists()


def _shards_until(raw: dict, data, workdir: Path, stop: str) -> None:
    """Every shard of the plan before `stop`, in plan order."""
    for shard in plan_shards(resolve_spec(raw), len(data.classes), min_relabel_epochs=1):
        if shard.id == stop:
            return
        run_shard(raw, data, workdir, shard.id)


def _kill_on_call(monkeypatch, target, name: str, call: int) -> None:
    original, calls = getattr(target, name), []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, killed)


def test_a_block_killed_mid_phase_resumes_from_its_checkpoint(tmp_path, tiny_data, plain, monkeypatch) -> None:
    raw = CONFIGS["fd2-fadrm"]  # blocks c00000 and c00002, phases of 2, 2, 3 steps
    workdir = tmp_path / "cut"
    _shards_until(raw, tiny_data, workdir, "distill:c00000")
    _kill_on_call(monkeypatch, fadrm_phases, "run_phase", 6)  # index 1, third phase
    with pytest.raises(KeyboardInterrupt):
        run_shard(raw, tiny_data, workdir, "distill:c00000")
    monkeypatch.undo()
    stage = workdir / "stages" / "distill"
    assert (stage / "ipc_000_c00000.safetensors").exists() and not (stage / "ipc_001_c00000.safetensors").exists()
    assert int(_tensors(stage / "ipc_001_c00000_phase.safetensors")[0]["phase"]) == 1
    events = []
    assert run_shard(raw, tiny_data, workdir, "distill:c00000", on_event=events.append).ran
    assert any("phases 1-2 already done; resuming" in e.message for e in events)
    assert not (stage / "ipc_001_c00000_phase.safetensors").exists()
    for shard in ("distill:c00002", "distill:merge"):
        run_shard(raw, tiny_data, workdir, shard)
    for j in range(2):
        _assert_same_file(plain("fd2-fadrm") / "stages" / "distill" / f"ipc_{j:03d}.safetensors",
                          stage / f"ipc_{j:03d}.safetensors")


def test_merges_and_epoch_ranges_killed_midway_complete_the_same(tmp_path, tiny_data, plain, monkeypatch) -> None:
    raw = CONFIGS["fd2-sre2l"]
    workdir = tmp_path / "cut"
    _shards_until(raw, tiny_data, workdir, "distill:merge")
    _kill_on_call(monkeypatch, distill_files, "save_tensors", 2)  # after ipc_000 is written
    with pytest.raises(KeyboardInterrupt):
        run_shard(raw, tiny_data, workdir, "distill:merge")
    monkeypatch.undo()
    stage = workdir / "stages" / "distill"
    assert sorted(p.name for p in stage.iterdir()) == [
        "ipc_000.safetensors", "ipc_001_c00000.safetensors", "ipc_001_c00003.safetensors"]
    assert not shard_done(raw, workdir, "distill:merge") and shard_done(raw, workdir, "distill:c00000")
    run_shard(raw, tiny_data, workdir, "distill:merge")

    _kill_on_call(monkeypatch, relabel_choices_module, "sample_cutmix", 3)  # epoch 1 of the range
    with pytest.raises(KeyboardInterrupt):
        run_shard(raw, tiny_data, workdir, "relabel:e0000-0002")
    monkeypatch.undo()
    assert not shard_done(raw, workdir, "relabel:e0000-0002")
    with pytest.raises(ShardNotReady) as err:
        run_shard(raw, tiny_data, workdir, "relabel:merge")
    assert err.value.missing == ["relabel:e0000-0004"]
    for shard in ("relabel:e0000-0002", "relabel:e0002-0003", "relabel:e0003-0004", "relabel:merge"):
        assert run_shard(raw, tiny_data, workdir, shard).ran
    for j in range(2):
        _assert_same_file(plain("fd2-sre2l") / "stages" / "distill" / f"ipc_{j:03d}.safetensors",
                          stage / f"ipc_{j:03d}.safetensors")
    _assert_same_file(plain("fd2-sre2l") / "stages" / "soft_labels.safetensors",
                      workdir / "stages" / "soft_labels.safetensors")


def test_epoch_ranges_of_another_plan_still_merge(tmp_path, tiny_data, plain) -> None:
    """A job resumed with another max_workers: the ranges recorded before
    and after overlap and still join."""
    raw = CONFIGS["fd2-sre2l"]  # 4 epochs
    workdir = tmp_path / "replanned"
    _shards_until(raw, tiny_data, workdir, "relabel:e0000-0002")
    for shard in ("relabel:e0000-0002", "relabel:e0001-0004"):
        run_shard(raw, tiny_data, workdir, shard)
    run_shard(raw, tiny_data, workdir, "relabel:merge")
    _assert_same_file(plain("fd2-sre2l") / "stages" / "soft_labels.safetensors",
                      workdir / "stages" / "soft_labels.safetensors")
    assert not (workdir / "stages" / "relabel").exists()


def _as_v2(path: Path) -> None:
    """Re-label a soft-label file as format v2 (the layout and protocol keys are the same)."""
    write_old_format(path, SoftLabels.load(path), FORMAT_V2)


def test_an_old_format_soft_label_file_replays_but_is_recorded_again(tmp_path, tiny_data, finished) -> None:
    """An older file was recorded with other crops (roi_align of clamped
    boxes): it still replays exactly as recorded, but a run never joins or
    reuses it; its relabel shards run again and write the current format."""
    raw = CONFIGS["fd2-sre2l"]
    workdir = tmp_path / "old"
    shutil.copytree(finished, workdir)
    shutil.rmtree(workdir / "artifacts")
    (workdir / "stages" / "evaluate.json").unlink()
    soft_path = workdir / "stages" / "soft_labels.safetensors"
    _as_v2(soft_path)
    old = SoftLabels.load(soft_path)
    assert old.format_version == 2 and old.resampling == "roi_align"
    replay = SoftLabelReplay(finished / "artifacts" / "distilled.tar.gz", old)
    x, logits = replay[0]
    assert x.shape == (4, 3, 32, 32) and logits.shape == (4, 4)
    assert not shard_done(raw, workdir, "relabel:merge") and not shard_done(raw, workdir, "relabel:e0000-0002")
    assert run_shard(raw, tiny_data, workdir, "relabel:e0000-0002").ran
    result = run(raw, tiny_data, workdir)
    downloaded = SoftLabels.load(result.artifacts["soft_labels.safetensors"])
    assert downloaded.metadata["format"] == "fd2.soft_labels.v5" and downloaded.resampling == "resized_crop"


def test_max_workers_is_result_neutral(tmp_path, tiny_data, monkeypatch) -> None:
    raw = tiny_spec(evaluate=False, relabel_epochs=1)
    run(raw, tiny_data, tmp_path / "run")
    _forbid_training(monkeypatch)
    # no workdir_conflict, nothing trained again
    run({**raw, "max_workers": 8}, tiny_data, tmp_path / "run")
    spec_path = tmp_path / "run" / "spec.json"
    stored = json.loads(spec_path.read_text())
    del stored["max_workers"]  # a work folder from before the field
    spec_path.write_text(json.dumps(stored))
    run({**raw, "max_workers": 3}, tiny_data, tmp_path / "run")
    one, many = resolve_spec(raw).model_dump(mode="json"), resolve_spec({**raw, "max_workers": 64}).model_dump()
    assert spec_changes(one, many) == [] and spec_changes({**one, "ipc": 2}, many) == ["ipc"]
    size = DatasetSize(num_classes=10, train_images=400, test_images=100)
    assert stage_image_passes(resolve_spec({}), size) == stage_image_passes(resolve_spec({"max_workers": 16}), size)


@pytest.mark.parametrize(("value", "words"), [(0, "greater than or equal to 1"), (65, "less than or equal to 64"),
                                              ("two", "valid integer")])
def test_max_workers_out_of_range_is_refused_naming_the_field(value, words) -> None:
    with pytest.raises(ValidationError) as err:
        resolve_spec({"max_workers": value})
    assert words in str(err.value) and "max_workers" in str(err.value)
    assert resolve_spec({}).max_workers == 1


def test_a_part_file_is_not_a_soft_label_file(tmp_path) -> None:
    tensors = {"augment_digests": torch.zeros(2, 8, dtype=torch.uint8)}
    meta = {"soft_label_source": "backbone", "relabel_bn_mode": "eval", "forward_splits": 1, "epochs": 6,
            "epochs_kept": list(range(6)), "num_classes": 3, "batch_size": 4, "augmentations": {},
            "label_encoding": {}}
    path = save_soft_label_part(tmp_path / "p.safetensors", tensors, meta, range(4, 6))
    with pytest.raises(ValueError, match="not a"):
        SoftLabels.load(path)
    part = SoftLabelPart.load(path)
    assert part.epochs == range(4, 6) and part.metadata == {k: json.dumps(v) if not isinstance(v, str) else v
                                                            for k, v in meta.items()}
    with pytest.raises(ValueError, match="records 3 epochs, not 2"):
        save_soft_label_part(tmp_path / "q.safetensors", tensors, meta, range(0, 3))
