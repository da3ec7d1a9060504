"""Who is asking, and the database connection each request gets.

On the embedded default nobody signs in (one user, one machine). On a team
server every request carries HTTP Basic credentials: the app opens the
database as that member for the request only and closes it after, so their
PostgreSQL role (reader, writer, owner) decides what they may do; passwords
are never stored, logged or kept between requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from latentlens.errors import DatabaseUnavailable, LatentLensError, PermissionDenied
from latentlens.serve.state import ServeState

basic = HTTPBasic(
    auto_error=False, realm="latentlens",
    description="On a team server: your PostgreSQL user name and password (the embedded default needs none).",
)

_AUTH_FAILURES = ("authentication failed", "no password supplied", "pg_hba.conf",
                  "permission denied for database")


class SignInRequired(LatentLensError):
    """No credentials, or credentials the database refused (HTTP 401)."""

    exit_code = 2


@dataclass
class Session:
    state: ServeState
    store: Any  # latentlens.store.Store, this request's connection
    user: str | None  # the signed-in member (None on the embedded default)


def get_state(request: Request) -> ServeState:
    return request.app.state.llens


def session(request: Request, creds: HTTPBasicCredentials | None = Depends(basic)) -> Iterator[Session]:
    """This request's store, opened as the signed-in member on a team server."""
    state = get_state(request)
    user = password = None
    if state.auth:
        if creds is None or not creds.username or not creds.password:
            # never an empty password: libpq would then look one up in the server's own ~/.pgpass
            raise SignInRequired("sign in with your database user name and password")
        user, password = creds.username, creds.password
    try:
        store = state.open_store(user, password)
    except (DatabaseUnavailable, PermissionDenied) as e:
        if state.auth and _refused(e):
            raise SignInRequired(f"the database refused the sign-in of '{user}'") from None
        raise
    if state.auth and not store.conn.pgconn.used_password:
        # the server let the role in without checking its password (trust, peer: the
        # embedded server's owner): the password given here proved nothing
        store.close()
        raise SignInRequired(f"the database did not check the password of '{user}': sign in as a member "
                             "whose password it checks")
    try:
        yield Session(state, store, user)
    finally:
        store.close()


def _refused(e: LatentLensError) -> bool:
    cause = e.__cause__
    if getattr(cause, "sqlstate", None) in ("28P01", "28000", "42501"):
        return True
    text = str(cause or e).lower()
    return any(m in text for m in _AUTH_FAILURES) or ('role "' in text and "does not exist" in text)
