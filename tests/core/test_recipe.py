"""`fd2_core.pipeline.run` reads like a recipe: every job stage is a module
of `fd2_core.stages`, called in order."""

from __future__ import annotations

import importlib
import inspect
import json
import re

import pytest

from fd2_core import pipeline

# the order a job reports them in
STAGES = ("pretrain", "distill", "relabel", "evaluate", "package")
MAX_RUN_LINES = 60  # docstring included: the work belongs in the stages, run only sequences it


def test_every_stage_is_a_stage_module_that_run_calls_in_order():
    source = inspect.getsource(pipeline.run)
    positions = []
    for name in STAGES:
        module = importlib.import_module(f"fd2_core.stages.{name}")
        assert getattr(pipeline, name) is getattr(module, name), f"run must call fd2_core.stages.{name}.{name}"
        call = re.search(rf"\b{name}\(ctx\b", source)
        assert call is not None, f"run does not call the {name} stage"
        positions.append(call.start())
    assert positions == sorted(positions)


def test_run_stays_a_short_recipe():
    lines, _ = inspect.getsourcelines(pipeline.run)
    assert len(lines) < MAX_RUN_LINES, f"run() has {len(lines)} lines; move work into fd2_core/stages/"


def test_a_work_folder_from_before_a_spec_field_existed_still_resumes(tmp_path) -> None:
    """A stored spec.json without `base` / `teacher_weights_mode` matches a
    spec that states what was implied;
    any other difference is still a conflict, named by field."""
    from fd2_core.data.errors import DataError
    from fd2_core.pipeline import check_workdir
    from fd2_core.spec_resolution import resolve_spec

    resolved = resolve_spec({"preset": "cpu-small", "method": "fd2"}).model_dump(mode="json")
    older = {k: v for k, v in resolved.items() if k not in ("base", "teacher_weights_mode")}
    (tmp_path / "spec.json").write_text(json.dumps(older))
    check_workdir(tmp_path, resolved, {"teacher_weights_sha256": None})
    with pytest.raises(DataError) as info:
        check_workdir(tmp_path, {**resolved, "ipc": resolved["ipc"] + 1}, {"teacher_weights_sha256": None})
    assert info.value.code == "workdir_conflict" and info.value.details["changed_fields"] == ["ipc"]
