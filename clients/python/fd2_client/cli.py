"""`fd2-client`: the service from a shell, on top of the SDK.

    fd2-client upload data/birds --name birds     # prints the dataset id
    fd2-client submit DATASET_ID --preset cpu-small --ipc 1 --wait   # the job id; outcome on stderr
    fd2-client download JOB_ID --out out/         # every artifact, checksums verified
    fd2-client ls jobs --status running --json

URL and key come from `--url`/`--key` or `FD2_URL`/`FD2_API_KEY`; the URL is the service's root
(http://host:port, no user:password@), the key is stripped of surrounding whitespace; both are
checked before anything is sent, and no message shows the key. Results go to stdout (an id or a
short line, or one JSON document with `--json`); messages and progress bars go to stderr.
Exit codes (`EXIT_*`):
0 done; 1 the job failed or was cancelled; 2 a usage error, a bad key or URL, or a request the
service refused (4xx but 429); 3 the service stayed unreachable or unavailable after the retries
(connection errors, 5xx, 429); 4 `--timeout` passed while the job was still active; 5 a download
did not match its checksum (nothing kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped]  # (types-tqdm has the stubs)

from fd2_client.cli_progress import ByteBar, StageBars
from fd2_client.client import Client
from fd2_client.credentials import clean_api_key
from fd2_client.errors import (
    ApiError,
    ChecksumMismatch,
    ConnectionFailed,
    JobError,
    RateLimited,
    ServerError,
    WaitTimeout,
)
from fd2_client.resources import Job
from fd2_client.retries import RetryPolicy
from fd2_client.transport import service_root

EXIT_OK = 0
EXIT_JOB_UNSUCCESSFUL = 1
EXIT_REFUSED = 2
EXIT_UNAVAILABLE = 3
EXIT_TIMEOUT = 4
EXIT_CHECKSUM = 5
EXIT_INTERRUPTED = 130

URL_VARIABLE = "FD2_URL"
KEY_VARIABLE = "FD2_API_KEY"
PROG = "fd2-client"
UNREACHABLE_HINT = f"is the service running? check --url / ${URL_VARIABLE}"
JOB_PREFIX = "job_"
DATASET_PREFIX = "ds_"


class UsageError(Exception):
    """A command line that cannot be run as given (exit 2)."""


class Output:
    """Where a command's result goes: stdout (text or one JSON document) and stderr (messages)."""

    def __init__(self, as_json: bool, quiet: bool, progress: bool, terminal: bool | None = None) -> None:
        self.as_json = as_json
        self.quiet = quiet
        # None: bars on a terminal only
        self.bars: bool | None = False if quiet else (True if progress else None)
        on_terminal = sys.stderr.isatty() if terminal is None else terminal
        # Status lines while waiting (retries): for a person watching, never in a script's JSON or
        # quiet run.
        self.chatty = not quiet and not as_json and (progress or on_terminal)

    def result(self, text: str, document: Any) -> None:
        print(json.dumps(document, indent=2) if self.as_json else text, flush=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def warning(self, text: str) -> None:
        """Shown even with --quiet: what the user must not miss (a set not beating random)."""
        print(f"WARNING: {text}", file=sys.stderr, flush=True)

    def error(self, text: str) -> None:
        print(f"{PROG}: error: {text}", file=sys.stderr, flush=True)

    def retrying(self, exc: BaseException, wait_s: float, attempt: int, attempts: int) -> None:
        """A line per retry, so a command that waits on a dead service does not look hung."""
        if self.chatty:
            print(f"{PROG}: {_failure_of(exc)}; retrying in {wait_s:.1f} s… (try {attempt + 1} of {attempts})",
                  file=sys.stderr, flush=True)


def _failure_of(exc: BaseException) -> str:
    """A retried failure in a few words."""
    if isinstance(exc, ApiError):
        return f"{exc.status} {exc.code}"
    words = {"ConnectError": "cannot connect", "ConnectTimeout": "connect timed out", "ReadTimeout": "no answer",
             "RemoteProtocolError": "connection broken", "ReadError": "connection broken",
             "WriteError": "connection broken", "PoolTimeout": "no free connection"}
    return words.get(type(exc).__name__, type(exc).__name__)


# ---------------------------------------------------------------- commands


def cmd_upload(client: Client, args: argparse.Namespace, out: Output) -> int:
    with ByteBar(f"upload {Path(args.path).name}", show=out.bars) as bar:
        dataset = client.upload_dataset(args.path, args.name, on_progress=bar, drop_duplicates=args.drop_duplicates)
    splits = dataset.get("splits") or {}
    out.note(f"dataset {dataset['id']} {dataset.get('status')}: {dataset.get('num_classes')} classes, "
             f"train {splits.get('train')}, test {splits.get('test')}")
    for warning in dataset.get("warnings") or []:
        out.note(f"warning: {warning.get('message', warning) if isinstance(warning, dict) else warning}")
    out.result(dataset["id"], dataset)
    return EXIT_OK


def cmd_submit(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Prints exactly the job id, also with --wait, so `JOB=$(fd2-client submit …)` always works."""
    job = client.submit(args.dataset, spec_of(args), idempotency_key=args.idempotency_key,
                        callback_url=args.callback_url)
    out.note(f"job {job['id']} {job['status']}")
    if not args.wait:
        out.result(job["id"], job)
        return EXIT_OK
    return _wait_and_report(client, job, args, out, lambda final: str(final["id"]))


def cmd_wait(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Prints the job's final status (or its status at --timeout); the outcome goes to stderr."""
    return _wait_and_report(client, args.job, args, out, lambda final: str(final["status"]))


def _wait_and_report(client: Client, job: str | Job, args: argparse.Namespace, out: Output,
                     printed: Callable[[Mapping[str, Any]], str]) -> int:
    try:
        with StageBars(show=out.bars) as bars:
            final = client.wait(job, on_progress=bars, timeout=args.timeout)
    except JobError as exc:
        out.error(f"job {exc.job['id']} {exc.job['status']}: {exc.code or ''} {exc.message}".replace("  ", " "))
        out.result(printed(exc.job), exc.job)
        return EXIT_JOB_UNSUCCESSFUL
    except WaitTimeout as exc:
        out.error(str(exc))
        out.result(printed(exc.job), exc.job)
        return EXIT_TIMEOUT
    out.note(outcome_line(final))
    storage = storage_line(final.get("metrics") or {})
    if storage:
        out.note(storage)
    verdict, beats = verdict_line(final.get("metrics") or {})
    if beats is False:
        out.warning(verdict)
    else:
        out.note(verdict)
    out.result(printed(final), final)
    return EXIT_OK


def _pct(value: Any) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, (int, float)) else "–"


def _points(value: Any) -> str:
    return f"{100 * value:+.1f}" if isinstance(value, (int, float)) else "?"


def outcome_line(job: Mapping[str, Any]) -> str:
    """`job … succeeded: teacher …, student …, random real subset …` (the accuracies measured)."""
    metrics = job.get("metrics") or {}
    named = (("teacher", "teacher_accuracy"), ("student", "student_accuracy"),
             ("random real subset", "random_baseline_accuracy"))
    shown = [f"{label} {_pct(metrics[key])}" for label, key in named if isinstance(metrics.get(key), (int, float))]
    return f"job {job.get('id')} {job.get('status')}" + (": " + ", ".join(shown) if shown else "")


STORAGE_KEYS = ("distilled_images_bytes", "soft_labels_bytes", "compressed_bytes", "real_data_bytes", "teacher_bytes")


def _size(value: float) -> str:
    return tqdm.format_sizeof(value, "B", 1000)  # decimal units: 41200 → 41.2kB


def storage_line(metrics: Mapping[str, Any]) -> str | None:
    """What the download (images + soft labels) weighs against the real data the job read, from
    the job's storage metrics; None for a job without them (ended before packaging, or older)."""
    if not all(isinstance(metrics.get(key), (int, float)) for key in STORAGE_KEYS):
        return None
    ratio = metrics.get("compression_ratio")
    online = "(online: teacher file) " if str(metrics.get("soft_labels_kind", "")).startswith("online") else ""
    return (f"storage: images {_size(metrics['distilled_images_bytes'])} + soft labels {online}"
            f"{_size(metrics['soft_labels_bytes'])} = {_size(metrics['compressed_bytes'])}; real data "
            f"{_size(metrics['real_data_bytes'])} ({metrics.get('real_data_kind', '?')}); ratio "
            f"{f'×{ratio:.1f}' if isinstance(ratio, (int, float)) else 'n/a'} (real / (images + labels)); "
            f"teacher {_size(metrics['teacher_bytes'])}")


def verdict_line(metrics: dict[str, Any]) -> tuple[str, bool | None]:
    """The set against a random real subset of its size, and whether it beats it (None: unmeasured).

    Printed after every successful wait: a set not beating random is never handed over silently."""
    status = metrics.get("verdict")
    if isinstance(status, str) and "random_baseline_accuracy" in metrics:
        interval = metrics.get("ior_ci95")
        ci = (f", 95 % CI [{_points(interval[0])}, {_points(interval[1])}]"
              if isinstance(interval, list) and len(interval) == 2 else "")
        line = (f"verdict {status}: this set {_pct(metrics.get('student_accuracy'))} vs random real subset "
                f"{_pct(metrics.get('random_baseline_accuracy'))} (IOR {_points(metrics.get('ior'))} points{ci})")
        return line, status == "beats_random"
    if "student_accuracy" in metrics:
        return ("no verdict against random: the random baseline was not measured (spec eval_random_baseline "
                "is off)"), None
    return "no verdict against random: the job did not evaluate a student (spec evaluate is off)", None


def cmd_download(client: Client, args: argparse.Namespace, out: Output) -> int:
    job = client.get_job(args.job)
    by_name = {a["name"]: a for a in job.get("artifacts") or []}
    names = args.names or list(by_name)
    if not by_name:
        raise UsageError(f"job {job['id']} ({job['status']}) has no artifacts yet; wait until it succeeded")
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise UsageError(f"job {job['id']} has no artifact named {', '.join(map(repr, unknown))}; its artifacts: "
                         f"{', '.join(by_name)}")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name in names:
        with ByteBar(name, show=out.bars) as bar:
            path = client.download(job, name, folder, on_progress=bar)
        artifact = by_name.get(name, {})
        files.append({"name": name, "path": str(path), "size": path.stat().st_size,
                      "sha256": artifact.get("sha256")})
    out.result("\n".join(f["path"] for f in files), {"job": job["id"], "files": files})
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    """What happened: a queued job is cancelled at once, a running one is asked to stop."""
    job = client.cancel(args.job)
    if job["status"] == "cancelled":
        text = "cancelled (job was queued)"
    else:
        text = f"cancel requested (job was {job['status']}); it stops within seconds"
    out.result(text, job)
    return EXIT_OK


def cmd_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.id.startswith(DATASET_PREFIX) and not args.dataset:
        raise UsageError(f"{args.id} is a dataset id: add --dataset to delete a dataset "
                         f"(`{PROG} delete --dataset {args.id}`)")
    if args.id.startswith(JOB_PREFIX) and args.dataset:
        raise UsageError(f"{args.id} is a job id: drop --dataset to delete a job")
    if args.dataset:
        client.delete_dataset(args.id)
        kind = "dataset"
    else:
        client.delete(args.id)
        kind = "job"
    out.note(f"{kind} {args.id} deleted")
    out.result(args.id, {"deleted": args.id, "kind": kind})
    return EXIT_OK


def cmd_ls(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.what == "jobs":
        items = _first(client.iter_jobs(status=args.status), args.limit)
        rows = [f"{j['id']}  {j['status']:<9}  {j.get('stage') or '-':<8}  {float(j.get('progress') or 0):>4.0%}  "
                f"{j.get('created_at')}" for j in items]
    else:
        if args.status:
            raise UsageError("--status applies to `ls jobs` only")
        items = _first(client.iter_datasets(), args.limit)
        rows = [f"{d['id']}  {d.get('status', ''):<10}  {d.get('num_classes')} classes  "
                f"train {(d.get('splits') or {}).get('train')}  test {(d.get('splits') or {}).get('test')}  "
                f"{d.get('name')}" for d in items]
    out.result("\n".join(rows), {"items": items})
    return EXIT_OK


def _first(items: Any, limit: int | None) -> list[Any]:
    found: list[Any] = []
    for item in items:
        if limit is not None and len(found) >= limit:
            break
        found.append(item)
    return found


# ---------------------------------------------------------------- spec from the command line


def spec_of(args: argparse.Namespace) -> dict[str, Any]:
    """The partial spec: `--spec` (JSON text or a .json file), then
    `--preset/--method/--ipc/--seed`, then each `--set key=value` (value read as JSON when it
    parses, else as text)."""
    spec: dict[str, Any] = {}
    if args.spec:
        loaded = _spec_document(args.spec)
        if not isinstance(loaded, dict):
            raise UsageError("--spec must be a JSON object")
        spec.update(loaded)
    for field in ("preset", "method", "ipc", "seed"):
        if getattr(args, field) is not None:
            spec[field] = getattr(args, field)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: write it as key=value")
        try:
            spec[key.strip()] = json.loads(value)
        except ValueError:
            spec[key.strip()] = value
    return spec


def _spec_document(value: str) -> Any:
    """`--spec` as a file when one exists at that path, else as JSON text; a failure says which."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # JSON text longer than a file name may be
        is_file = False
    if is_file:
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise UsageError(f"--spec file {value} is not JSON: {exc}") from None
    try:
        return json.loads(value)
    except ValueError as exc:
        if value.lstrip().startswith(("{", "[")):
            raise UsageError(f"--spec is not valid JSON: {exc}") from None
        raise UsageError(f"--spec is neither JSON text nor an existing file: {value}") from None


# ---------------------------------------------------------------- messages


def _rest_hints(job: str) -> list[tuple[str, str]]:
    """The service's messages name REST calls; on the command line, the command doing the same reads
    better."""
    return [
        ("check the id (GET /v1/jobs lists your jobs)", f"check the id; list your jobs with `{PROG} ls jobs`"),
        ("check the id (GET /v1/datasets lists your datasets)",
         f"check the id; list your datasets with `{PROG} ls datasets`"),
        ("check the id (GET /v1/jobs/{id} lists a finished job's artifacts)",
         f"check the name; `{PROG} download {job}` without names fetches every artifact of the job"),
        ("cancel it (POST /v1/jobs/{id}/cancel) and delete it once it has ended",
         f"cancel it first: `{PROG} cancel {job}`, then delete it once it has ended"),
        ("upload one with POST /v1/datasets or use an id from GET /v1/datasets",
         f"upload one with `{PROG} upload` or use an id from `{PROG} ls datasets`"),
        ("(DELETE /v1/jobs/{id})", f"(`{PROG} delete <job id>`)"),
        ("(POST /v1/datasets)", f"(`{PROG} upload`)"),
    ]


def cli_message(message: str, args: argparse.Namespace | None = None) -> str:
    """A service error message with its REST hints turned into `fd2-client` commands."""
    job = next((value for value in (getattr(args, "job", None), getattr(args, "id", None))
                if isinstance(value, str) and value.startswith(JOB_PREFIX)), "<job id>")
    for rest, command in _rest_hints(job):
        message = message.replace(rest, command)
    return message


# ---------------------------------------------------------------- parser


def _common_options(with_defaults: bool) -> argparse.ArgumentParser:
    """Options every command takes, before or after its name."""
    default = (lambda value: value) if with_defaults else (lambda value: argparse.SUPPRESS)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--url", default=default(None), help=f"service URL (default: ${URL_VARIABLE})")
    parser.add_argument("--key", default=default(None), help=f"API key (default: ${KEY_VARIABLE})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the result as one JSON document on stdout")
    parser.add_argument("--quiet", "-q", action="store_true", default=default(False),
                        help="no progress bars or messages on stderr (errors, and a set that does not beat "
                        "random, still)")
    parser.add_argument("--progress", action="store_true", default=default(False),
                        help="draw progress bars and retry notes also when stderr is not a terminal (default: "
                        "only on one)")
    parser.add_argument("--retries", type=int, default=default(5), metavar="N",
                        help="retries of a failed request before giving up (default: 5)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(with_defaults=False)
    parser = argparse.ArgumentParser(prog=PROG, parents=[_common_options(with_defaults=True)],
                                     description="Client of the FD² distillation service.",
                                     epilog="exit codes: 0 done, 1 job failed or cancelled, 2 usage error or "
                                     "request refused (4xx), 3 service unavailable after retries (connection, "
                                     "5xx, 429), 4 --timeout passed, 5 checksum mismatch")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    upload = command("upload", cmd_upload, "upload a folder (zipped for you) or an archive as a dataset")
    upload.add_argument("path", help="folder (train/<class>/… or <class>/…) or .zip/.tar/.tar.gz")
    upload.add_argument("--name", help="display name (default: the folder's or archive's name)")
    upload.add_argument("--drop-duplicates", action="store_true", help="drop repeated images and test images "
                        "that occur in train")

    submit = command("submit", cmd_submit, "submit a distillation job; prints its id (also with --wait)")
    submit.add_argument("dataset", help="dataset id")
    submit.add_argument("--preset", help="e.g. cpu-small, paper-cub")
    submit.add_argument("--method", help="fd2, sre2l++, random, …")
    submit.add_argument("--ipc", type=int, help="images per class")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--set", action="append", metavar="KEY=VALUE", help="any spec field (repeatable)")
    submit.add_argument("--spec", help="a partial spec as JSON text or a .json file")
    submit.add_argument("--idempotency-key", help="reuse to make a repeated submit return the first job")
    submit.add_argument("--callback-url", help="POSTed the job resource when the job ends")
    submit.add_argument("--wait", action="store_true", help="then wait for the job (as `wait` does)")
    submit.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up after S seconds (exit 4)")

    wait = command("wait", cmd_wait, "follow a job with a bar per stage until it ends; prints its final status")
    wait.add_argument("job", help="job id")
    wait.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 4)")

    download = command("download", cmd_download, "download a job's artifacts (all unless named), verified")
    download.add_argument("job", help="job id")
    download.add_argument("names", nargs="*", metavar="NAME", help="artifact names (default: all)")
    download.add_argument("--out", default=".", help="folder to write to (default: .)")

    cancel = command("cancel", cmd_cancel, "cancel a queued or running job")
    cancel.add_argument("job", help="job id")

    delete = command("delete", cmd_delete, "delete a finished job and its artifacts (or a dataset)")
    delete.add_argument("id", help="job id (dataset id with --dataset)")
    delete.add_argument("--dataset", action="store_true", help="the id is a dataset's")

    ls = command("ls", cmd_ls, "list jobs or datasets, newest first")
    ls.add_argument("what", choices=["jobs", "datasets"], metavar="{jobs,datasets}", help="what to list")
    ls.add_argument("--status", help="jobs in this status only")
    ls.add_argument("--limit", type=int, metavar="N", help="at most N items (default: all)")
    return parser


# ---------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; answers the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(args.json, args.quiet, args.progress)
    url = args.url or os.environ.get(URL_VARIABLE, "")
    # A key read from a file ends in a newline: strip it (clean_api_key below checks the rest).
    key = (args.key or os.environ.get(KEY_VARIABLE, "")).strip()
    if not url or not key:
        named = ((f"--url/${URL_VARIABLE}", url), (f"--key/${KEY_VARIABLE}", key))
        missing = " and ".join(name for name, value in named if not value)
        parser.error(f"{missing} not given")
    try:
        url = service_root(url)
    except ValueError as exc:
        parser.error(f"--url/${URL_VARIABLE}: {exc}")
    try:
        key = clean_api_key(key)
    except ValueError as exc:  # its message names the problem, never the key
        parser.error(f"--key/${KEY_VARIABLE}: {exc}")
    if args.retries < 0:
        parser.error("--retries must be 0 or more")
    attempts = args.retries + 1

    def on_retry(exc: BaseException, wait_s: float, attempt: int) -> None:
        out.retrying(exc, wait_s, attempt, attempts)

    try:
        with Client(url, key, retry=RetryPolicy(attempts=attempts), on_retry=on_retry) as client:
            return int(args.handler(client, args, out))
    except ChecksumMismatch as exc:
        return _failed(out, EXIT_CHECKSUM, "checksum_mismatch", str(exc))
    except (RateLimited, ServerError) as exc:
        return _failed(out, EXIT_UNAVAILABLE, exc.code, cli_message(exc.message, args), exc.details, exc.status)
    except ApiError as exc:
        return _failed(out, EXIT_REFUSED, exc.code, cli_message(exc.message, args), exc.details, exc.status)
    except ConnectionFailed as exc:
        return _failed(out, EXIT_UNAVAILABLE, "connection_failed", f"{exc}; {UNREACHABLE_HINT} (now {url})")
    except json.JSONDecodeError as exc:
        return _failed(out, EXIT_UNAVAILABLE, "bad_answer", f"the service's answer is not JSON: {exc}")
    except (UsageError, OSError, ValueError) as exc:
        return _failed(out, EXIT_REFUSED, "usage", str(exc))
    except KeyboardInterrupt:
        out.error("interrupted")
        return EXIT_INTERRUPTED


def _failed(out: Output, code: int, error_code: str, message: str, details: Any = None,
            status: int | None = None) -> int:
    out.error(f"{error_code}: {message}" if error_code != "usage" else message)
    if out.as_json:
        out.result("", {"error": {"code": error_code, "message": message, "details": details, "status": status}})
    return code


if __name__ == "__main__":
    sys.exit(main())
