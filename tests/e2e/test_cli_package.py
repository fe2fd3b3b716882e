"""The `fd2` command is the top floor: the console script reaches it, it ships, and no layer below imports it."""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOWER_FLOORS = ("fd2_core", "api", "worker", "store")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_console_script_runs_the_top_floor_parser():
    target = _pyproject()["project"]["scripts"]["fd2"]
    module, _, function = target.partition(":")
    assert module.split(".")[0] == "fd2_cli"
    # what the installed `fd2` script does, without relying on a script installed from another checkout
    code = f"import sys; from {module} import {function}; sys.argv[0] = 'fd2'; sys.exit({function}())"
    result = subprocess.run(
        [sys.executable, "-c", code, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in ("serve", "worker", "keys", "migrate", "distill", "data"))


def test_every_package_of_the_checkout_is_installed():
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in ("tests", "bench")]
    assert "fd2_cli" in packages
    missing = [name for name in packages if not any(fnmatch.fnmatch(name, pattern) for pattern in include)]
    assert not missing, f"not in [tool.setuptools.packages.find] include: {missing}"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("floor", LOWER_FLOORS)
def test_no_lower_floor_imports_the_command_package(floor):
    offenders = []
    for path in sorted((ROOT / floor).rglob("*.py")):
        text = path.read_text()
        imported = _imported_modules(path)
        if any(name == "fd2_cli" or name.startswith("fd2_cli.") for name in imported) or re.search(
            r"import_module\(\s*['\"]fd2_cli", text
        ):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"{floor} must not import the fd2 command package: {offenders}"
