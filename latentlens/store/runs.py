"""Ingest run bookkeeping: create, claim, advance (with the rows), finish, list."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from latentlens.errors import InputError, PermissionDenied
from latentlens.store.base import StoreBase
from latentlens.store.types import CorpusInfo, ModelInfo, RunInfo


class RunsMixin(StoreBase):
    """Rows of ingest_run: what ran, how far it got, how it ended."""

    if TYPE_CHECKING:  # CatalogMixin's, which Store combines with this one
        def get_corpus(self, name: str) -> CorpusInfo: ...

    # ---- ingest runs ----------------------------------------------------

    _RUN_SELECT = """
        SELECT r.id, m.name, r.model_id, c.name, r.corpus_id, r.layers, r.params, r.shard,
               r.num_shards, r.status, r.sentences_total, r.sentences_done, r.resume_ordinal,
               r.tokens_seen, r.rows_written, r.counters, r.error, r.hostname, r.pid,
               r.started_at, r.heartbeat_at, r.finished_at, r.kind
          FROM ingest_run r JOIN model m ON m.id = r.model_id JOIN corpus c ON c.id = r.corpus_id
    """

    def create_run(
        self, model: ModelInfo, corpus: CorpusInfo, *, layers: Sequence[int], params: Mapping[str, Any],
        shard: int = 0, num_shards: int = 1, sentences_total: int | None = None,
        hostname: str | None = None, pid: int | None = None, kind: str = "ingest",
    ) -> RunInfo:
        rows = self._fetch(
            "INSERT INTO ingest_run (model_id, corpus_id, layers, params, shard, num_shards, "
            "sentences_total, hostname, pid, kind) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (model.id, corpus.id, list(layers), Jsonb(dict(params)), shard, num_shards,
             sentences_total, hostname, pid, kind),
        )
        return self.get_run(rows[0][0])

    def get_run(self, run_id: int) -> RunInfo:
        rows = self._fetch(self._RUN_SELECT + " WHERE r.id = %s", (run_id,))
        if not rows:
            last = self._fetch("SELECT max(id) FROM ingest_run")[0][0]
            hint = f"run ids go up to {last}" if last else "no runs yet"
            raise InputError(f"no ingest run {run_id} ({hint}; see `llens runs`)")
        return RunInfo(*rows[0])

    def find_runs(
        self, model: ModelInfo, corpus: CorpusInfo, *, params: Mapping[str, Any], shard: int, num_shards: int,
        kind: str = "ingest",
    ) -> list[RunInfo]:
        """Runs of the same kind, model, corpus, parameters and shard, newest first."""
        rows = self._fetch(
            self._RUN_SELECT + " WHERE r.model_id = %s AND r.corpus_id = %s AND r.params = %s "
            "AND r.shard = %s AND r.num_shards = %s AND r.kind = %s ORDER BY r.id DESC",
            (model.id, corpus.id, Jsonb(dict(params)), shard, num_shards, kind),
        )
        return [RunInfo(*r) for r in rows]

    def list_runs(self, model: str | None = None, status: str | None = None) -> list[RunInfo]:
        rows = self._fetch(
            self._RUN_SELECT + " WHERE (%(m)s::text IS NULL OR m.name = %(m)s) "
            "AND (%(s)s::text IS NULL OR r.status = %(s)s) ORDER BY r.id",
            {"m": model, "s": status},
        )
        return [RunInfo(*r) for r in rows]

    def claim_run(self, run: RunInfo, *, hostname: str, pid: int, sentences_total: int | None = None) -> bool:
        """Take over a run (compare-and-swap on its status and pid); False if someone else did.

        A writer may take over only the runs it started (row-level security on
        ingest_run.created_by): another member's run is refused, not silently skipped.
        """
        rows = self._fetch(
            "UPDATE ingest_run SET status = 'running', hostname = %s, pid = %s, error = NULL, "
            "finished_at = NULL, heartbeat_at = now(), sentences_total = coalesce(%s, sentences_total) "
            "WHERE id = %s AND status = %s AND pid IS NOT DISTINCT FROM %s RETURNING id",
            (hostname, pid, sentences_total, run.id, run.status, run.pid),
        )
        if not rows:
            self._check_run_is_mine(run.id)
        return bool(rows)

    def _check_run_is_mine(self, run_id: int) -> None:
        """Raise PermissionDenied if row-level security hides this run from the user's UPDATEs."""
        row = self._fetch(
            "SELECT created_by, current_user, row_security_active('ingest_run') FROM ingest_run WHERE id = %s",
            (run_id,),
        )
        if row and row[0][2] and row[0][0] != row[0][1]:
            who = row[0][0] or "a member before revision 0006"
            raise PermissionDenied(
                f"run {run_id} (same model, corpus, parameters and shard) was started by {who}: only they "
                "or the database's owner can resume it (what each role may do: docs/team.md)")

    @staticmethod
    def advance_run(
        conn: psycopg.Connection, run_id: int, *, resume_ordinal: int, sentences: int, tokens: int,
        rows: int, counters: Mapping[str, Any],
    ) -> None:
        """Record progress inside a write transaction (see write_embeddings' on_commit)."""
        conn.execute(
            "UPDATE ingest_run SET resume_ordinal = %s, sentences_done = sentences_done + %s, "
            "tokens_seen = tokens_seen + %s, rows_written = rows_written + %s, counters = %s, "
            "heartbeat_at = now() WHERE id = %s",
            (resume_ordinal, sentences, tokens, rows, Jsonb(dict(counters)), run_id),
        )

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> bool:
        """Record how a run ended. For 'done', return whether every shard of its run is now done.

        The shards of one sharded run (same model, corpus, parameters and
        shard count) take one advisory lock per model here, so finishers
        are serialised and exactly one of them sees all shards done: that
        one builds the indexes.
        """
        with self.transaction() as conn:
            me = conn.execute(
                "SELECT model_id, corpus_id, params, num_shards FROM ingest_run WHERE id = %s", (run_id,)
            ).fetchone()
            siblings = []
            if me:
                # an advisory lock, not FOR UPDATE: row-level security would hide the
                # shards other members started from a writer's row locks
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('llens_finish'), %s)", (me[0],))
                siblings = conn.execute(
                    "SELECT id, shard, status FROM ingest_run WHERE model_id = %s AND corpus_id = %s "
                    "AND params = %s AND num_shards = %s ORDER BY id",
                    (me[0], me[1], Jsonb(me[2]), me[3]),
                ).fetchall()
            # no now() inside CASE: Citus refuses non-immutable functions in CASE in an
            # UPDATE of a table it manages (ingest_run is a Citus local table there)
            finished = ", finished_at = now()" if status == "done" else ""
            conn.execute(
                "UPDATE ingest_run SET status = %s, error = %s, heartbeat_at = now()" + finished + " WHERE id = %s",
                (status, error, run_id),
            )
        if status != "done" or not me:
            return False
        done = {shard for rid, shard, st in siblings if st == "done" or rid == run_id}
        return len(done) == me[3]

    def corpus_ids(self, corpus: CorpusInfo | str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, ordinals) of a corpus in ordinal order, without the texts."""
        info = self.get_corpus(corpus) if isinstance(corpus, str) else corpus
        rows = self._fetch(
            "SELECT coalesce(array_agg(id ORDER BY ordinal), '{}'), coalesce(array_agg(ordinal ORDER BY ordinal), '{}') "
            "FROM sentence WHERE corpus_id = %s", (info.id,)
        )
        return np.array(rows[0][0], dtype=np.int64), np.array(rows[0][1], dtype=np.int64)

    def corpus_sentences(self, corpus: CorpusInfo | str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(ids, ordinals, texts) of a corpus in ordinal order (resume needs no corpus file)."""
        info = self.get_corpus(corpus) if isinstance(corpus, str) else corpus
        rows = self._fetch(
            "SELECT id, ordinal, text FROM sentence WHERE corpus_id = %s ORDER BY ordinal", (info.id,)
        )
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        ords = np.array([r[1] for r in rows], dtype=np.int64)
        return ids, ords, [r[2] for r in rows]

