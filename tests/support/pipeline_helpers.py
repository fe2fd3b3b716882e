"""A tiny spec and dataset so a whole pipeline run takes seconds on a CPU."""

from __future__ import annotations

TINY_DATA = "fgsynth:classes=4,size=32,train=16,test=6,seed=0"

TINY_SPEC = {
    "preset": "cpu-small",
    "ipc": 1,
    "device": "cpu",
    "model_width": 16,
    "num_attention_maps": 4,
    "pretrain_epochs": 1,
    "pretrain_batch_size": 16,
    "val_fraction": 0.25,
    "distill_iterations": 3,
    "patch_candidates": 2,
    "relabel_epochs": 2,
    "relabel_batch_size": 4,
    # cpu-small's default is the published patch rule, which under FD² pretrains one more teacher (the plain
    # scorer); the tiny runs keep RDED's ranked rule so an fd2 run pretrains its own teacher alone. The published
    # rule and its scorer have tests of their own (test_patch_rule, test_shards, test_presets).
    "patch_rule": "ranked",
}


def tiny_spec(**overrides):
    return {**TINY_SPEC, **overrides}
