"""The `fd2` command line: keys, migrate, argument checks, and child process handling of `fd2 serve`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from service_harness import REPO_ROOT, service_env

from fd2_cli import serve
from fd2_cli.main import build_parser, main

KEY = re.compile(r"^fd2_[0-9a-f]{8}_[A-Za-z0-9_-]{20,}$")


def fd2(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fd2_cli", *args, "--home", str(home)],
        cwd=REPO_ROOT,
        env=service_env({}),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keys_create_prints_only_the_key_and_stores_only_its_hash(tmp_path):
    home = tmp_path / "home"
    created = fd2("keys", "create", "acme", home=home)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    assert len(lines) == 1 and KEY.match(lines[0])
    key = lines[0]
    stored = b"".join(path.read_bytes() for path in home.glob("fd2.db*"))
    assert stored and key.encode() not in stored

    listed = fd2("keys", "list", home=home)
    assert listed.returncode == 0 and key[:12] in listed.stdout and "acme" in listed.stdout
    assert key not in listed.stdout


def test_keys_revoke_by_prefix_then_again(tmp_path):
    home = tmp_path / "home"
    key = fd2("keys", "create", "acme", home=home).stdout.strip()
    first = fd2("keys", "revoke", key[:12], home=home)
    assert first.returncode == 0, first.stderr
    again = fd2("keys", "revoke", key, home=home)
    assert again.returncode == 1 and "no active key" in again.stderr
    assert "revoked" in fd2("keys", "list", home=home).stdout


def test_bad_tenant_name_is_a_usage_error(tmp_path):
    result = fd2("keys", "create", "   ", home=tmp_path / "home")
    assert result.returncode == 2 and "tenant" in result.stderr and not result.stdout


def test_migrate_creates_the_embedded_database(tmp_path):
    home = tmp_path / "home"
    result = fd2("migrate", home=home)
    assert result.returncode == 0, result.stderr
    assert (home / "fd2.db").is_file() and "revision" in result.stderr


def test_every_command_is_mounted():
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert {"serve", "worker", "keys", "uris", "migrate", "distill", "data", "labels"} <= commands


def test_uris_allow_list_and_revoke(tmp_path):
    home = tmp_path / "home"
    allowed = fd2("uris", "allow", "acme", "s3://datasets/acme/", home=home)
    assert allowed.returncode == 0 and allowed.stdout.strip() == "acme may read s3://datasets/acme/"
    listed = fd2("uris", "list", home=home)
    assert listed.stdout.split("\t")[:2] == ["acme", "s3://datasets/acme/"]
    refused = fd2("uris", "allow", "acme", "https://datasets/acme/", home=home)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "fd2 uris allow" in refused.stderr
    assert fd2("uris", "revoke", "acme", "s3://datasets/acme/", home=home).returncode == 0
    again = fd2("uris", "revoke", "acme", "s3://datasets/acme/", home=home)
    assert again.returncode == 1 and "no such grant" in again.stderr
    assert fd2("uris", "list", home=home).stdout == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "--queues", "fd2.gpu,nope"],
        ["worker", "--concurrency", "0"],
        ["worker", "--concurrency", "2", "--pool", "solo"],
    ],
)
def test_worker_options_are_checked_before_anything_starts(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("fd2: ")


# ---------------------------------------------------------------- child processes of `fd2 serve`


def test_children_are_terminated_and_a_stubborn_one_is_killed(tmp_path):
    env = dict(os.environ)
    polite = serve.start_child("polite", [sys.executable, "-c", "import time; time.sleep(60)"], env)
    stubborn_code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    command = [sys.executable, "-c", stubborn_code]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, start_new_session=True)
    stubborn = serve.Child("stubborn", process)
    assert stubborn.process.stdout.readline().strip() == b"up"  # its SIGTERM handler is in place
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        serve.stop_children([polite, stubborn], grace_s=1.0, out=out)
    assert polite.process.returncode is not None and stubborn.process.returncode == -9
    assert "stubborn did not stop" in log.read_text()


def test_supervise_stops_the_others_when_a_child_exits(tmp_path):
    env = dict(os.environ)
    crashing = serve.start_child("api", [sys.executable, "-c", "raise SystemExit(3)"], env)
    sleeping = serve.start_child("worker", [sys.executable, "-c", "import time; time.sleep(60)"], env)
    with (tmp_path / "serve.log").open("w") as out:
        assert serve.supervise([crashing, sleeping], out=out, poll_s=0.05) == 1
    assert sleeping.process.returncode is not None
    assert "api exited with code 3" in (tmp_path / "serve.log").read_text()
