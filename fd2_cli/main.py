"""`fd2`: the project's command line (`python -m fd2_cli` runs the same).

Library commands (`distill`, `data`) come from `fd2_core.cli`; the service commands live here:
`serve` (API + one worker on this machine), `worker` (a worker alone, for distributed mode), `keys`
(tenant API keys) and `migrate`. Heavy imports (Celery app, torch) happen inside the command that needs
them, so `fd2 keys create` stays quick and works where torch is not installed (the API image).
Arguments are checked before the database or the home folder is touched: a refused command (exit 2, one line
on stderr naming the cause and the fix) writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fd2_config.queues import ALL_QUEUES, parse_queue_list

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

T = TypeVar("T")

EXIT_USAGE = 2


class Refused(Exception):
    """Bad arguments or settings, found before anything was written; `main` prints it and exits 2."""


def _home_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--home", metavar="DIR", help="service home folder (sets FD2_HOME; default ./.fd2)")
    return parent


def _settings(args: argparse.Namespace) -> Any:
    """The settings after applying `--home` (the environment is the one source children inherit too).

    Raises Refused for a home that cannot be a folder or a setting out of range, before anything is created."""
    from pydantic import ValidationError

    from fd2_config.settings import get_settings

    if getattr(args, "home", None):
        home = Path(args.home).expanduser().resolve()
        blocking = next((p for p in (home, *home.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise Refused(f"--home {str(home)!r} cannot be a folder: {str(blocking)!r} is a file; "
                          "choose another --home")
        os.environ["FD2_HOME"] = str(home)
    get_settings.cache_clear()
    try:
        return get_settings()
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]
        name = "FD2_" + "_".join(str(p) for p in first.get("loc", ())).upper()
        raise Refused(f"invalid setting {name}: {first.get('msg')}; fix or unset that environment variable") from None


# ---------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    """Migrate, make sure a key exists, then run the API server and one worker until a signal."""
    from fd2_cli.serve import api_command, child_env, start_child, supervise, worker_command
    from store.db import migrate

    settings = _settings(args)
    migrate(settings)
    first_key = _first_key(settings)
    env = child_env(str(settings.home))
    children = [
        start_child("api", api_command(args.host, args.port), env),
        start_child("worker", worker_command(ALL_QUEUES, 1), env),
    ]
    print(f"FD² service on http://{args.host}:{args.port} (home {settings.home})", flush=True)
    print(f"Web console: http://{args.host}:{args.port}/console/", flush=True)
    if first_key:
        print(f"API key for tenant 'default' (shown once, store it now): {first_key}", flush=True)
    else:
        print("API keys exist already; `fd2 keys create <tenant>` makes another.", flush=True)
    return supervise(children)


def _first_key(settings: Any) -> str | None:
    """A key for tenant `default` when the service has no key at all yet (only its hash is stored)."""
    from store.db import session_scope
    from store.keys import create_tenant_key, list_keys

    with session_scope(settings) as session:
        if list_keys(session):
            return None
        return create_tenant_key(session, "default")


# ---------------------------------------------------------------- worker


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker consuming the given queues; solo pool (one job, in this process) by default."""
    try:
        queues = parse_queue_list(args.queues)
    except ValueError as exc:
        return _fail(str(exc))
    if args.concurrency < 1:
        return _fail("--concurrency must be at least 1")
    pool = args.pool or ("solo" if args.concurrency == 1 else "prefork")
    if pool == "solo" and args.concurrency != 1:
        return _fail("the solo pool runs one job at a time; use --pool prefork for --concurrency > 1")
    from store.db import migrate

    migrate(_settings(args))  # idempotent and locked: workers may start before the API
    from worker.celery_app import app

    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--concurrency={args.concurrency}",
        f"--pool={pool}",
        f"--loglevel={args.loglevel}",
        f"--hostname=fd2-{os.getpid()}@%h",
        "--without-mingle",
        "--without-gossip",
    ]
    return int(app.start(argv=argv) or 0)


# ---------------------------------------------------------------- keys and migrate


def _in_session(args: argparse.Namespace, work: Callable[[Session], T]) -> T:
    """`work(session)` on the home's database, migrated first, committed when it returns."""
    from store.db import migrate, session_scope

    settings = _settings(args)
    migrate(settings)
    with session_scope(settings) as session:
        return work(session)


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Print only the new key on stdout, so `KEY=$(fd2 keys create acme)` works."""
    from store.db import migrate, session_scope
    from store.keys import create_tenant_key

    if not args.tenant.strip():
        return _fail("tenant name must not be empty; give a name such as `fd2 keys create acme`")
    settings = _settings(args)
    migrate(settings)
    try:
        with session_scope(settings) as session:
            key = create_tenant_key(session, args.tenant)
    except ValueError as exc:
        return _fail(str(exc))
    print(key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from store.keys import PREFIX_PATTERN, key_prefix, revoke_key

    text = args.key.strip()
    if not PREFIX_PATTERN.match(text) and key_prefix(text) is None:
        return _fail("that is neither a key nor a key prefix; give the whole key or its fd2_xxxxxxxx prefix "
                     "(`fd2 keys list` shows the prefixes)")
    if not _in_session(args, lambda session: revoke_key(session, args.key)):
        return _fail("no active key matches; give the whole key or its fd2_xxxxxxxx prefix", code=1)
    print(f"revoked {args.key.strip()[:12]}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from store.keys import list_keys

    for info in _in_session(args, lambda session: list_keys(session, args.tenant)):
        state = f"revoked {info.revoked_at:%Y-%m-%d}" if info.revoked_at else "active"
        print(f"{info.prefix}\t{info.tenant}\t{info.created_at:%Y-%m-%d %H:%M}\t{state}")
    return 0


def cmd_uris_allow(args: argparse.Namespace) -> int:
    """Grant a tenant reads under an s3:// bucket or prefix."""
    from fd2_core.data.object_uris import parse_object_uri
    from store.data_uris import allow_uri

    try:
        normalised = str(parse_object_uri(args.uri.strip()))
        uri = _in_session(args, lambda session: allow_uri(session, args.tenant, normalised))
    except ValueError as exc:
        return _fail(f"{exc}; e.g. `fd2 uris allow acme s3://datasets/acme/`")
    print(f"{args.tenant.strip()} may read {uri}")
    return 0


def cmd_uris_revoke(args: argparse.Namespace) -> int:
    from fd2_core.data.object_uris import parse_object_uri
    from store.data_uris import revoke_uri

    try:
        normalised = str(parse_object_uri(args.uri.strip()))
    except ValueError as exc:
        return _fail(str(exc))
    if not _in_session(args, lambda session: revoke_uri(session, args.tenant, normalised)):
        return _fail("the tenant has no such grant (`fd2 uris list` shows them)", code=1)
    print(f"revoked {args.uri.strip()} for {args.tenant.strip()}")
    return 0


def cmd_uris_list(args: argparse.Namespace) -> int:
    from store.data_uris import list_grants

    for grant in _in_session(args, lambda session: list_grants(session, args.tenant)):
        print(f"{grant.tenant}\t{grant.uri}\t{grant.created_at:%Y-%m-%d %H:%M}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from store.db import current_revision, migrate

    settings = _settings(args)
    migrate(settings)
    print(f"database at revision {current_revision(settings)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- parser


def _register_core_commands(subparsers: argparse._SubParsersAction) -> None:
    """`distill` and `data` from the library, or stand-ins that say why they are missing."""
    try:
        from fd2_core.cli import register_commands
    except ImportError as exc:
        reason = (f"the fd2_core command line is not available ({exc}); install the project with its torch "
                  "dependencies (`make serve` creates such a .venv)")
        for name in ("distill", "data"):
            stub = subparsers.add_parser(name, help=f"unavailable: {reason}")
            stub.set_defaults(func=lambda _args, why=reason: _fail(why))
        return
    register_commands(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fd2", description="FD² fine-grained dataset distillation service")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_core_commands(subparsers)
    home = _home_option()

    serve = subparsers.add_parser("serve", parents=[home], help="run the API and one worker on this machine")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    serve.set_defaults(func=cmd_serve)

    worker = subparsers.add_parser("worker", parents=[home], help="run a worker alone (distributed mode)")
    worker.add_argument(
        "--queues", default=",".join(ALL_QUEUES), help="comma-separated queues (default fd2.gpu,fd2.cpu)"
    )
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at once; 1 per GPU (default 1)")
    worker.add_argument(
        "--pool", choices=("solo", "prefork"), default=None, help="solo for concurrency 1, else prefork"
    )
    worker.add_argument("--loglevel", default="INFO", help="worker log level (default INFO)")
    worker.set_defaults(func=cmd_worker)

    keys = subparsers.add_parser("keys", help="manage tenant API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", parents=[home], help="new key for a tenant; prints only the key")
    create.add_argument("tenant", help="tenant name (created when new)")
    create.set_defaults(func=cmd_keys_create)
    revoke = keys_sub.add_parser("revoke", parents=[home], help="revoke a key (whole key or its prefix)")
    revoke.add_argument("key", help="the key or its fd2_xxxxxxxx prefix")
    revoke.set_defaults(func=cmd_keys_revoke)
    listing = keys_sub.add_parser("list", parents=[home], help="list key prefixes, tenants and states")
    listing.add_argument("--tenant", default=None, help="only this tenant's keys")
    listing.set_defaults(func=cmd_keys_list)

    uris = subparsers.add_parser("uris", help="manage the s3:// buckets and prefixes each tenant may read")
    uris_sub = uris.add_subparsers(dest="uris_command", required=True, metavar="ACTION")
    allow = uris_sub.add_parser("allow", parents=[home], help="let a tenant's jobs read under s3://bucket/prefix")
    allow.add_argument("tenant", help="tenant name (created when new)")
    allow.add_argument("uri", help="s3://bucket/ or s3://bucket/prefix/")
    allow.set_defaults(func=cmd_uris_allow)
    withdraw = uris_sub.add_parser("revoke", parents=[home], help="withdraw a tenant's grant")
    withdraw.add_argument("tenant")
    withdraw.add_argument("uri")
    withdraw.set_defaults(func=cmd_uris_revoke)
    granted = uris_sub.add_parser("list", parents=[home], help="list the grants")
    granted.add_argument("--tenant", default=None, help="only this tenant's grants")
    granted.set_defaults(func=cmd_uris_list)

    migrate = subparsers.add_parser("migrate", parents=[home], help="apply database migrations")
    migrate.set_defaults(func=cmd_migrate)
    return parser


def _port(text: str) -> int:
    """An argparse type: a TCP port, refused (exit 2) before the service starts anything."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; give a number from 1 to 65535")
    return int(text)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"fd2: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fd2` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Refused as exc:
        return _fail(str(exc))
    except Exception as exc:
        message = _storage_problem(args, exc)
        if message is None:
            raise
        return _fail(message)


def _storage_problem(args: argparse.Namespace, exc: Exception) -> str | None:
    """The one line for a service command stopped by a full or read-only disk
    (`fd2_cli.storage`)."""
    if args.func not in SERVICE_COMMANDS:
        return None
    from fd2_cli.storage import storage_problem
    from fd2_config.settings import get_settings

    try:
        database_url: str | None = get_settings().database_url
    except Exception:  # settings were refused earlier, or cannot be read: name no database
        database_url = None
    return storage_problem(exc, database_url)


SERVICE_COMMANDS = (cmd_serve, cmd_worker, cmd_keys_create, cmd_keys_revoke, cmd_keys_list, cmd_migrate)


if __name__ == "__main__":
    sys.exit(main())
