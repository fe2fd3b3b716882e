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
}


def tiny_spec(**overrides):
    return {**TINY_SPEC, **overrides}
