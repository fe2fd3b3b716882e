"""The import rules of docs/ARCHITECTURE.md, read from the page itself and checked on every module.

The page's "Import rules" table says which project packages each package may import, and its "torch-free
facade" list says which `fd2_core` modules the API may import. Packages sit at the repository's root, except
the client SDK, which has a distribution of its own under `clients/` (`clients/python/fd2_client`). Every
`import` statement counts, also those inside functions (a lazy import is still an arrow), so an arrow that runs
back up fails here with the module and line that draws it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "ARCHITECTURE.md"
TORCH = ("torch", "torchvision")
PACKAGE_HOMES = ("*/__init__.py", "clients/*/*/__init__.py")  # a package's __init__, relative to ROOT
NOT_PACKAGES = {"tests", "bench"}


@dataclass(frozen=True)
class Arrow:
    source: str  # module that imports, e.g. "api.routes.jobs"
    target: str  # module imported, e.g. "fd2_core.spec"
    where: str  # "api/routes/jobs.py:12"


def _section(title: str) -> str:
    text = PAGE.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"docs/ARCHITECTURE.md has no section {title!r}"
    return match.group(1)


@lru_cache(maxsize=1)
def allowed_imports() -> dict[str, frozenset[str]]:
    """{package: project packages it may import}, from the page's table."""
    rules = {}
    for line in _section("Import rules").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        rules[cells[0].strip("`")] = frozenset(re.findall(r"`([a-z0-9_]+)`", cells[1]))
    return rules


@lru_cache(maxsize=1)
def facade() -> frozenset[str]:
    """`fd2_core` modules the API may import, from the page's facade list."""
    section = _section("The torch-free facade")
    return frozenset(re.findall(r"`(fd2_core(?:\.[a-z0-9_]+)*)`", section))


@lru_cache(maxsize=1)
def package_dirs() -> dict[str, Path]:
    """{package: its folder} for every project package, wherever its distribution keeps it."""
    found = [init.parent for pattern in PACKAGE_HOMES for init in sorted(ROOT.glob(pattern))]
    return {folder.name: folder for folder in found if folder.name not in NOT_PACKAGES}


def _module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@lru_cache(maxsize=1)
def arrows() -> tuple[Arrow, ...]:
    found = []
    dirs = package_dirs()
    for package in allowed_imports():
        for path in sorted(dirs.get(package, ROOT / package).rglob("*.py")):
            module = _module_name(path, dirs.get(package, ROOT / package))
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
                if isinstance(node, ast.Import):
                    found += [Arrow(module, alias.name, f"{rel}:{node.lineno}") for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    target = _resolve(module, node, path.name == "__init__.py")
                    found.append(Arrow(module, target, f"{rel}:{node.lineno}"))
                    # `from package import module` names a module too
                    found += [Arrow(module, f"{target}.{alias.name}", f"{rel}:{node.lineno}")
                              for alias in node.names if _is_module(f"{target}.{alias.name}")]
    return tuple(found)


def _is_module(name: str) -> bool:
    """True when `name` is a project module or subpackage (a file or folder under its package)."""
    top, *rest = name.split(".")
    folder = package_dirs().get(top)
    if folder is None or not rest:
        return False
    path = folder.joinpath(*rest)
    return path.exists() or path.with_name(path.name + ".py").exists()


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_page_states_a_rule_for_every_package() -> None:
    assert set(package_dirs()) == set(allowed_imports()), "every package needs a row in docs/ARCHITECTURE.md"
    assert "fd2_client" in package_dirs(), "the client SDK under clients/python is a package of its own"
    assert facade(), "docs/ARCHITECTURE.md lists no torch-free facade"


@pytest.mark.parametrize("package", sorted(allowed_imports()))
def test_no_arrow_runs_back_up(package: str) -> None:
    rules = allowed_imports()
    project = set(rules)
    bad = [f"{a.where}: {a.target}" for a in arrows()
           if _top(a.source) == package and _top(a.target) in project and _top(a.target) != package
           and _top(a.target) not in rules[package]]
    assert not bad, f"{package} may import only {sorted(rules[package])}, but: {bad}"


def test_the_api_imports_no_torch_and_only_the_facade_of_fd2_core() -> None:
    bad = [f"{a.where}: {a.target}" for a in arrows() if _top(a.source) == "api"
           and (_top(a.target) in TORCH or (_top(a.target) == "fd2_core" and a.target not in facade()
                                            and not any(m.startswith(a.target + ".") for m in facade())))]
    assert not bad, f"the API must import no torch and only fd2_core's facade {sorted(facade())}: {bad}"


def test_the_facade_is_torch_free_all_the_way_down() -> None:
    """What a facade module imports, and their package `__init__`s, import no torch either (lazily included)."""
    by_source: dict[str, list[Arrow]] = {}
    for arrow in arrows():
        by_source.setdefault(arrow.source, []).append(arrow)
    seen: set[str] = set()
    todo = [m for name in facade() for m in _with_parents(name)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for arrow in by_source.get(module, []):
            assert _top(arrow.target) not in TORCH, f"{arrow.where} imports {arrow.target} into the API's facade"
            if _top(arrow.target) == "fd2_core":
                todo += [m for m in _with_parents(arrow.target) if m not in seen]


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def test_the_client_imports_no_torch_and_nothing_of_the_service() -> None:
    """The SDK is installed alone (`pip install ./clients/python`): no torch, and no project package."""
    bad = [f"{a.where}: {a.target}" for a in arrows() if _top(a.source) == "fd2_client"
           and (_top(a.target) in TORCH or (_top(a.target) in allowed_imports() and _top(a.target) != "fd2_client"))]
    assert not bad, f"the client SDK must stand alone: {bad}"


def test_the_checks_see_real_arrows() -> None:
    """Guards the guard: the scan finds the arrows every layer is known to draw."""
    drawn = {(_top(a.source), _top(a.target)) for a in arrows()}
    assert {("api", "store"), ("worker", "fd2_core"), ("fd2_cli", "worker"), ("fd2_client", "httpx")} <= drawn
    assert any(_top(a.source) == "fd2_core" and _top(a.target) == "torch" for a in arrows())
