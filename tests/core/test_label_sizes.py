"""Soft-label file sizes computed without the file (`fd2_core.label_sizes`), checked against files
recorded and saved as a job saves them, and the label budget that picks an encoding from them."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from pipeline_helpers import TINY_DATA, tiny_spec
from pydantic import ValidationError

from fd2_core.data.dataset import load_dataset
from fd2_core.label_codec import kept_epochs
from fd2_core.label_formats import FULL, LabelEncoding, kept_epoch_count
from fd2_core.label_sizes import (
    ASSUMED_CLASS_NAME_CHARS,
    BUDGET_ORDER,
    LabelBudgetError,
    budget_candidates,
    estimated_label_file_bytes,
    full_fp16_logit_bytes,
    label_file_bytes,
    label_tensor_bytes,
    metadata_json_bytes,
)
from fd2_core.pipeline import open_run
from fd2_core.relabel_choices import AugmentationStream
from fd2_core.softlabels import SoftLabels, record_soft_labels, save_soft_labels
from fd2_core.spec_compat import spec_changes
from fd2_core.spec_resolution import fit_label_budget, resolve_spec
from fd2_core.stages import relabel

EPOCHS, SEED = 4, 11
# The estimate takes the widest usual metadata values (the mixed source's text, a 10-digit seed,
# 17-digit statistics): with the class names known it lies at most this much above the real size.
ESTIMATE_SLACK = 160


def saved_file(tmp_path, encoding: LabelEncoding, classes: int, ipc: int) -> tuple[str, list[str]]:
    """A v5 file recorded by `record_soft_labels` and saved by `save_soft_labels` with the metadata
    a job's relabel writes (`stages.relabel._metadata` + what `_record` adds); its path and class
    names."""
    images = ipc * classes
    spec = resolve_spec({"relabel_epochs": EPOCHS, "relabel_batch_size": 3, "seed": SEED,
                         "soft_label_values": encoding.values, "topk": encoding.topk,
                         "label_epoch_fraction": encoding.epoch_fraction})
    weight = torch.randn(12, classes, generator=torch.Generator().manual_seed(2)) * 4

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)[:, :12] @ weight

    stream = AugmentationStream(SEED, "relabel", images, 16, 3, 1.0, 0.08)
    kept = kept_epochs(EPOCHS, kept_epoch_count(EPOCHS, encoding.epoch_fraction), SEED, "relabel")
    pixels = torch.randn(images, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tensors = record_soft_labels(teacher, pixels, epochs=EPOCHS, stream=stream, encoding=encoding, kept=kept,
                                 forward_splits=2, num_classes=classes)
    names = [f"{c:03d}.Bird_number_{c}" for c in range(classes)]
    # escaped twice in the header: once in the list's JSON, once in the header's
    names[0] = 'Mésange "bleue"'
    data = SimpleNamespace(classes=names, mean=(0.48560743859201, 0.4994, 0.4321), std=(0.2, 0.21, 0.22))
    ctx = SimpleNamespace(spec=spec, num_classes=classes, data=data)
    metadata = relabel._metadata(ctx, images, torch.arange(classes).repeat_interleave(ipc), [None])
    metadata.update(augmentations=stream.as_metadata(), label_encoding=encoding.as_metadata(), epochs_kept=kept)
    return str(save_soft_labels(tmp_path / f"{encoding.name}.safetensors", tensors, metadata)), names


@pytest.mark.parametrize(("encoding", "classes"), [
    (FULL, 6), (LabelEncoding("fp16", 3), 6), (LabelEncoding("int8"), 6), (LabelEncoding("int8", 3), 6),
    (LabelEncoding("fp16", 0, 0.5), 6), (LabelEncoding("int8", 3, 0.5), 6), (LabelEncoding("online"), 6),
    # K = 300: int16 class indices
    (LabelEncoding("fp16", 5), 300), (LabelEncoding("int8", 5), 300),
], ids=lambda v: v.name if isinstance(v, LabelEncoding) else f"K{v}")
def test_sizes_match_real_files(tmp_path, encoding: LabelEncoding, classes: int) -> None:
    ipc = 2 if classes < 10 else 1
    images = ipc * classes
    path, names = saved_file(tmp_path, encoding, classes, ipc)
    soft = SoftLabels.load(path)
    if classes > 256:
        assert soft.tensors["topk_indices"].dtype == torch.int16
    stored = sum(t.numel() * t.element_size() for t in soft.tensors.values())
    assert label_tensor_bytes(encoding, EPOCHS, images, classes) == stored
    # with the file's own metadata the whole file is exact, header and padding included
    exact = label_file_bytes(encoding, EPOCHS, images, classes, metadata_bytes=metadata_json_bytes(soft.metadata))
    assert exact == os.path.getsize(path)
    estimate = estimated_label_file_bytes(encoding, EPOCHS, images, classes, class_names=names)
    assert 0 <= estimate - os.path.getsize(path) <= ESTIMATE_SLACK
    # without the names, each counts as ASSUMED_CLASS_NAME_CHARS plain characters
    assumed = ["x" * ASSUMED_CLASS_NAME_CHARS] * classes
    assert estimated_label_file_bytes(encoding, EPOCHS, images, classes) == estimated_label_file_bytes(
        encoding, EPOCHS, images, classes, class_names=assumed)


def test_the_reference_is_fp16_logits_of_every_position() -> None:
    assert full_fp16_logit_bytes(400, 200, 200) == 400 * 200 * 200 * 2
    # a full fp16 file holds those and 8 digest bytes per epoch
    assert label_tensor_bytes(FULL, 400, 200, 200) == full_fp16_logit_bytes(400, 200, 200) + 400 * 8
    # online files hold the digests of every epoch and nothing else
    assert label_tensor_bytes(LabelEncoding("online"), 400, 200, 200) == 400 * 8


def budget_spec(budget: int | None, **extra: object):
    return resolve_spec({"preset": "paper-cub", "ipc": 1, "label_budget_bytes": budget, **extra})


def size(encoding: LabelEncoding, classes: int = 200) -> int:
    return estimated_label_file_bytes(encoding, 400, classes, classes)


def encoding_of(spec) -> LabelEncoding:
    return LabelEncoding.from_spec(spec)


def test_no_budget_leaves_the_spec_alone() -> None:
    spec = budget_spec(None)
    assert fit_label_budget(spec, 200) is spec


def test_a_budget_picks_the_first_encoding_that_fits() -> None:
    assert encoding_of(fit_label_budget(budget_spec(size(FULL)), 200)) == FULL  # fits exactly
    assert encoding_of(fit_label_budget(budget_spec(size(FULL) - 1), 200)) == BUDGET_ORDER[1]
    # the order decides, not the size: at K = 200 the top-10 fp16 file (30 bytes a row) is smaller
    # than the top-20 int8 one (42) later in the order, so a budget of exactly the latter takes
    # top-10 fp16
    top20_int8 = LabelEncoding("int8", 20)
    assert size(LabelEncoding("fp16", 20)) > size(top20_int8) > size(LabelEncoding("fp16", 10))
    fitted = fit_label_budget(budget_spec(size(top20_int8)), 200)
    assert encoding_of(fitted) == LabelEncoding("fp16", 10)
    assert (fitted.soft_label_values, fitted.topk, fitted.label_epoch_fraction) == ("fp16", 10, 1.0)
    last = LabelEncoding("int8", 5, 0.1)
    assert encoding_of(fit_label_budget(budget_spec(size(last)), 200)) == last
    with pytest.raises(LabelBudgetError):  # online is never a budget's choice: its labels are the teacher
        fit_label_budget(budget_spec(size(last) - 1), 200)


def test_a_resolved_spec_keeps_its_encoding_while_it_fits() -> None:
    fitted = fit_label_budget(budget_spec(size(LabelEncoding("int8", 10))), 200)
    assert encoding_of(fitted) == LabelEncoding("fp16", 5)
    again = resolve_spec(fitted.model_dump(mode="json"))  # as the worker reads the stored spec
    assert fit_label_budget(again, 200) == again == fitted
    tighter = resolve_spec({**fitted.model_dump(mode="json"), "label_budget_bytes": 1000})
    with pytest.raises(LabelBudgetError) as refused:
        fit_label_budget(tighter, 200)
    assert refused.value.code == "label_budget_exceeded" and "top5-fp16" in refused.value.message


def test_a_budget_nothing_fits_says_the_smallest_size() -> None:
    smallest = min(size(e) for e in BUDGET_ORDER)
    assert smallest == size(LabelEncoding("int8", 5, 0.1)) and LabelEncoding("online") not in BUDGET_ORDER
    with pytest.raises(LabelBudgetError) as refused:
        fit_label_budget(budget_spec(smallest - 1), 200)
    error = refused.value
    assert error.code == "label_budget_too_small" and error.field == "label_budget_bytes"
    assert f"label_budget_bytes={smallest - 1}" in error.message
    assert f"{smallest} bytes (top5-int8-epochs0.1" in error.message
    assert error.details == {"label_budget_bytes": smallest - 1, "smallest_bytes": smallest,
                             "smallest_encoding": "top5-int8-epochs0.1"}


def test_top_k_that_keeps_every_class_stands_as_the_encoding_without_it() -> None:
    few = budget_candidates(3)
    assert all(not e.topk for e in few) and len(set(few)) == len(few)
    assert few[-1] == LabelEncoding("int8", 0, 0.1)  # top5-int8-epochs0.1 keeps all 3 classes
    assert budget_candidates(200) == list(BUDGET_ORDER)


@pytest.mark.parametrize("named", [{"topk": 5}, {"soft_label_values": "int8", "label_epoch_fraction": 0.5}])
def test_a_budget_with_encoding_fields_is_refused(named: dict) -> None:
    with pytest.raises(ValidationError) as refused:
        resolve_spec({"label_budget_bytes": 10**6, **named})
    error = refused.value.errors()[0]
    assert error["loc"] == ("label_budget_bytes",)
    assert "label_budget_bytes" in error["msg"] and all(name in error["msg"] for name in named)
    resolve_spec(named)  # each alone is fine
    resolve_spec({"label_budget_bytes": 10**6})


def test_specs_stored_before_the_budget_still_match() -> None:
    resolved = resolve_spec({}).model_dump(mode="json")
    earlier = {k: v for k, v in resolved.items() if k != "label_budget_bytes"}
    assert spec_changes(earlier, resolved) == []


def test_a_cli_run_fits_the_budget_once_the_classes_are_known(tmp_path) -> None:
    """The pipeline fits a budget after loading the data, stores the pick in spec.json, and opens
    the same folder again (a resume) although the spec it was given names no encoding."""
    spec = resolve_spec(tiny_spec())
    names = load_dataset(TINY_DATA, spec.image_size).classes
    classes, epochs = len(names), spec.relabel_epochs
    half = LabelEncoding("fp16", 0, 0.5)
    budget = estimated_label_file_bytes(half, epochs, spec.ipc * classes, classes, class_names=names)
    raw = tiny_spec(label_budget_bytes=budget)
    opened = open_run(raw, TINY_DATA, tmp_path)
    assert len(opened.data.classes) == classes
    assert encoding_of(opened.spec) == half
    assert json.loads((tmp_path / "spec.json").read_text())["label_epoch_fraction"] == 0.5
    assert encoding_of(open_run(raw, TINY_DATA, tmp_path).spec) == half
    with pytest.raises(LabelBudgetError):
        open_run(tiny_spec(label_budget_bytes=10), TINY_DATA, tmp_path / "small")
    assert not (tmp_path / "small").exists()
