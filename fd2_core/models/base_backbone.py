"""The shipped base backbone: ConvNet-BN (width 32, 32 px) pretrained on FGSynth classes disjoint from the
evaluated ones, saved without its classifier.

It plays the role ImageNet weights play for the paper's 224 px teachers: a teacher that starts from it begins
with features that already find and read a small object part, instead of spending its first epochs (and most of
its seed-to-seed spread) on finding the part. `bench/base_backbone.py` makes the file; its metadata records the
classes, recipe, seed and command. Use it as a run's teacher weights in `backbone` mode, e.g.
`fd2_core.pipeline.run({..., "teacher_weights_mode": "backbone"}, "fgsynth", workdir,
teacher_weights=base_backbone_path())`.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
BASE_BACKBONE_FILE = "fgsynth_convnet32.safetensors"
# What the file fits: a spec with these values (any number of classes, any method).
BASE_BACKBONE_SPEC: dict[str, object] = {"backbone": "convnet", "model_width": 32, "image_size": 32}


def base_backbone_path() -> Path:
    """Path of the shipped feature extractor; FileNotFoundError naming the script that makes it."""
    path = WEIGHTS_DIR / BASE_BACKBONE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"base backbone not found: {path} (make it with bench/base_backbone.py)")
    return path
