"""The connection, transactions and schema check every part of the store shares."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg

from latentlens import db
from latentlens.config import Settings
from latentlens.errors import InputError, NotDistributed, PermissionDenied, SchemaOutOfDate

S = TypeVar("S", bound="StoreBase")


class StoreBase:
    """One psycopg connection to a latentlens schema; not thread-safe."""

    def __init__(self, conn: psycopg.Connection, url: str):
        self.conn = conn
        self.url = url
        self._reading = False  # inside reading(): _fetch runs in its transaction
        self._depth = 0  # transaction() contexts open: only the outermost may roll back what is left

    # ---- lifecycle ------------------------------------------------------

    @classmethod
    def open(cls: type[S], database_url: str | None = None, *, upgrade: bool | None = None) -> S:
        """Connect to the configured database and check its schema.

        ``upgrade=None`` migrates the embedded default automatically but only
        tells a team server's users to run ``llens db upgrade``.
        """
        from latentlens import migrate

        settings = Settings.resolve(database_url)
        url = db.resolve_url(settings)
        conn = db.connect(url)
        store = cls(conn, url)
        try:
            current = migrate.current_revision(conn)
        except psycopg.errors.InsufficientPrivilege:
            user = conn.info.user
            conn.close()
            raise PermissionDenied(db.no_access(user)) from None
        conn.commit()
        head = migrate.head_revision()
        if current != head:
            do_upgrade = settings.embedded if upgrade is None else upgrade
            if not do_upgrade:
                conn.close()
                state = "has no latentlens schema" if current is None else f"is at schema {current}, this latentlens needs {head}"
                raise SchemaOutOfDate(f"the database {state}: run `llens db upgrade`")
            migrate.upgrade(url)
            db.register_vector_types(conn)
            conn.commit()
        return store

    def ann_supported(self) -> bool:
        """Whether this server may build and scan ANN indexes.

        The embedded server records a probe's answer in its configuration
        (``llens.ann_index``, see db.ensure_ann_probe); a team server says
        'on' unless its administrator set it 'off'.
        """
        return bool(self._fetch("SELECT llens_ann_enabled()")[0][0])

    def citus(self) -> bool:
        """Whether this database is a Citus coordinator (the extension is installed)."""
        if not hasattr(self, "_citus"):
            self._citus = bool(self._fetch("SELECT llens_citus()")[0][0])
        return self._citus

    def _citus_turn(self, conn: psycopg.Connection, citus: bool, what: str, key: int = 0) -> None:
        """On Citus, writers of the same reference-table rows take turns (until commit).

        Two transactions writing the same keys of a reference table (INSERT ... ON
        CONFLICT, row locks) lock them on every node in whatever order the nodes answer,
        and deadlock across nodes. ``citus`` is ``self.citus()``, asked before the
        transaction began.
        """
        if citus:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), %s)", (what, key))

    def distribute(self, shard_count: int = 32) -> list[str]:
        """Run docs/scaling.md's distribution (``llens_distribute``); the steps it took.

        Idempotent: on a distributed store it does nothing and returns no steps.
        """
        try:
            rows = self._fetch("SELECT llens_distribute(%s)", (int(shard_count),))
        except psycopg.errors.FeatureNotSupported as e:
            raise NotDistributed(db.first_line(e).removeprefix("llens: ")) from None
        except psycopg.errors.InvalidParameterValue as e:
            raise InputError(db.first_line(e).removeprefix("llens: ")) from None
        self.__dict__.pop("_citus", None)
        return [r[0] for r in rows]

    def sibling(self: S) -> S:
        """A second store on a connection of its own to the same database (already checked by
        ``open``), for work in another thread: copying several leaves at once, building two
        indexes at once. Close it."""
        return type(self)(db.connect(self.url), self.url)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """Commit on success, roll back on error; a refused privilege becomes PermissionDenied."""
        self._depth += 1
        try:
            with self.conn.transaction():
                yield self.conn
        except psycopg.errors.InsufficientPrivilege as e:
            msg = (e.diag.message_primary or str(e)).strip().splitlines()[0]
            raise PermissionDenied(
                f"permission denied for database user {self.conn.info.user}: {msg} "
                "(what each role may do: docs/team.md)") from None
        finally:
            self._depth -= 1
            # a dead connection cannot roll back: leave its own error (the real cause) to surface;
            # a nested one (a savepoint: reading() around answer_columns) leaves it to the outermost
            if self._depth == 0 and not self.conn.broken and self.conn.info.transaction_status in (
                    psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR):
                self.conn.rollback()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Run the plain reads inside (``_fetch``: contexts, provenance, get_model ...) in one
        transaction: one BEGIN and one COMMIT for all of them, not a pair each (every
        answer reads its sentences and its provenance: 6 round trips, now 4). Reads only:
        a nested ``transaction()`` would be a savepoint of this one."""
        if self._reading:
            yield
            return
        with self.transaction():
            self._reading = True
            try:
                yield
            finally:
                self._reading = False

    @contextmanager
    def _reads(self) -> Iterator[psycopg.Connection]:
        """The connection for reads: reading()'s transaction when inside one (no savepoint
        round trips), else a transaction of their own."""
        if self._reading:
            yield self.conn
            return
        with self.transaction() as conn:
            yield conn

    def _fetch(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[tuple]:
        with self._reads() as conn:
            return conn.execute(sql, params).fetchall()

    def current_user(self) -> str:
        """The database role this connection acts as (a signed-in member on a team server)."""
        return str(self._fetch("SELECT current_user")[0][0])

    def instance_id(self) -> str:
        """A uuid made when the schema was created: identifies this database in caches."""
        return self._fetch("SELECT value FROM llens_meta WHERE key = 'instance_id'")[0][0]

