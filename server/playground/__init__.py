"""The web playground: a page at / and its assets, files next to this one (package data), served
with a Content-Security-Policy that allows same-origin script, style and fetches only (no inline script or style),
so model output the page shows can never run as code. The page speaks the public API only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

ASSETS = {"/": ("index.html", "text/html"), "/playground/app.js": ("app.js", "text/javascript"),
          "/playground/style.css": ("style.css", "text/css"),
          "/favicon.ico": ("favicon.svg", "image/svg+xml")}  # fmt: skip
CONFIG = "/playground/config.json"  # open, like the page: whether the API wants a key, so the page asks before a 401
PLAYGROUND_PATHS = frozenset({*ASSETS, CONFIG})
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip


HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _route(name: str, media_type: str) -> Callable[[], Awaitable[Response]]:
    body = (files(__name__) / name).read_bytes()  # read once: a few KB each

    async def asset() -> Response:
        return Response(body, media_type=f"{media_type}; charset=utf-8", headers=HEADERS)

    return asset


def add_playground(app: FastAPI, auth_required: bool) -> None:
    for path, (name, media_type) in ASSETS.items():
        app.add_api_route(path, _route(name, media_type), methods=["GET"], include_in_schema=False)

    async def config() -> dict[str, bool]:
        return {"auth_required": auth_required}

    app.add_api_route(CONFIG, config, methods=["GET"], include_in_schema=False)
