"""`fd2 distill` and `fd2 data`: the pipeline from a terminal, with a progress bar per stage.

Bad input (missing folder, one class, ipc larger than the smallest class, unknown backbone, bad spec
value, unusable teacher weights, an `--out` holding another run) prints one line on stderr that says
the cause and the fix, and exits with code 2, never a traceback.
Every check runs before the first write; a refusal found only later removes what the command wrote
(`fd2_core.rollback`), so the corrected command can use the same `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .labels_cli import register_label_commands
from .presets import PRESETS
from .rollback import OutputRollback
from .spec import METHODS, JobSpec
from .spec_errors import describe_spec_error
from .storage_report import storage_line

EXIT_BAD_INPUT = 2


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {"preset": args.preset, "method": args.method, "ipc": args.ipc, "seed": args.seed}
    if args.device:
        raw["device"] = args.device
    if getattr(args, "teacher_weights_mode", None):
        raw["teacher_weights_mode"] = args.teacher_weights_mode
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}; e.g. --set image_size=64")
        raw[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return raw


def format_validation_error(err: ValidationError) -> str:
    """The first spec error as one line with its fix (`--set FIELD=VALUE`,
    or where the fields are listed)."""
    errors = err.errors(include_input=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "spec"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    text = describe_spec_error(first)
    if first.get("type") == "extra_forbidden":
        return f"invalid spec field {loc!r}: {text}{more}; the fields and their ranges are in fd2_core/spec.py"
    if loc == "spec":
        return f"invalid spec: {text}{more}"
    return f"invalid spec field {loc!r}: {text}{more}; set it with --set {loc}=VALUE or leave it at its default"


class ProgressPrinter:
    """A bar per stage on a terminal; one line per stage and every few seconds otherwise."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.stream, self.quiet = stream, quiet
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._last_line = 0.0
        self._stage: str | None = None

    def __call__(self, event) -> None:
        if event.kind == "warning":  # always shown, on a line of its own
            self.stream.write(("\r\033[K" if self.tty else "") + f"fd2: warning: {event.message}\n")
            self.stream.flush()
            return
        if self.quiet:
            return
        if event.kind == "stage_start":
            self._stage = event.stage
        bar = "#" * int(event.stage_progress * 30)
        eta = f" eta {int(event.eta_seconds) // 60}m{int(event.eta_seconds) % 60:02d}s" if event.eta_seconds else ""
        losses = " ".join(f"{k} {v:.3g}" for k, v in list(event.losses.items())[:4])
        line = f"{event.stage:<9} [{bar:<30}] {event.stage_progress * 100:5.1f}%{eta} {losses}".rstrip()
        if event.kind == "log":
            line = f"{event.stage:<9} {event.message}"
        if self.tty:
            end = "\n" if event.kind in ("stage_end", "log") else ""
            self.stream.write("\r\033[K" + line + end)
        elif event.kind in ("stage_end", "log") or time.monotonic() - self._last_line > 5:
            self._last_line = time.monotonic()
            self.stream.write(line + "\n")
        self.stream.flush()


def cmd_distill(args: argparse.Namespace) -> int:
    from .spec_resolution import resolve_spec

    try:
        spec = resolve_spec(spec_from_args(args))
    except ValidationError as err:
        return _fail(format_validation_error(err))
    except ValueError as err:
        return _fail(str(err))
    if getattr(args, "teacher_weights_mode", None) and not args.teacher_weights:
        return _fail(f"--teacher-weights-mode {args.teacher_weights_mode} says how to use a weights file, but none "
                     "was given; add --teacher-weights FILE, or leave the mode out to train the teacher from scratch")

    from .data.errors import DataError
    from .pipeline import StopRequested, run

    out = Path(args.out)
    rollback = OutputRollback(out)
    try:
        result = run(
            spec, args.data, out, on_event=ProgressPrinter(quiet=args.quiet), teacher_weights=args.teacher_weights,
            drop_duplicates=args.drop_duplicates,
        )
    except (DataError, ValueError, RuntimeError, FileNotFoundError) as err:
        # a refusal found after writing began: the corrected command may reuse --out
        rollback.undo()
        return _fail(str(err))
    except (KeyboardInterrupt, StopRequested):
        print(f"\nfd2: interrupted; run the same command again to resume from {out}", file=sys.stderr)
        return 130
    print_summary(spec, result)
    return 0


def print_summary(spec: JobSpec, result) -> None:
    m = result.metrics
    timings = result.report.get("timings_s", {})

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def points(v):
        return "n/a" if v is None else f"{100 * v:+.1f}"

    def with_ci(v, interval):
        lo, hi = interval or (None, None)
        return f"{points(v)} points, 95 % CI [{points(lo)}, {points(hi)}]"

    lines = [
        f"method {spec.method}, ipc {spec.ipc}, {spec.backbone} @ {spec.image_size}px, "
        f"{timings.get('total', 0):.0f}s on {result.report['device']['type']}",
        f"teacher accuracy          {pct(m.get('teacher_accuracy'))}",
    ]
    if "student_accuracy" in m:
        lines.append(f"student (distilled set)   {pct(m.get('student_accuracy'))}")
    if "random_baseline_accuracy" in m:
        lines.append(f"student (random real set) {pct(m.get('random_baseline_accuracy'))}")
    judged = (result.report.get("comparison") or {}).get("verdict")
    if judged:
        lines.append(f"{'IOR (over random)':<26}{with_ci(judged['ior'], judged['ior_ci95'])}")
    if "hlr" in m:
        lines.append(f"{'student (hard labels)':<26}{pct(m.get('hard_label_accuracy'))}")
        lines.append(f"{'full real data (hard)':<26}{pct(m.get('full_data_accuracy'))}")
        lines.append(f"{'HLR (hard-label recovery)':<26}{with_ci(m.get('hlr'), m.get('hlr_ci95'))}")
    if result.report.get("storage"):  # what the download weighs against the real data
        lines.append(storage_line(result.report["storage"]))
    lines += duplicate_lines((result.report.get("dataset") or {}).get("duplicates") or {})
    # The dataset's warnings (e.g. file names decoded from a guessed code
    # page), as the service lists them.
    lines += [f"WARNING: {w['message']}" for w in result.report.get("dataset", {}).get("warnings", [])
              if w["code"] not in DUPLICATE_CODES]  # the duplicates line above says those
    lines.append("artifacts:")
    lines += [f"  {path}" for path in result.artifacts.values()]
    if judged:  # last, so that a set which does not beat random cannot scroll by unnoticed
        lines.append(judged["message"])
    print("\n".join(lines))


DUPLICATE_CODES = frozenset({"test_in_train", "duplicates"})


def duplicate_lines(found: dict[str, Any]) -> list[str]:
    """The summary's duplicate counts (report.json → `dataset.duplicates`), and a warning while test
    images that also occur in train are still in the test split."""
    if not found:
        return []
    train, test = found["train"], found["test"]
    line = (f"{'duplicates':<26}train {train['duplicate_images']} ({train['groups']} groups), "
            f"test {test['duplicate_images']} ({test['groups']} groups), test images also in train "
            f"{found['test_in_train']}")
    if found.get("dropped"):
        return [f"{line}; {found['dropped']} dropped (listed in report.json → dataset.errors)"]
    lines = [line]
    if found["test_in_train"]:
        pair = next(iter(found.get("examples") or []), None)
        example = f" (e.g. {pair[0]} = {pair[1]})" if pair else ""
        lines.append(f"WARNING: {found['test_in_train']} test image(s) also occur in train{example}, so every test "
                     "accuracy above is inflated; run again with --drop-duplicates and a new --out to drop them")
    return lines


# generator arguments as the options that set them, so that an error names what the user typed
_FGSYNTH_FLAGS = {"num_classes": "--classes", "image_size": "--size", "train_per_class": "--train",
                  "test_per_class": "--test", "fgsynth variant": "--variant"}


def _out_problem(out: Path, zip_file: bool) -> str | None:
    """Why `fd2 data fgsynth` cannot write to `out`, checked before generating anything."""
    blocking = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"--out {str(out)!r} lies under {str(blocking)!r}, which is a file; choose another --out"
    if zip_file and out.is_dir():
        return f"--out {str(out)!r} is a folder; give a file name such as {str(out / 'fgsynth.zip')!r}"
    if not zip_file and out.exists() and (not out.is_dir() or any(out.iterdir())):
        return f"--out {str(out)!r} exists and is not an empty folder; choose a new --out or remove it first"
    return None


def cmd_data_fgsynth(args: argparse.Namespace) -> int:
    from .data.fgsynth import generate, write_imagefolder, write_zip

    out = Path(args.out)
    problem = _out_problem(out, args.zip)
    if problem:
        return _fail(problem)
    try:
        data = generate(
            num_classes=args.classes,
            image_size=args.size,
            train_per_class=args.train,
            test_per_class=args.test,
            seed=args.seed,
            variant=args.variant,
        )
    except ValueError as err:
        message = str(err)
        for name, flag in _FGSYNTH_FLAGS.items():
            message = message.replace(name, flag)
        return _fail(f"{message}; change that option (see fd2 data fgsynth --help)")
    rollback = OutputRollback(out)
    try:
        path = write_zip(data, out) if args.zip else write_imagefolder(data, out)
    except OSError as err:
        rollback.undo()
        return _fail(f"cannot write {str(out)!r}: {err.strerror or err}; choose another --out")
    print(path)
    return 0


def _fail(message: str) -> int:
    print(f"fd2: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `distill`, `data` and `labels` to a parser (the service CLI mounts them
    next to its own commands)."""
    d = subparsers.add_parser("distill", help="run the whole pipeline on a dataset, no service needed")
    d.add_argument("--data", required=True, help="folder, .zip/.tar(.gz), manifest.json/.csv, or fgsynth[:k=v,…]")
    d.add_argument("--method", choices=METHODS, default="fd2")
    d.add_argument("--ipc", type=int, default=1, help="synthetic images per class")
    d.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    d.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override any spec field (repeatable)")
    d.add_argument(
        "--teacher-weights",
        metavar="FILE",
        help="start the teacher from a local weights file (safetensors or a torch state dict, e.g. an earlier "
        "run's teacher.safetensors) instead of from scratch",
    )
    d.add_argument(
        "--teacher-weights-mode",
        choices=("full", "backbone"),
        default=None,
        help="full (default): the whole teacher of the same classes (stored class names are checked, another "
        "order is mapped, another set is refused); backbone: only the feature extractor, any classes",
    )
    d.add_argument(
        "--drop-duplicates",
        action="store_true",
        help="drop images whose decoded pixels repeat another image of their split (the first by path is "
        "kept) and test images whose pixels occur in train; counted in the summary either way",
    )
    d.add_argument("--out", required=True, help="work folder; artifacts land in <out>/artifacts")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=cmd_distill)

    data = subparsers.add_parser("data", help="built-in data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    g = data_sub.add_parser("fgsynth", help="write the built-in fine-grained dataset")
    g.add_argument("--out", required=True)
    g.add_argument("--zip", action="store_true", help="write a .zip instead of a folder")
    g.add_argument("--classes", type=int, default=20)
    g.add_argument("--size", type=int, default=32)
    g.add_argument("--train", type=int, default=150, help="train images per class")
    g.add_argument("--test", type=int, default=50, help="test images per class")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--variant", default="birds")
    g.set_defaults(func=cmd_data_fgsynth)
    register_label_commands(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fd2_core", description="FD² fine-grained dataset distillation")
    register_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
