"""The published data path as spec fields: what a stored spec without them meant, and why a work
folder of the earlier data path is refused instead of resumed (docs/DATA_PATH.md)."""

from __future__ import annotations

import json

import pytest

from fd2_core.data.errors import DataError
from fd2_core.pipeline import check_workdir
from fd2_core.spec_compat import DATA_PATH_MARKER, data_path_changed, spec_changes
from fd2_core.spec_resolution import resolve_spec

NEW_FIELDS = ("distill_crop", "patch_rule", "synthetic_format", "pretrain_lr_decay_mode", "cal_crop_drop")


def _without(resolved: dict, names) -> dict:
    return {k: v for k, v in resolved.items() if k not in names}


def test_a_stored_spec_without_the_new_fields_means_the_earlier_choices() -> None:
    earlier_choices = {"patch_rule": "ranked", "synthetic_format": "png", "pretrain_lr_decay_mode": "stepped"}
    resolved = resolve_spec({"preset": "cpu-small", **earlier_choices}).model_dump(mode="json")
    earlier = _without(resolved, tuple(earlier_choices))
    assert spec_changes(earlier, resolved) == []
    # cpu-small's defaults and the paper presets now say something else: no silent match
    for preset in ("cpu-small", "paper-cub"):
        now = resolve_spec({"preset": preset}).model_dump(mode="json")
        assert spec_changes(_without(now, ("patch_rule", "synthetic_format")), now) == [
            "patch_rule", "synthetic_format"]


def test_a_work_folder_of_the_earlier_data_path_is_refused_and_left_as_it_was(tmp_path) -> None:
    resolved = resolve_spec({"preset": "cpu-small"}).model_dump(mode="json")
    earlier = _without(resolved, NEW_FIELDS)
    assert data_path_changed(earlier) and not data_path_changed(resolved)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "spec.json").write_text(json.dumps(earlier))
    before = sorted(p.name for p in workdir.iterdir())
    with pytest.raises(DataError) as err:
        check_workdir(workdir, resolved, {"teacher_weights_sha256": None})
    assert err.value.code == "workdir_conflict"
    assert err.value.details == {"changed_fields": ["data_path"]}
    assert "earlier crop and resampling" in str(err.value) and "another work folder" in str(err.value)
    assert sorted(p.name for p in workdir.iterdir()) == before
    # the same folder with the marker resumes (no error)
    (workdir / "spec.json").write_text(json.dumps(resolved))
    check_workdir(workdir, resolved, {"teacher_weights_sha256": None})
    assert DATA_PATH_MARKER in resolved
