"""The web app: ``create_app()`` builds the FastAPI application `llens serve` runs.

Pages (latentlens.serve.pages) and the JSON API (latentlens.serve.api)
share one state (latentlens.serve.state) and call the library through
latentlens.serve.work. Errors users can cause come back as one line: JSON
``{"error": ...}`` under /api/ and for the pages' background requests, an
error page otherwise; never a stack trace.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import Any
from urllib.parse import urlsplit

import psycopg
from fastapi import FastAPI, Request
from fastapi.datastructures import Headers
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
from latentlens.serve.state import DEFAULT_MAX_UPLOAD, ServeState
from latentlens.serve.work import Forbidden, NotFound, UploadTooLarge, _mb

log = logging.getLogger("latentlens.serve")

UPLOAD_SLACK = 1024 * 1024  # multipart framing and form fields around the image

DESCRIPTION = """\
The JSON API behind latentlens' web app. Query bodies are exactly what
`llens query --json` prints. On a team server every request needs HTTP Basic
credentials (your PostgreSQL user); your database role decides what you may do.
"""


def create_app(
    database_url: str | None = None, *, read_only: bool = False, auth: bool | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD, device: str | None = None, dtype: str = "float32",
    cache_dir: Any = None,
) -> FastAPI:
    """The web app on the configured database (``database_url``, else LLENS_DATABASE_URL, else embedded).

    ``auth`` (default: on for a team server, off for the embedded default)
    asks for HTTP Basic credentials and opens the database as that member
    per request; ``read_only`` refuses every save and delete.
    """
    state = ServeState(database_url, read_only=read_only, auth=auth, max_upload_bytes=max_upload_bytes,
                       device=device, dtype=dtype, cache_dir=cache_dir)
    app = FastAPI(title="latentlens", version=__version__, description=DESCRIPTION, redoc_url=None)
    app.state.llens = state
    app.add_middleware(Guard)
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
    return request.url.path.startswith("/api/") or bool(request.headers.get("x-fragment"))


def error_response(request: Request, status: int, message: str) -> Response:
    headers = {"WWW-Authenticate": 'Basic realm="latentlens"'} if status == 401 else None
    if wants_json(request):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return pages.TEMPLATES.TemplateResponse(request, "error.html", {"status": status, "message": message},
                                            status_code=status, headers=headers)


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


# ---------------------------------------------------------------------------
# before any body is read: same-origin writes only, and the upload limit


SECURITY_HEADERS = [(b"x-frame-options", b"SAMEORIGIN"), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin")]


class Guard:
    """Refuse cross-site writes (a browser sends cached sign-ins with them) and oversized bodies;
    no page may be framed by another site."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send_with_headers)
            return
        headers = Headers(scope=scope)
        problem = None
        if _cross_site(headers):
            problem = (403, "cross-site request refused: use this server's own pages or the API directly")
        else:
            limit = scope["app"].state.llens.max_upload_bytes
            try:
                length = int(headers.get("content-length") or 0)
            except ValueError:
                length = 0
            if length > limit + UPLOAD_SLACK:
                problem = (413, f"the upload is {_mb(length)} MB; this server accepts images of at most "
                                f"{_mb(limit)} MB")
        if problem is None:
            await self.app(scope, receive, send_with_headers)
            return
        response = error_response(Request(scope), *problem)
        await response(scope, receive, send_with_headers)


def _cross_site(headers: Headers) -> bool:
    if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser's cross-origin request (curl, scripts, the test client)
    if origin == "null":
        return True
    hosts = {headers.get("host"), headers.get("x-forwarded-host")}
    return urlsplit(origin).netloc not in hosts
