"""Soft-label file sizes at paper scale, computed rather than recorded (no data, no GPU): every
encoding of `fd2_core.label_sizes.BUDGET_ORDER` and the old v4 layout for CUB-200-2011, Stanford
Cars and FGVC-Aircraft at IPC 1, 3 and 5 under the paper presets, next to the ResNet-18 teacher
that an online file ships instead of logits.

    .venv/bin/python bench/label_sizes.py          # print the table
    .venv/bin/python bench/label_sizes.py --docs   # and write it into docs/SOFT_LABELS.md
    .venv/bin/python bench/label_sizes.py --bytes  # exact byte counts instead of kB/MB
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fd2_core.label_sizes import (  # noqa: E402
    ASSUMED_CLASS_NAME_CHARS,
    BUDGET_ORDER,
    estimated_label_file_bytes,
    full_fp16_logit_bytes,
)
from fd2_core.spec_resolution import resolve_spec  # noqa: E402

DOC = ROOT / "docs" / "SOFT_LABELS.md"
HEADING = "## Sizes at paper scale"
COMMAND = ".venv/bin/python bench/label_sizes.py --docs"
DATASETS = (("CUB", "paper-cub", 200), ("Cars", "paper-cars", 196), ("Aircraft", "paper-aircraft", 100))
IPCS = (1, 3, 5)
# v4 per position: order int32, box float32×4, flip uint8, CutMix partner int32
V4_POSITION_BYTES = 4 + 4 * 4 + 1 + 4
V4_BATCH_BYTES = 4 * 4 + 4  # CutMix box int32×4, λ float32


def v4_bytes(epochs: int, images: int, classes: int, batch_size: int) -> int:
    """Tensors of a v4 file (the walk stored, fp16 logits of every class), header left out."""
    walk = images * V4_POSITION_BYTES + math.ceil(images / batch_size) * V4_BATCH_BYTES
    return epochs * walk + full_fp16_logit_bytes(epochs, images, classes)


def teacher_bytes(preset: str, classes: int) -> int:
    """fp32 bytes of the parameters and buffers of the teacher a paper preset builds (ResNet-18, CAL
    head, prototypes); torch only here, the sizes above need none."""
    from fd2_core.models import build_model

    spec = resolve_spec({"preset": preset})
    model = build_model(spec.backbone, classes, spec.image_size, cal=spec.uses_cal,
                        num_attention_maps=spec.num_attention_maps, width=spec.model_width)
    return 4 * sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def human(size: int) -> str:
    """3 significant digits in kB, MB or GB (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


def table(exact: bool = False) -> str:
    columns = [(name, preset, classes, ipc) for name, preset, classes in DATASETS for ipc in IPCS]
    specs = {preset: resolve_spec({"preset": preset}) for _, preset, _ in DATASETS}
    rows: list[tuple[str, list[int]]] = []
    for encoding in BUDGET_ORDER:
        rows.append((f"`{encoding.name}`", [
            estimated_label_file_bytes(encoding, specs[p].relabel_epochs, ipc * k, k) for _, p, k, ipc in columns]))
    rows.append(("fp16 logits E·N·K·2 (reference)", [
        full_fp16_logit_bytes(specs[p].relabel_epochs, ipc * k, k) for _, p, k, ipc in columns]))
    rows.append(("v4 layout (walk stored + fp16 logits)", [
        v4_bytes(specs[p].relabel_epochs, ipc * k, k, specs[p].relabel_batch_size) for _, p, k, ipc in columns]))
    teachers = {p: teacher_bytes(p, k) for _, p, k in DATASETS}
    rows.append(("ResNet-18 teacher, fp32 (online ships it)", [teachers[p] for _, p, _, _ in columns]))
    head = "| format | " + " | ".join(f"{name} IPC {ipc}" for name, _, _, ipc in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    shown = str if exact else human
    body = [f"| {label} | " + " | ".join(shown(v) for v in values) + " |" for label, values in rows]
    return "\n".join([head, rule, *body])


def section(markdown: str) -> str:
    specs = {name: resolve_spec({"preset": p}) for name, p, _ in DATASETS}
    epochs = ", ".join(sorted({str(s.relabel_epochs) for s in specs.values()}))
    batches = ", ".join(f"{name} {s.relabel_batch_size}" for name, s in specs.items())
    intro = (
        f"What a job's `soft_labels.safetensors` weighs under the paper presets ({epochs} relabel epochs, "
        f"relabel batch {batches}) for N = IPC·K distilled images of K classes (CUB-200-2011: 200, Stanford "
        "Cars: 196, FGVC-Aircraft: 100), one row per encoding of `BUDGET_ORDER` in its order, computed by "
        "`fd2_core.label_sizes` (the tensors exactly, the header with class names assumed "
        f"{ASSUMED_CLASS_NAME_CHARS} characters long). For comparison: the fp16 logits alone, the v4 layout "
        f"that also stored the walk ({V4_POSITION_BYTES} bytes per position and {V4_BATCH_BYTES} per batch, "
        "header left out), and the teacher an `online` file needs instead of logits (fp32 parameters and "
        "buffers of the preset's ResNet-18 with its CAL head). Units are powers of 1000. Generated by")
    checked = (
        "How the formula was checked: tests/core/test_label_sizes.py records and saves small files with "
        "`record_soft_labels` and `save_soft_labels` and the metadata a job's relabel writes, one per encoding "
        "(fp16, top-k fp16, int8, top-k int8, epoch subsets of fp16 and of top-k int8, online, and K = 300 for "
        "int16 indices): the tensor bytes are exact, the whole file is exact to the byte given the file's own "
        "metadata, and the estimate made before the file exists (what the budget uses) lies 0–160 bytes above "
        "the real size when the class names are known.")
    fill = functools.partial(textwrap.fill, width=108, break_on_hyphens=False)
    return f"{HEADING}\n\n{fill(intro)}\n\n    {COMMAND}\n\n{markdown}\n\n{fill(checked)}\n"


def write_docs(text: str) -> None:
    doc = DOC.read_text()
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", flags=re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", doc).rstrip("\n") + "\n"
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", action="store_true", help=f"write the table into {DOC.relative_to(ROOT)}")
    parser.add_argument("--bytes", action="store_true", help="print exact byte counts (not with --docs)")
    args = parser.parse_args(argv)
    markdown = table(exact=args.bytes and not args.docs)
    print(markdown)
    if args.docs:
        write_docs(section(markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
