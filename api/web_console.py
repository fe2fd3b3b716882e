"""The web console: static files under `api/console/` served at `/console/`, with strict security headers.

The console is plain HTML, CSS and JavaScript modules that talk to the REST API with the user's Bearer key,
so it needs no build step and no routes of its own: the key never reaches the server other than in the
`Authorization` header of API calls. Every response under `/console` (and the redirect at `/`) carries a
Content-Security-Policy that allows only this origin and no inline script, so data shown by the console can
never run as code even if a bug put it into markup.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import FileResponse, Response
from starlette.staticfiles import NotModifiedResponse, StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
CONSOLE_PATH = "/console"
FAVICON = CONSOLE_DIR / "favicon.svg"
FAVICON_PATH = "/favicon.ico"  # what browsers ask for on pages that name no icon (/docs, a JSON answer)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
# Explicit, so module scripts load under nosniff whatever the host's mime.types says.
MEDIA_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}


class ConsoleFiles(StaticFiles):
    """StaticFiles with the media type taken from the suffix table above (unknown suffixes are not served)."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        media_type = MEDIA_TYPES.get(Path(full_path).suffix.lower())
        if media_type is None:
            return Response("not found", status_code=404, media_type="text/plain")
        response = FileResponse(full_path, status_code=status_code, stat_result=stat_result, media_type=media_type)
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response


def is_console_path(path: str) -> bool:
    return path in ("/", CONSOLE_PATH, FAVICON_PATH) or path.startswith(CONSOLE_PATH + "/")


class ConsoleHeadersMiddleware:
    """Adds SECURITY_HEADERS to every response of a console path (files, redirects, 304s and 404s alike)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_console_path(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_console(app: FastAPI) -> None:
    """Serve the console at /console/ and send / there; answer /favicon.ico with the console's icon."""

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(CONSOLE_PATH + "/")

    @app.get(FAVICON_PATH, include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type=MEDIA_TYPES[".svg"])

    app.mount(CONSOLE_PATH, ConsoleFiles(directory=CONSOLE_DIR, html=True), name="console")
    app.add_middleware(ConsoleHeadersMiddleware)
