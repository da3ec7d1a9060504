"""The web app's perimeter: what every request passes before any route, sign-in or body parsing.

In order: the ``Host`` must be one this server answers to (a DNS-rebinding
page has its own name there); on the no-sign-in mode the request must carry
the server's access token (``?token=``, an ``Authorization: token ...``
header or the cookie the token sets), as Jupyter does, since any local user
can reach a 127.0.0.1 port; a write must come from this server's own pages;
and a body is counted as it arrives (chunked ones too) and refused at the
upload limit, so nothing is spooled past limit + slack. Every response gets
headers that keep other sites from framing or sniffing it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import RedirectResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UPLOAD_SLACK = 1024 * 1024  # multipart framing and form fields around the image
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
SECURITY_HEADERS = [(b"x-frame-options", b"SAMEORIGIN"), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin")]
PUBLIC_PREFIXES = ("/static/",)  # the app's own CSS and script: the token page uses them


def new_token() -> str:
    return secrets.token_urlsafe(32)


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> tuple[frozenset[str], bool]:
    """The names a ``Host`` header may carry, and whether any IP literal is fine too.

    Always the loopback names and ``host`` itself; a wildcard bind (0.0.0.0, ::)
    adds this machine's names and any IP literal (a rebinding page's Host is
    its own domain name, never an address); ``extra`` adds a proxy's name.
    """
    names = {*LOOPBACK_NAMES, host, *extra}
    wildcard = host in WILDCARDS
    if wildcard:
        names |= {socket.gethostname(), socket.getfqdn()}
    return frozenset(_norm(n) for n in names if n), wildcard


def host_name(value: str) -> str:
    """``Host`` header value -> the name without its port ('[::1]:8008' -> '::1')."""
    value = value.strip()
    if value.startswith("["):
        return _norm(value[1:].split("]", 1)[0])
    if value.count(":") == 1:
        value = value.rsplit(":", 1)[0]
    return _norm(value)


def _norm(name: str) -> str:
    return name.strip().strip("[]").rstrip(".").lower()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _loopback_ip(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def cookie_name(scope: Scope) -> str:
    """Per port: two servers on one machine keep their own tokens (cookies ignore ports)."""
    server = scope.get("server") or (None, None)
    return f"llens_token_{server[1] or 0}"


def request_token(scope: Scope, headers: Headers) -> tuple[str | None, bool]:
    """The token a request carries, and whether it came in the URL (?token=)."""
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        if key == "token":
            return value, True
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip(), False
    return Request(scope).cookies.get(cookie_name(scope)), False


_TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s]*")


class RedactToken(logging.Filter):
    """Blanks ``?token=...`` in uvicorn's access log lines (the URL of a token-carrying request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_URL.sub(r"\1…", a) if isinstance(a, str) else a for a in record.args)
        return True


def cross_site(headers: Headers) -> bool:
    if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser's cross-origin request (curl, scripts, the test client)
    if origin == "null":
        return True
    hosts = {headers.get("host"), headers.get("x-forwarded-host")}
    return urlsplit(origin).netloc not in hosts


class BodyTooLarge(Exception):
    """Raised into the app by the counting ``receive`` once a body passes the limit."""


class Perimeter:
    """ASGI middleware around the whole app (see the module docstring)."""

    def __init__(self, app: Any, *, hosts: frozenset[str], any_ip: bool = False):
        self.app = app
        self.hosts = hosts
        self.any_ip = any_ip

    def host_allowed(self, value: str | None) -> bool:
        if not value:
            return False
        name = host_name(value)
        return name in self.hosts or _loopback_ip(name) or (self.any_ip and _is_ip(name))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the app has none: nothing unchecked gets in that way
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        from latentlens.serve.app import error_response

        async def refuse(status: int, text: str, headers: dict[str, str] | None = None) -> None:
            response = error_response(Request(scope), status, text)
            if headers:
                response.headers.update(headers)
            await response(scope, receive, send_with_headers)

        state = scope["app"].state.llens
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.host_allowed(host):
            shown = (host or "")[:100]
            await refuse(400, f"this server does not answer to the host name '{shown}' (DNS rebinding guard): "
                              "use the address `llens serve` printed, or start it with --allow-host NAME")
            return

        path = scope.get("path", "")
        if state.token and not path.startswith(PUBLIC_PREFIXES):
            given, in_url = request_token(scope, headers)
            if given is None or not secrets.compare_digest(given.encode(), state.token.encode()):
                await refuse(401, "this server needs its access token: open the URL `llens serve` printed "
                                  "(…/?token=…), or send it as ?token= or an 'Authorization: token …' header")
                return
            if in_url and scope["method"] in ("GET", "HEAD") and not path.startswith("/api/"):
                # keep the token out of the address bar, history and Referer: a cookie carries it from now on
                query = urlencode([(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                                                keep_blank_values=True) if k != "token"])
                here = "/" + quote(path.lstrip("/"), safe="/")  # never '//host': not an open redirect
                response = RedirectResponse(here + (f"?{query}" if query else ""), status_code=303)
                response.set_cookie(cookie_name(scope), state.token, httponly=True, samesite="lax",
                                    secure=scope.get("scheme") == "https", path="/")
                await response(scope, receive, send_with_headers)
                return

        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and cross_site(headers):
            await refuse(403, "cross-site request refused: use this server's own pages or the API directly")
            return
        await self._counted(scope, receive, send_with_headers, state.max_upload_bytes, refuse)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int,
                       refuse: Callable[..., Awaitable[None]]) -> None:
        """Run the app with a ``receive`` that counts the body's bytes and stops at limit + slack."""
        from latentlens.serve.work import _mb

        headers = Headers(scope=scope)
        too_large = (f"the upload is over {_mb(limit + UPLOAD_SLACK)} MB; this server accepts images "
                     f"of at most {_mb(limit)} MB")
        try:
            declared = int(headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        if declared > limit + UPLOAD_SLACK:
            await refuse(413, too_large, {"connection": "close"})
            return
        received = 0
        refused = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit + UPLOAD_SLACK:
                    refused = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the app's answer to a body cut short (a 400, a 500): the 413 goes out instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            pass
        except Exception:
            if not refused:
                raise
        if refused and not started:
            await refuse(413, too_large, {"connection": "close"})
