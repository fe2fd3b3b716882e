"""The web console's files as the API serves them (no browser): content types, the strict security headers on
every console response, no inline script, and JavaScript that never turns data into markup.

tests/api/test_console_browser.py drives the same files in a real Chromium.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from api_helpers import make_settings, running_client
from fastapi.testclient import TestClient

from api.web_console import CONSOLE_DIR, CONTENT_SECURITY_POLICY

FILES = sorted(path for path in CONSOLE_DIR.rglob("*") if path.is_file())
SCRIPTS = [path for path in FILES if path.suffix == ".js"]
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Sinks that parse a string as HTML or code: data must never reach them.
UNSAFE_SINKS = re.compile(r"\.innerHTML|\.outerHTML|insertAdjacentHTML|document\.write|\beval\s*\(|new Function\b"
                          r"|setTimeout\s*\(\s*['\"`]|createContextualFragment|DOMParser")
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
IMPORT = re.compile(r"""\bfrom\s+["']([^"']+)["']|\bimport\s+["']([^"']+)["']""")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    home = tmp_path_factory.mktemp("console-files")
    with running_client(make_settings(home, f"sqlite:///{home / 'fd2.db'}")) as test_client:
        yield test_client


def url_of(path: Path) -> str:
    return "/console/" + path.relative_to(CONSOLE_DIR).as_posix()


def assert_security_headers(response) -> None:
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_policy_allows_only_this_origin_and_no_inline_script() -> None:
    directives = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and "unsafe" not in CONTENT_SECURITY_POLICY
    assert directives["img-src"] == "'self' blob:"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(CONSOLE_DIR).as_posix())
def test_every_file_is_served_with_its_content_type_and_the_headers(client: TestClient, path: Path) -> None:
    response = client.get(url_of(path))
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPES[path.suffix]
    assert response.content == path.read_bytes()
    assert_security_headers(response)


def test_root_and_console_redirect_to_the_page_with_the_headers(client: TestClient) -> None:
    for start in ("/", "/console"):
        response = client.get(start, follow_redirects=False)
        assert response.status_code in (307, 308) and response.headers["location"].endswith("/console/")
        assert_security_headers(response)
    page = client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"] == CONTENT_TYPES[".html"]
    assert page.content == (CONSOLE_DIR / "index.html").read_bytes()
    assert_security_headers(page)


def test_the_icon_is_named_by_the_page_and_answers_favicon_ico(client: TestClient) -> None:
    parser = _Tags()
    parser.feed((CONSOLE_DIR / "index.html").read_text())
    icons = [attrs for tag, attrs in parser.tags if tag == "link" and attrs.get("rel") == "icon"]
    assert icons == [{"rel": "icon", "href": "favicon.svg", "type": "image/svg+xml"}]
    icon = client.get("/console/favicon.svg")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    legacy = client.get("/favicon.ico")
    assert legacy.status_code == 200 and legacy.content == icon.content == (CONSOLE_DIR / "favicon.svg").read_bytes()
    assert legacy.headers["content-type"] == "image/svg+xml"
    assert_security_headers(legacy)  # an SVG can hold script: the policy applies to it too


def test_hidden_wins_over_the_stylesheet_s_display_rules() -> None:
    css = (CONSOLE_DIR / "console.css").read_text()
    assert re.search(r"^\[hidden\]\s*\{\s*display:\s*none\s*!important;\s*\}", css, re.MULTILINE)


def test_revalidation_and_missing_files_carry_the_headers_too(client: TestClient) -> None:
    first = client.get("/console/js/app.js")
    again = client.get("/console/js/app.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert_security_headers(again)
    missing = client.get("/console/js/nope.js")
    assert missing.status_code == 404
    assert_security_headers(missing)


def test_the_api_itself_keeps_its_own_headers(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and "content-security-policy" not in response.headers
    assert client.get("/v1/jobs").status_code == 401  # the console adds no way around the key


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.script_text.append(data)


def test_the_page_has_no_inline_script_style_or_handler_and_only_local_assets() -> None:
    parser = _Tags()
    parser.feed((CONSOLE_DIR / "index.html").read_text())
    assert not parser.script_text
    for tag, attrs in parser.tags:
        assert not any(name.startswith("on") or name == "style" for name in attrs), (tag, attrs)
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert "//" not in value and not value.startswith("data:"), (tag, attrs)
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts == [{"type": "module", "src": "js/app.js"}]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(CONSOLE_DIR).as_posix())
def test_scripts_never_parse_data_as_markup_and_load_nothing_foreign(path: Path) -> None:
    source = path.read_text()
    assert not UNSAFE_SINKS.search(source), UNSAFE_SINKS.search(source)
    assert not re.search(r"https?://", source.replace(SVG_NAMESPACE, "")), "only this origin is allowed"
    for match in IMPORT.finditer(source):
        target = match.group(1) or match.group(2)
        assert target.startswith("./") or target.startswith("../"), target
        assert (path.parent / target).resolve().is_file(), f"{path.name} imports a missing {target}"


def test_every_console_file_ships_with_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((CONSOLE_DIR.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["api"]
    api_dir = CONSOLE_DIR.parent
    shipped = {path for pattern in patterns for path in api_dir.glob(pattern)}
    assert set(FILES) <= shipped, sorted(str(p) for p in set(FILES) - shipped)
