"""Team members on a server: grant the reader or writer group, revoke, list.

Migration 0004 defines two NOLOGIN group roles per database (their names come
from the SQL function ``llens_team_role``): *reader* (every query, the SQL
functions and views, analyses and evaluations) and *writer* (a reader that may
also ingest, import, evaluate, save analyses and delete its own). A team
member is a LOGIN role that is a member of one of them; the role that migrates
(the owner) is the only one that changes the schema or drops models. All of it
is enforced by PostgreSQL (grants and row-level security), not by this module:
it only creates roles and memberships.

Names and passwords reach SQL only through ``psycopg.sql`` (``Identifier``,
``Literal``): any name PostgreSQL accepts (quotes, ``;``, unicode, up to 63
bytes) is quoted, never spliced. A password is hashed by libpq on this machine
(``PQencryptPasswordConn``: SCRAM-SHA-256 on current servers) before it is
sent, so the server never sees it in clear and it cannot appear in its logs;
it never appears in a message or an exception either.

The embedded server (no ``LLENS_DATABASE_URL``) is single-user: every function
here refuses it (exit code 2, like any setting that cannot be used). Its owner
connects without a password; any other role on it must give its password (see
``latentlens.db.hba_rules``), as on a team server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from latentlens import db
from latentlens.config import ENV_DATABASE_URL, Settings
from latentlens.errors import (
    ConfigError,
    DatabaseUnavailable,
    InputError,
    LatentLensError,
    PermissionDenied,
    SchemaOutOfDate,
)

Kind = Literal["reader", "writer"]
KINDS: tuple[str, ...] = ("reader", "writer")
MAX_NAME_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer identifiers are silently truncated

EMBEDDED_REFUSAL = (
    f"the embedded server is single-user: set {ENV_DATABASE_URL} to a team server "
    "to manage its users (see docs/team.md)"
)



class NotATeamServer(ConfigError):
    """A team command on the embedded default: the setting given cannot be used (exit 2)."""

    exit_code = 2


_PRIVILEGE_HINT = (
    "managing team members needs a role with CREATEROLE (and, on PostgreSQL 16+, ADMIN on the team's "
    "groups), such as the owner of a docker/ server"
)


# ---------------------------------------------------------------------------
# names, passwords, URLs


def shown(name: str, limit: int = 60) -> str:
    """A role name fit for a one-line message: control characters escaped, long names cut."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(name)} characters)"
    return text


def check_name(name: str) -> str:
    """Validate a role name: 1 to 63 bytes of UTF-8, no NUL. Anything else is fine (it is quoted)."""
    if not isinstance(name, str) or not name:
        raise InputError("a role name cannot be empty")
    if "\x00" in name:
        raise InputError("a role name cannot contain a NUL character")
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise InputError(
            f"role name '{shown(name)}' is {size} bytes: PostgreSQL role names are at most "
            f"{MAX_NAME_BYTES} bytes (UTF-8)"
        )
    return name


def check_password(password: str | None) -> str | None:
    if password is None:
        return None
    if password == "":
        raise InputError("the password is empty (give none to keep a role's password, or create it without one)")
    if "\x00" in password:
        raise InputError("a password cannot contain a NUL character")
    return password


def url_without_password(url: str) -> tuple[str, bool]:
    """The connection string with any password removed; and whether there was one.

    Handles URLs (``user:password@`` and ``?password=``) and key=value
    strings. An empty password (the embedded server's ``postgres:@``) is left
    as it is. Without the password, libpq (psql too) reads it from
    ``PGPASSWORD`` or ``~/.pgpass``.
    """
    if "://" not in url:
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            return "<unparseable connection string>", True
        if not params.pop("password", None):
            return url, False
        return psycopg.conninfo.make_conninfo("", **params), True
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>", True
    had = False
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        user, _, password = userinfo.partition(":")
        if password:
            netloc = f"{user}@{hostport}"
            had = True
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k == "password" and v for k, v in pairs):
            query = urlencode([(k, v) for k, v in pairs if k != "password"], safe="/")
            had = True
    if not had:
        return url, False
    return urlunsplit(parts._replace(netloc=netloc, query=query)), True


def member_url(url: str, name: str) -> str:
    """The admin's connection URL with NAME as the user and no password."""
    url, _ = url_without_password(url)
    if "://" not in url:
        params = psycopg.conninfo.conninfo_to_dict(url)
        params["user"] = name
        return psycopg.conninfo.make_conninfo("", **params)
    parts = urlsplit(url)
    hostport = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(name, safe='')}@{hostport}"))


# ---------------------------------------------------------------------------
# connection and errors


@contextlib.contextmanager
def _connect(database_url: str | None) -> Iterator[tuple[psycopg.Connection, str]]:
    """An autocommit connection to a team server's migrated database (never the embedded one)."""
    settings = Settings.resolve(database_url)
    if settings.embedded:
        raise NotATeamServer(EMBEDDED_REFUSAL)
    url = db.resolve_url(settings)
    conn = db.connect(url, autocommit=True)
    try:
        with _sql_errors("cannot read the database"):
            ok = db.one_row(conn.execute("SELECT to_regprocedure('llens_team_role(text)') IS NOT NULL"))[0]
        if not ok:
            raise SchemaOutOfDate(
                "this database has no team roles (schema older than revision 0004): "
                "run `llens db upgrade` as its owner"
            )
        yield conn, url
    finally:
        conn.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def _sql_errors(action: str, hint: str = _PRIVILEGE_HINT) -> Iterator[None]:
    """PostgreSQL errors as one-line LatentLensErrors (no traceback, no statement text)."""
    try:
        yield
    except LatentLensError:
        raise
    except psycopg.errors.InsufficientPrivilege as e:
        raise PermissionDenied(f"{action}: {_one_line(db.first_line(e))} ({hint})") from None
    except (psycopg.errors.ReservedName, psycopg.errors.InvalidName, psycopg.errors.InvalidParameterValue,
            psycopg.errors.InvalidGrantOperation, psycopg.errors.DuplicateObject) as e:
        raise InputError(f"{action}: {_one_line(db.first_line(e))}") from None
    except psycopg.OperationalError as e:
        raise DatabaseUnavailable(f"{action}: {_one_line(db.first_line(e))}") from None
    except psycopg.Error as e:
        raise LatentLensError(f"{action}: {_one_line(db.first_line(e))}") from None


def _group_names(conn: psycopg.Connection) -> dict[str, str]:
    reader, writer = db.one_row(conn.execute("SELECT llens_team_role('reader'), llens_team_role('writer')"))
    return {"reader": reader, "writer": writer}


def _groups_exist(conn: psycopg.Connection, groups: dict[str, str]) -> bool:
    n = db.one_row(conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", (list(groups.values()),)))[0]
    return n == len(groups)


def _role(conn: psycopg.Connection, name: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT oid, rolcanlogin, rolsuper, rolpassword IS NOT NULL FROM pg_authid WHERE rolname = %s", (name,)
    ).fetchone() if _can_read_authid(conn) else None
    if row is None:
        row = conn.execute(
            "SELECT oid, rolcanlogin, rolsuper, NULL FROM pg_roles WHERE rolname = %s", (name,)
        ).fetchone()
    if row is None:
        return None
    return {"oid": row[0], "can_login": row[1], "superuser": row[2], "has_password": row[3]}


def _can_read_authid(conn: psycopg.Connection) -> bool:
    return bool(db.one_row(conn.execute("SELECT has_table_privilege('pg_authid', 'SELECT')"))[0])


def _memberships(conn: psycopg.Connection, name: str, groups: dict[str, str]) -> list[str]:
    """The kinds ('reader', 'writer') NAME is a direct member of."""
    rows = conn.execute(
        "SELECT DISTINCT g.rolname FROM pg_auth_members m "
        "JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member "
        "WHERE u.rolname = %s AND g.rolname = ANY(%s)",
        (name, list(groups.values())),
    ).fetchall()
    have = {r[0] for r in rows}
    return [k for k in KINDS if groups[k] in have]


def _revoke_group(conn: psycopg.Connection, group: str, name: str) -> None:
    """Remove NAME's membership in GROUP, whoever granted it (PostgreSQL 16+ keeps one per grantor)."""
    conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(group), sql.Identifier(name)))
    grantors = conn.execute(
        "SELECT DISTINCT pg_get_userbyid(m.grantor) FROM pg_auth_members m "
        "WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = %s) "
        "AND m.member = (SELECT oid FROM pg_roles WHERE rolname = %s)",
        (group, name),
    ).fetchall()
    for (grantor,) in grantors:
        conn.execute(sql.SQL("REVOKE {} FROM {} GRANTED BY {}").format(
            sql.Identifier(group), sql.Identifier(name), sql.Identifier(grantor)))


# ---------------------------------------------------------------------------
# the API behind `llens db grant-reader | grant-writer | revoke | users`


def role_exists(database_url: str | None, name: str) -> bool:
    """Whether a role NAME exists on the server (refuses the embedded default)."""
    check_name(name)
    with _connect(database_url) as (conn, _), _sql_errors("cannot look up roles"):
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


def grant(database_url: str | None, name: str, kind: Kind, password: str | None = None) -> dict[str, Any]:
    """Make NAME a team reader or writer.

    Creates the LOGIN role NAME if it does not exist (with PASSWORD, if given);
    an existing role keeps its password unless one is given. Creates the
    team's group roles first if they are missing (``llens_setup_team_roles``,
    which needs the owner with CREATEROLE). A writer is a member of the writer
    group only (which is itself a reader); switching between the two revokes
    the other group.

    Returns ``{"name", "kind", "created", "password_set", "previous", "groups_created",
    "can_login", "has_password", "url"}``.
    """
    check_name(name)
    if kind not in KINDS:
        raise InputError(f"unknown kind '{kind}' (reader or writer)")
    password = check_password(password)
    with _connect(database_url) as (conn, url):
        with _sql_errors("cannot read the team's roles"):
            groups = _group_names(conn)
        if name in groups.values():
            raise InputError(f"'{shown(name)}' is one of this database's team groups, not a member")
        groups_created = False
        with _sql_errors(f"cannot grant {kind} to '{shown(name)}'"), conn.transaction():
            if not _groups_exist(conn, groups):
                with _sql_errors("cannot create the team's group roles",
                                 "run this once as the schema's owner with CREATEROLE, or as a superuser"):
                    conn.execute("SELECT llens_setup_team_roles()")
                groups_created = True
            role = _role(conn, name)
            created = role is None
            hashed = None
            if password is not None:
                try:
                    hashed = conn.pgconn.encrypt_password(password.encode("utf-8"), name.encode("utf-8"), None)
                except psycopg.Error:
                    raise LatentLensError("cannot hash the password for the server") from None
            ident = sql.Identifier(name)
            if created:
                stmt = sql.SQL("CREATE ROLE {} LOGIN").format(ident)
                if hashed is not None:
                    stmt = sql.SQL("{} PASSWORD {}").format(stmt, sql.Literal(hashed.decode("ascii")))
                conn.execute(stmt)
            elif hashed is not None:
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(hashed.decode("ascii"))))
            previous = _memberships(conn, name, groups)
            other = "reader" if kind == "writer" else "writer"
            if other in previous:
                _revoke_group(conn, groups[other], name)
            if kind not in previous:
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(groups[kind]), ident))
            role = _role(conn, name)
    return {
        "name": name, "kind": kind, "created": created, "password_set": password is not None,
        "previous": previous[-1] if previous else None, "groups_created": groups_created,
        "can_login": bool(role and role["can_login"]), "has_password": role and role["has_password"],
        "url": member_url(url, name),
    }


def revoke(database_url: str | None, name: str, *, drop: bool = False) -> dict[str, Any]:
    """Remove NAME from both team groups; with ``drop``, also drop the LOGIN role.

    Dropping refuses group (NOLOGIN) roles and superusers, and a role that
    still owns objects or holds privileges of its own anywhere on the server
    (PostgreSQL's rule): the memberships are revoked all the same.

    Returns ``{"name", "revoked": [kinds], "dropped"}``.
    """
    check_name(name)
    with _connect(database_url) as (conn, _):
        with _sql_errors("cannot read the team's roles"):
            groups = _group_names(conn)
            role = _role(conn, name)
        if role is None:
            raise InputError(f"no role '{shown(name)}' on this server (list the team with `llens db users`)")
        if name in groups.values():
            raise InputError(f"'{shown(name)}' is one of this database's team groups, not a member")
        with _sql_errors(f"cannot revoke '{shown(name)}'"), conn.transaction():
            revoked = _memberships(conn, name, groups)
            for kind in revoked:
                _revoke_group(conn, groups[kind], name)
            left = _memberships(conn, name, groups)
        if left:
            raise LatentLensError(f"'{shown(name)}' is still a {left[0]}: its membership was granted by "
                                  "another role, which must revoke it")
        dropped = False
        if drop:
            if not role["can_login"]:
                raise InputError(f"'{shown(name)}' cannot log in (a group role?): not dropped; "
                                 "drop it with DROP ROLE if you mean it")
            if role["superuser"]:
                raise InputError(f"'{shown(name)}' is a superuser: not dropped")
            with _sql_errors(f"cannot drop '{shown(name)}'"):
                try:
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
                except psycopg.errors.DependentObjectsStillExist as e:
                    detail = _one_line(e.diag.message_detail or "")
                    raise LatentLensError(
                        f"'{shown(name)}' owns objects or holds privileges of its own"
                        f"{' (' + detail[:200] + ')' if detail else ''}, so it was not dropped (its team "
                        "membership is revoked): as the owner run REASSIGN OWNED BY and DROP OWNED BY for it "
                        "in each database, then `llens db revoke --drop` again"
                    ) from None
            dropped = True
    return {"name": name, "revoked": revoked, "dropped": dropped}


def users(database_url: str | None) -> list[dict[str, Any]]:
    """The owner and every direct member of the team's groups: ``{"name", "kind", "can_login"}``.

    The owner is the role that owns the schema's tables (it ran ``llens db
    upgrade``): it migrates and drops models. A member of both groups is
    listed once, as a writer.
    """
    with _connect(database_url) as (conn, _), _sql_errors("cannot list the team"):
        groups = _group_names(conn)
        owner = conn.execute(
            "SELECT r.rolname, r.rolcanlogin FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE c.oid = to_regclass('llens_meta')"
        ).fetchone()
        if owner is None:  # pragma: no cover - the schema check above saw the functions
            owner = db.one_row(conn.execute(
                "SELECT r.rolname, r.rolcanlogin FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
                "WHERE d.datname = current_database()"
            ))
        rows = conn.execute(
            "SELECT u.rolname, bool_or(g.rolname = %(w)s), u.rolcanlogin FROM pg_auth_members m "
            "JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member "
            "WHERE g.rolname IN (%(r)s, %(w)s) AND u.rolname NOT IN (%(r)s, %(w)s) "
            "GROUP BY u.rolname, u.rolcanlogin",
            {"r": groups["reader"], "w": groups["writer"]},
        ).fetchall()
    out = [{"name": owner[0], "kind": "owner", "can_login": bool(owner[1])}]
    members = [{"name": n, "kind": "writer" if w else "reader", "can_login": bool(login)} for n, w, login in rows]
    members.sort(key=lambda r: (r["kind"] != "writer", r["name"]))
    return out + [m for m in members if m["name"] != owner[0]]
