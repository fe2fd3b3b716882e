"""Soft-label storage formats (v5): augmentations regenerated from seeds and checked by digest,
logits as fp16, top-k, 8-bit, a subset of epochs or online; older files rewritten without their
stored choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import TINY_DATA, tiny_spec
from safetensors.torch import save_file

from fd2_core.cli import main as cli_main
from fd2_core.data.dataset import load_dataset
from fd2_core.distilled import SoftLabelReplay
from fd2_core.label_codec import decode_logits, dequantize_rows, encode_logits, kept_epochs, quantize_rows
from fd2_core.label_formats import LabelEncoding, index_dtype_name, kept_epoch_count
from fd2_core.pipeline import run
from fd2_core.relabel_choices import AugmentationMismatch, AugmentationStream
from fd2_core.shards import plan_shards, run_shard
from fd2_core.soft_label_compaction import compact_soft_labels, stored_choices
from fd2_core.softlabels import (
    FORMAT_V2,
    FORMAT_V3,
    FORMAT_V4,
    SoftLabels,
    record_soft_labels,
    replay,
    save_soft_labels,
)
from fd2_core.spec import ValidationError
from fd2_core.spec_resolution import resolve_spec

PROTOCOL = {"soft_label_source": "backbone", "relabel_bn_mode": "eval", "forward_splits": 2}
EPOCHS, CLASSES = 4, 6
IMAGES = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(1))
STREAM = AugmentationStream(11, "relabel", 7, 16, 3, 1.0, 0.08)


class Teacher:
    """A fixed linear map of the mean colour and a coarse layout, remembering what it saw."""

    def __init__(self) -> None:
        self.weight = torch.randn(12, CLASSES, generator=torch.Generator().manual_seed(2)) * 4
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)[:, :12] @ self.weight


def recorded(tmp_path, encoding: LabelEncoding, teacher: Teacher | None = None) -> SoftLabels:
    kept = kept_epochs(EPOCHS, kept_epoch_count(EPOCHS, encoding.epoch_fraction), 11, "relabel")
    tensors = record_soft_labels(teacher or Teacher(), IMAGES, epochs=EPOCHS, stream=STREAM, encoding=encoding,
                                 kept=kept, forward_splits=2, num_classes=CLASSES)
    meta = {"batch_size": 3, "num_classes": CLASSES, "epochs": EPOCHS, **PROTOCOL,
            "augmentations": STREAM.as_metadata(), "label_encoding": encoding.as_metadata(), "epochs_kept": kept}
    return SoftLabels.load(save_soft_labels(tmp_path / f"{encoding.name}.safetensors", tensors, meta))


def test_int8_rows_dequantise_as_computed_by_hand() -> None:
    q, scale = quantize_rows(torch.tensor([[2.0, 1.0, -0.55], [3.0, 3.0, 3.0]]))
    s = float(torch.tensor(2.55 / 255).half())  # 0.0099945…, the stored fp16 scale
    assert scale.dtype == torch.float16 and float(scale[0]) == s
    assert q.tolist()[0] == [0, round(1.0 / s), 255]  # (max − x) / s: 0, 100.05 → 100, 255.1 → 255
    assert q.tolist()[1] == [0, 0, 0]  # a row of equal logits: all at its maximum
    back = dequantize_rows(q, scale)
    assert torch.allclose(back[0], torch.tensor([0.0, -100 * s, -255 * s]))
    # the softmax the student's loss reads is what the fp32 row gives, to within the step s/2
    assert torch.allclose(back[0].softmax(0), torch.tensor([2.0, 1.0, -0.55]).softmax(0), atol=s)


def test_class_indices_take_the_smallest_integer_type() -> None:
    assert [index_dtype_name(k) for k in (3, 256, 257, 32768, 32769)] == ["uint8", "uint8", "int16", "int16",
                                                                          "int32"]
    for classes, dtype in ((20, torch.uint8), (300, torch.int16)):
        # distinct quarter steps: exact in fp16, so the kept classes are unambiguous
        logits = torch.stack([torch.randperm(classes, generator=torch.Generator().manual_seed(r)) for r in range(10)])
        logits = logits.view(2, 5, classes).float() / 4
        stored = encode_logits(logits, LabelEncoding("fp16", 3))
        assert stored["topk_indices"].dtype == dtype
        full = decode_logits(stored, classes)
        assert torch.equal(full.topk(3, dim=-1).indices, logits.topk(3, dim=-1).indices)


@pytest.mark.parametrize("encoding", [LabelEncoding(), LabelEncoding("fp16", 3), LabelEncoding("int8"),
                                      LabelEncoding("int8", 3)], ids=lambda e: e.name)
def test_every_stored_format_replays_the_teachers_logits(tmp_path, encoding: LabelEncoding) -> None:
    teacher = Teacher()
    soft = recorded(tmp_path, encoding, teacher)
    assert soft.format_version == 5 and soft.encoding == encoding
    assert not {"order", "boxes", "flips", "cutmix_perm", "cutmix_box", "cutmix_lam"} & set(soft.tensors)
    replayed = list(replay(IMAGES, soft))
    assert len(replayed) == EPOCHS * 3
    seen = torch.cat(teacher.seen)  # parts of 2 per batch, in replay order
    fresh = teacher(seen)
    got = torch.cat([logits for _, logits in replayed])
    assert torch.equal(torch.cat([x for x, _ in replayed]), seen)  # regenerated augmentations, bit for bit
    kept = encoding.kept_values(CLASSES)
    top = fresh.topk(kept, dim=1).indices
    shift = fresh.amax(1, keepdim=True) if encoding.values == "int8" else 0.0  # int8 rows: maximum at 0
    step = (fresh.amax(1) - fresh.gather(1, top).amin(1)) / 255 if encoding.values == "int8" else None
    error = (got.gather(1, top) - (fresh - shift).gather(1, top)).abs()
    if step is None:
        assert error.max() < 2e-2 * fresh.abs().max()  # fp16
    else:
        assert (error <= step[:, None] / 2 * 1.01 + 1e-3).all()  # half a step, the fp16 scale's rounding
    if kept < CLASSES:
        assert ((got <= -1e3).sum(1) == CLASSES - kept).all()


def test_a_subset_of_epochs_is_cycled_by_the_student(tmp_path) -> None:
    teacher = Teacher()
    soft = recorded(tmp_path, LabelEncoding("fp16", 0, 0.5), teacher)
    assert soft.recorded_epochs == kept_epochs(EPOCHS, 2, 11, "relabel") and len(soft.recorded_epochs) == 2
    assert soft.tensors["logits"].shape[0] == 2 and len(soft) == EPOCHS * 3  # the student still trains E epochs
    batches = list(replay(IMAGES, soft))
    for e in range(EPOCHS):
        source = soft.recorded_epochs[e % 2]
        mine, theirs = batches[e * 3:(e + 1) * 3], batches[(e % 2) * 3:(e % 2 + 1) * 3]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(mine, theirs, strict=True))
        assert torch.equal(soft.choices(e % 2).order, STREAM.epoch(source).order)


def test_online_labels_are_the_teachers_own(tmp_path) -> None:
    soft = recorded(tmp_path, LabelEncoding("online"))
    assert soft.needs_teacher and set(soft.tensors) == {"augment_digests"}
    with pytest.raises(ValueError, match="online"):
        next(replay(IMAGES, soft))
    teacher = Teacher()
    for step, (x, logits) in enumerate(replay(IMAGES, soft, teacher=teacher)):
        assert torch.equal(logits, torch.cat([teacher(x[part]) for part in soft.parts(step)]))


def test_a_changed_stream_is_refused_not_replayed(tmp_path) -> None:
    soft = recorded(tmp_path, LabelEncoding())
    soft.tensors["augment_digests"][1, 0] ^= 1  # as if epoch 1 regenerated differently
    soft._epoch_cache.clear()
    soft.batch(0)  # epoch 0 still matches
    with pytest.raises(AugmentationMismatch, match=r"relabel epoch 1: .*damaged or edited file"):
        soft.batch(3)
    soft.metadata["augmentations"] = json.dumps({**STREAM.as_metadata(), "torch": "1.0.0"})
    del soft.__dict__["stream"]
    soft._epoch_cache.clear()
    with pytest.raises(AugmentationMismatch, match=r"other library versions \(torch 1\.0\.0 → .*replay it with"):
        soft.batch(3)
    with pytest.raises(AugmentationMismatch):
        soft.verify_augmentations()


@pytest.mark.parametrize(("version", "rule"), [(FORMAT_V4, "torchvision"), (FORMAT_V3, "clamped")])
def test_v3_and_v4_files_compact_to_v5_and_replay_the_same(tmp_path, version: str, rule: str) -> None:
    resampling = "roi_align" if rule == "clamped" else "resized_crop"
    stream = AugmentationStream(11, "relabel", 7, 16, 3, 1.0, 0.08, rule, resampling)
    logits = record_soft_labels(Teacher(), IMAGES, epochs=EPOCHS, stream=stream)["logits"]
    meta = {"batch_size": "3", "num_classes": str(CLASSES), "format": version, "image_size": "16",
            "cutmix_alpha": "1.0", "min_crop_scale": "0.08", "epochs": str(EPOCHS),
            **{k: str(v) for k, v in PROTOCOL.items()}}
    save_file({**stored_choices(stream, EPOCHS), "logits": logits}, str(tmp_path / "old.safetensors"), meta)
    old = SoftLabels.load(tmp_path / "old.safetensors")
    with pytest.raises(AugmentationMismatch, match="epoch 0: the stored order"):
        compact_soft_labels(old, seed=12)
    tensors, metadata = compact_soft_labels(old, seed=11)
    new = SoftLabels.load(save_soft_labels(tmp_path / "new.safetensors", tensors, metadata))
    assert new.format_version == 5 and new.resampling == old.resampling == resampling
    assert json.loads(new.metadata["compacted_from"]) == {"format": version, "seed": 11, "stream": "relabel"}
    assert (tmp_path / "new.safetensors").stat().st_size < (tmp_path / "old.safetensors").stat().st_size
    for (x_old, l_old), (x_new, l_new) in zip(replay(IMAGES, old), replay(IMAGES, new), strict=True):
        assert torch.equal(x_old, x_new) and torch.equal(l_old, l_new)


def test_files_that_drew_one_stream_do_not_compact(tmp_path) -> None:
    save_file({**stored_choices(STREAM, 2), "logits": torch.zeros(2, 7, 3).half()}, str(tmp_path / "v2.safetensors"),
              {"batch_size": "3", "num_classes": "3", "format": FORMAT_V2, **{k: str(v) for k, v in PROTOCOL.items()}})
    with pytest.raises(ValueError, match="only soft-label formats v3 and v4"):
        compact_soft_labels(SoftLabels.load(tmp_path / "v2.safetensors"), seed=11)


def test_online_labels_store_nothing_else() -> None:
    with pytest.raises(ValidationError, match="online"):
        resolve_spec({"preset": "cpu-small", "soft_label_values": "online", "topk": 5})
    with pytest.raises(ValidationError, match="committee"):
        resolve_spec({"preset": "cpu-small-fadrm", "soft_label_values": "online"})
    with pytest.raises(ValueError, match="online"):
        LabelEncoding("online", 0, 0.5)
    assert resolve_spec({"preset": "cpu-small", "soft_label_values": "int8", "topk": 5,
                         "label_epoch_fraction": 0.25}).soft_label_values == "int8"


def _shard_by_shard(raw: dict, workdir) -> None:
    """Every shard of the plan in dependency order, relabel in ranges of one epoch or more."""
    data = load_dataset(TINY_DATA, 32, seed=0)
    pending, done = plan_shards(resolve_spec(raw), len(data.classes), min_relabel_epochs=1), set()
    while pending:
        shard = next(s for s in pending if set(s.depends_on) <= done)
        assert run_shard(raw, data, workdir, shard.id).ran, shard.id
        done.add(shard.id)
        pending.remove(shard)


def _content(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    soft = SoftLabels.load(path)
    return soft.tensors, dict(sorted(soft.metadata.items()))


@pytest.mark.parametrize("fields", [{"soft_label_values": "int8", "topk": 2, "label_epoch_fraction": 0.5},
                                    {"soft_label_values": "fp16", "topk": 3},
                                    {"soft_label_values": "online"}], ids=lambda f: f["soft_label_values"])
def test_jobs_record_each_format_the_same_whole_or_in_epoch_ranges(tmp_path, fields) -> None:
    """A job in one piece and the same job in two relabel ranges write the same soft-label file;
    its student trains from it (online: from the shipped teacher)."""
    raw = tiny_spec(method="sre2l++", relabel_epochs=4, eval_random_baseline=True, **fields)
    whole = run(raw, TINY_DATA, tmp_path / "whole")
    _shard_by_shard({**raw, "max_workers": 2}, tmp_path / "sharded")
    a, b = _content(whole.artifacts["soft_labels.safetensors"]), _content(
        tmp_path / "sharded" / "artifacts" / "soft_labels.safetensors")
    assert a[1] == b[1] and a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][key], b[0][key]) for key in a[0])
    soft = SoftLabels.load(whole.artifacts["soft_labels.safetensors"])
    encoding = LabelEncoding.from_spec(resolve_spec(raw))
    assert soft.encoding == encoding and len(soft.recorded_epochs) == kept_epoch_count(4, encoding.epoch_fraction)
    assert 0.0 <= whole.metrics["student_accuracy"] <= 1.0 and "random_baseline_accuracy" in whole.metrics
    replay = SoftLabelReplay(whole.artifacts["distilled.tar.gz"], soft)
    if soft.needs_teacher:
        with pytest.raises(ValueError, match="online"):
            replay[0]
        replay = SoftLabelReplay(whole.artifacts["distilled.tar.gz"], soft, teacher=whole.artifacts[
            "teacher.safetensors"])
    images, logits = replay[0]
    assert logits.shape == (4, 4) and torch.isfinite(logits).all()


def test_the_labels_commands_compact_and_verify(tmp_path, capsys) -> None:
    stream = AugmentationStream(11, "relabel", 7, 16, 3, 1.0, 0.08)
    logits = record_soft_labels(Teacher(), IMAGES, epochs=EPOCHS, stream=stream)["logits"]
    meta = {"batch_size": "3", "num_classes": str(CLASSES), "format": FORMAT_V4, "image_size": "16",
            "cutmix_alpha": "1.0", "min_crop_scale": "0.08", "epochs": str(EPOCHS),
            **{k: str(v) for k, v in PROTOCOL.items()}}
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_file({**stored_choices(stream, EPOCHS), "logits": logits}, str(old), meta)
    assert cli_main(["labels", "compact", str(old), "--seed", "12", "--out", str(new)]) == 2
    assert "epoch 0: the stored order" in capsys.readouterr().err and not new.exists()
    assert cli_main(["labels", "compact", str(old), "--seed", "11", "--out", str(new)]) == 0
    assert "smaller" in capsys.readouterr().out
    assert cli_main(["labels", "verify", str(new)]) == 0
    assert f"{EPOCHS} recorded epoch(s) regenerate as recorded" in capsys.readouterr().out
    assert cli_main(["labels", "compact", str(old), "--seed", "11", "--out", str(new)]) == 2  # no overwrite
    assert "exists" in capsys.readouterr().err
    damaged = SoftLabels.load(new)
    damaged.tensors["augment_digests"][2, 3] ^= 1
    save_soft_labels(tmp_path / "damaged.safetensors", damaged.tensors,
                     {k: v for k, v in damaged.metadata.items() if k not in ("format", "layout")})
    assert cli_main(["labels", "verify", str(tmp_path / "damaged.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "relabel epoch 2" in err
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    assert cli_main(["labels", "verify", str(tmp_path / "garbage.safetensors")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert cli_main(["labels", "compact", str(new), "--seed", "11", "--out", str(new), "--force"]) == 2
    assert "another path" in capsys.readouterr().err


def test_the_walk_regenerates_the_pinned_stream() -> None:
    """Pinned digests: a change to the order of draws (here or in torch) that would stop every shipped
    v5 file from replaying fails here first."""
    pinned = {
        ("torchvision", "resized_crop"): ["6b90cf4d1682f30c", "0f77b9193ebe125a", "20dbe5d216689859"],
        ("clamped", "roi_align"): ["5b8eca8e7f9ec2eb", "fe3a7603a7252497", "1b58536bc8fbf64d"],
    }
    for (rule, resampling), digests in pinned.items():
        stream = AugmentationStream(5, "relabel", 10, 32, 4, 1.0, 0.08, rule, resampling)
        assert [stream.epoch(e).digest().hex() for e in range(3)] == digests, rule
    assert kept_epochs(20, 4, 5, "relabel") == [1, 4, 6, 11]


def test_a_file_written_by_the_v4_recorder_compacts_and_replays_the_same() -> None:
    """tests/fixtures/soft_labels_v4_seed5.safetensors was written by the v4 recorder (seed 5, stream
    `relabel`, 10 images of torch.rand with seed 3, a linear teacher of the mean colour)."""
    images = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(4))
    old = SoftLabels.load(Path(__file__).parents[1] / "fixtures" / "soft_labels_v4_seed5.safetensors")
    assert old.format_version == 4
    tensors, metadata = compact_soft_labels(old, seed=5)
    new = SoftLabels(tensors, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
                     | {"format": "fd2.soft_labels.v5"})
    for (x_old, l_old), (x_new, l_new) in zip(replay(images, old), replay(images, new), strict=True):
        assert torch.equal(x_old, x_new) and torch.equal(l_old, l_new)
        assert torch.allclose(l_new, x_new.mean(dim=(2, 3)) @ weight * 10, atol=2e-2)


def test_online_replay_computes_what_the_relabel_stores(tmp_path) -> None:
    """The same job with stored fp16 labels and with online labels: the downloaded teacher, run by
    `SoftLabelReplay` in the file's source and BatchNorm mode, gives the stored logits (to fp16)."""
    raw = tiny_spec(method="fd2", relabel_epochs=2, eval_random_baseline=False)
    stored = run(raw, TINY_DATA, tmp_path / "stored")
    online = run({**raw, "soft_label_values": "online"}, TINY_DATA, tmp_path / "online")
    kept = SoftLabelReplay(stored.artifacts["distilled.tar.gz"], stored.artifacts["soft_labels.safetensors"])
    computed = SoftLabelReplay(online.artifacts["distilled.tar.gz"], online.artifacts["soft_labels.safetensors"],
                               teacher=online.artifacts["teacher.safetensors"])
    assert len(kept) == len(computed) and computed.bn_mode == "train"
    for step in range(len(kept)):
        (x_a, logits_a), (x_b, logits_b) = kept[step], computed[step]
        assert torch.equal(x_a, x_b)
        assert torch.allclose(logits_a, logits_b, atol=2e-2, rtol=1e-2), step


def test_epochs_kept_must_name_each_row(tmp_path) -> None:
    tensors = record_soft_labels(Teacher(), IMAGES, epochs=EPOCHS, stream=STREAM, kept=[1, 3], num_classes=CLASSES)
    meta = {"batch_size": 3, "num_classes": CLASSES, "epochs": EPOCHS, **PROTOCOL,
            "augmentations": STREAM.as_metadata(), "label_encoding": LabelEncoding().as_metadata()}
    for wrong in ([3, 1], [1, 1], [1, 4], [1]):
        with pytest.raises(ValueError, match="epochs_kept must list 2 increasing epochs below 4"):
            save_soft_labels(tmp_path / "s.safetensors", tensors, {**meta, "epochs_kept": wrong})
    assert SoftLabels.load(save_soft_labels(tmp_path / "s.safetensors", tensors,
                                            {**meta, "epochs_kept": [1, 3]})).recorded_epochs == [1, 3]


def test_a_label_budget_is_fitted_alike_whole_and_shard_by_shard(tmp_path) -> None:
    """A spec with `label_budget_bytes` run as library calls: the pipeline and every shard fit it to
    the loaded classes and agree on the encoding."""
    from fd2_core.label_sizes import estimated_label_file_bytes

    raw = tiny_spec(method="sre2l++", relabel_epochs=4, evaluate=False, eval_random_baseline=False)
    classes = load_dataset(TINY_DATA, 32, seed=0).classes
    full = estimated_label_file_bytes(LabelEncoding(), 4, 4, 4, class_names=classes)
    budgeted = {**raw, "label_budget_bytes": full - 1}
    whole = run(budgeted, TINY_DATA, tmp_path / "whole")
    _shard_by_shard({**budgeted, "max_workers": 2}, tmp_path / "sharded")
    a = SoftLabels.load(whole.artifacts["soft_labels.safetensors"])
    b = SoftLabels.load(tmp_path / "sharded" / "artifacts" / "soft_labels.safetensors")
    assert a.encoding == b.encoding != LabelEncoding()
    assert (tmp_path / "whole" / "artifacts" / "soft_labels.safetensors").stat().st_size <= full - 1
