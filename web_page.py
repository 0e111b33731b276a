"""The speech server's own web page: ``GET /`` serves ``web/index.html`` (and its script), for people to listen.

The page is static (no build step, no framework, no CDN) and learns what the server offers at runtime: the voices
from ``/v1/audio/voices``, the request fields and formats from ``/openapi.json`` when it documents them, whether a
key is needed from a 401. What only the process knows (demo weights, the generation defaults) it reads from
``GET /web/config.json``. ``serve_npu.py --no-web`` leaves these routes out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WEB_DIR = Path(__file__).resolve().parent / "web"
# route -> (file under web/, media type); the page's whole footprint on the server
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/web/app.js": ("app.js", "text/javascript; charset=utf-8")}
CONFIG_ROUTE = "/web/config.json"
# Served without an API key (like /health): the page must load to ask for the key; nothing here is secret.
PAGE_PATHS = frozenset({*PAGE_FILES, CONFIG_ROUTE})
# why: the page is same-origin only; these keep other sites from framing it or guessing types
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; "
                                           "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"}


def read_page_files(directory: Path = WEB_DIR) -> dict[str, bytes]:
    """The page's files by route, read once at startup.

    Raises:
        RuntimeError: a file is missing (a copy of the Python files alone), with the remedy.
    """
    contents = {}
    for route, (name, _) in PAGE_FILES.items():
        path = directory / name
        if not path.is_file():
            raise RuntimeError(f"the web page file {path} is missing; run serve_npu.py from the repository "
                               "(it ships web/) or pass --no-web")
        contents[route] = path.read_bytes()
    return contents


def page_config(demo: bool, defaults: dict[str, Any]) -> dict[str, Any]:
    """What the page shows that only the process knows: demo weights, and the server's generation defaults."""
    shown = {name: value for name, value in defaults.items() if isinstance(value, (bool, int, float, str))}
    return {"demo": bool(demo), "defaults": shown}


def add_web_page(app: Any, demo: bool, defaults: dict[str, Any], directory: Path = WEB_DIR) -> None:
    """Register ``GET /``, its script and ``GET /web/config.json`` on the FastAPI ``app``."""
    from fastapi.responses import JSONResponse
    from starlette.responses import Response

    contents = read_page_files(directory)
    config = page_config(demo, defaults)

    def serve(route: str, media_type: str) -> None:
        async def page() -> Response:
            return Response(contents[route], media_type=media_type, headers=PAGE_HEADERS)

        app.add_api_route(route, page, methods=["GET"], include_in_schema=False)

    for route, (_, media_type) in PAGE_FILES.items():
        serve(route, media_type)

    async def web_config() -> JSONResponse:
        return JSONResponse(config, headers={"Cache-Control": "no-cache"})

    app.add_api_route(CONFIG_ROUTE, web_config, methods=["GET"], include_in_schema=False)
