"""`fd2_core.pipeline.run` reads like a recipe: every job stage is a module of `fd2_core.stages`, called in order."""

from __future__ import annotations

import importlib
import inspect
import re

from fd2_core import pipeline

STAGES = ("pretrain", "distill", "relabel", "evaluate", "package")  # the order a job reports them in
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
