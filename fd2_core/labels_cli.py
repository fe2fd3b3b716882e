"""`labels` commands: check a soft-label file's regenerated walk, and rewrite an older file as v5.

    python -m fd2_core labels verify soft_labels.safetensors
    python -m fd2_core labels compact old.safetensors --seed 0 --out soft_labels.v5.safetensors

Both exit 2 with one line when the file cannot be used as asked (docs/SOFT_LABELS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _fail(message: str) -> int:
    print(f"fd2: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _load(path: Path):  # -> SoftLabels | None; torch is imported only when a command runs
    """The file, its walk's metadata read too; None, after one line on stderr, when it is not a
    soft-label file this version can read."""
    from safetensors import SafetensorError

    from .softlabels import SoftLabels

    try:
        soft = SoftLabels.load(path)
        soft.stream  # noqa: B018 - parse `augmentations` now, inside the error handling
        return soft
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        _fail(f"cannot read {str(path)!r} as soft labels: {err!s}")
        return None


def cmd_verify(args: argparse.Namespace) -> int:
    """Regenerate every recorded epoch of a v5 file and compare it with its digest."""
    from .relabel_choices import AugmentationMismatch

    soft = _load(Path(args.file))
    if soft is None:
        return EXIT_BAD_INPUT
    if soft.stream is None:
        print(f"{args.file}: format v{soft.format_version} stores its walk; nothing to regenerate")
        return 0
    try:
        soft.verify_augmentations()
    except AugmentationMismatch as err:
        return _fail(str(err))
    print(f"{args.file}: {len(soft.recorded_epochs)} recorded epoch(s) regenerate as recorded "
          f"(torch {soft.stream.torch_version}); labels {soft.encoding.name}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Rewrite a v3/v4 file as v5 after checking every stored epoch against its seed."""
    from .relabel_choices import AugmentationMismatch
    from .soft_label_compaction import compact_soft_labels
    from .softlabels import save_soft_labels

    source, out = Path(args.file), Path(args.out)
    if out.resolve() == source.resolve():
        return _fail("--out is the file being compacted; write the v5 file to another path")
    if out.exists() and not args.force:
        return _fail(f"--out {str(out)!r} exists; choose another path or pass --force")
    soft = _load(source)
    if soft is None:
        return EXIT_BAD_INPUT
    try:
        tensors, metadata = compact_soft_labels(soft, args.seed, args.stream)
        save_soft_labels(out, tensors, metadata)
    except AugmentationMismatch as err:
        return _fail(str(err))
    except (ValueError, KeyError) as err:
        return _fail(f"{source}: {err!s}")
    except OSError as err:
        return _fail(f"cannot write {str(out)!r}: {err.strerror or err}")
    before, after = source.stat().st_size, out.stat().st_size
    print(f"{out}: {after} bytes (was {before}, ×{before / after:.1f} smaller); every stored epoch regenerated "
          "from the seed")
    return 0


def register_label_commands(subparsers: argparse._SubParsersAction) -> None:
    labels = subparsers.add_parser("labels", help="check or compact soft-label files")
    sub = labels.add_subparsers(dest="labels_command", required=True)
    verify = sub.add_parser("verify", help="regenerate a v5 file's walk and compare it with its digests")
    verify.add_argument("file")
    verify.set_defaults(func=cmd_verify)
    compact = sub.add_parser("compact", help="rewrite a v3/v4 file as v5 (its walk regenerated from the seed)")
    compact.add_argument("file")
    compact.add_argument("--seed", type=int, required=True, help="the job's spec seed (report.json → spec.seed)")
    compact.add_argument("--stream", default="relabel",
                         help="relabel (a job's set, default) or baseline-relabel (its random baseline)")
    compact.add_argument("--out", required=True, help="the v5 file to write")
    compact.add_argument("--force", action="store_true", help="overwrite --out")
    compact.set_defaults(func=cmd_compact)
