"""The web app: ``create_app()`` builds the FastAPI application `llens serve` runs.

Pages (latentlens.serve.pages) and the JSON API (latentlens.serve.api)
share one state (latentlens.serve.state) and call the library through
latentlens.serve.work. Errors users can cause come back as one line: JSON
``{"error": ...}`` under /api/ and for the pages' background requests, an
error page otherwise; never a stack trace.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError, StarletteHTTPException
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from latentlens import __version__
from latentlens.db import first_line
from latentlens.errors import (
    MODELS_EXTRA,
    DatabaseUnavailable,
    LatentLensError,
    PermissionDenied,
    SchemaOutOfDate,
    missing_model_package,
)
from latentlens.serve import api, atlas_pages, pages
from latentlens.serve.deps import SignInRequired
from latentlens.serve.perimeter import Perimeter, allowed_hosts, new_token
from latentlens.serve.state import DEFAULT_MAX_UPLOAD, ServeState
from latentlens.serve.work import Forbidden, NotFound, UploadTooLarge

log = logging.getLogger("latentlens.serve")

DESCRIPTION = """\
The JSON API behind latentlens' web app. Query bodies are exactly what
`llens query --json` prints. On a team server every request needs HTTP Basic
credentials (your PostgreSQL user); your database role decides what you may do.
"""


def create_app(
    database_url: str | None = None, *, read_only: bool = False, auth: bool | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD, device: str | None = None, dtype: str = "float32",
    cache_dir: Any = None, host: str = "127.0.0.1", allow_hosts: Sequence[str] = (),
    token: str | bool | None = True, max_image_pixels: int | None = -1,
) -> FastAPI:
    """The web app on the configured database (``database_url``, else LLENS_DATABASE_URL, else embedded).

    ``auth`` (default: on for a team server, off for the embedded default)
    asks for HTTP Basic credentials and opens the database as that member
    per request; ``read_only`` refuses every save and delete. Requests must
    name ``host``, a loopback name or one of ``allow_hosts`` in their Host
    header. Without sign-in, ``token`` (True: a random one, in
    ``app.state.llens.token``; None/False: none) must come with every
    request. ``max_image_pixels``: -1 is LLENS_MAX_IMAGE_PIXELS' budget.
    """
    state = ServeState(database_url, read_only=read_only, auth=auth, max_upload_bytes=max_upload_bytes,
                       device=device, dtype=dtype, cache_dir=cache_dir, max_image_pixels=max_image_pixels)
    if state.auth or not token:
        state.token = None  # members sign in with their database password instead
    else:
        state.token = new_token() if token is True else str(token)
    # docs_url=None: Swagger UI loads its script from a CDN (blank offline, and foreign script on our origin)
    app = FastAPI(title="latentlens", version=__version__, description=DESCRIPTION, redoc_url=None, docs_url=None)
    app.state.llens = state
    hosts, any_ip = allowed_hosts(host, allow_hosts)
    app.add_middleware(Perimeter, hosts=hosts, any_ip=any_ip)
    app.mount("/static", StaticFiles(directory=str(files("latentlens.serve").joinpath("static"))), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(atlas_pages.router)
    app.include_router(atlas_pages.api)
    _add_error_handlers(app)
    return app


# ---------------------------------------------------------------------------
# errors: one line, as JSON or a page


def wants_json(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or path.endswith(".json") or bool(request.headers.get("x-fragment"))


def error_response(request: Request, status: int, message: str) -> Response:
    state = request.app.state.llens
    # Basic only where members sign in: on the token mode a browser would pop up a useless dialog
    headers = {"WWW-Authenticate": 'Basic realm="latentlens"'} if status == 401 and state.auth else None
    message = public_message(message)
    if wants_json(request):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return pages.TEMPLATES.TemplateResponse(request, "error.html", {"status": status, "message": message},
                                            status_code=status, headers=headers)


_ROUTES = ("api", "analyses", "evals", "models", "search", "text", "image", "drafts", "static")
_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"`,;()<>/]+/)+[^\s'\"`,;()<>/]*")


def public_message(message: str) -> str:
    """``message`` without the server's file paths (a model dir, the cache, a home folder):
    each becomes ``…/`` and its last part, which is what the user can act on."""
    def shorten(m: re.Match[str]) -> str:
        path = m.group(0)
        parts = [p for p in path.split("/") if p]
        if parts and parts[0] in _ROUTES:
            return path  # one of this app's own URLs
        return "…/" + (parts[-1] if parts else "")

    return _PATH.sub(shorten, message)


def status_of(e: LatentLensError) -> int:
    for cls, status in ((SignInRequired, 401), (Forbidden, 403), (PermissionDenied, 403), (NotFound, 404), (UploadTooLarge, 413),
                        (DatabaseUnavailable, 503), (SchemaOutOfDate, 503)):
        if isinstance(e, cls):
            return status
    return 400 if e.exit_code == 2 else 500


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LatentLensError)
    async def library_error(request: Request, e: LatentLensError) -> Response:
        return error_response(request, status_of(e), str(e))

    @app.exception_handler(psycopg.errors.InsufficientPrivilege)
    async def not_allowed(request: Request, e: psycopg.Error) -> Response:
        return error_response(request, 403, f"your database role may not do this: {first_line(e)}")

    @app.exception_handler(psycopg.Error)
    async def database_error(request: Request, e: psycopg.Error) -> Response:
        log.warning("database error on %s: %s", request.url.path, first_line(e))
        return error_response(request, 500, f"database error: {first_line(e)}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        return error_response(request, e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError) -> Response:
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(request, 422, "; ".join(parts) or "invalid request")

    @app.exception_handler(ModuleNotFoundError)
    async def missing_module(request: Request, e: ModuleNotFoundError) -> Response:
        if missing_model_package(e):
            return error_response(request, 500, f"running models needs '{e.name}': {MODELS_EXTRA} on the server")
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request, 500, f"internal error (see the server log): {type(e).__name__}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request, 500, f"internal error (see the server log): {type(e).__name__}")
