"""Writing and reading token embeddings: binary COPY in, quotas, binary COPY out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
from psycopg import sql

from latentlens.db import one_row
from latentlens.errors import DimensionMismatch, UnknownLayer
from latentlens.pgcopy import HEADER, TRAILER, decode_rows, encode_rows, normalize_rows, row_size
from latentlens.store.base import StoreBase
from latentlens.store.types import KEY_DTYPE, EmbeddingBatch, ModelInfo

EMBEDDING_COLUMNS: tuple[tuple[str, str], ...] = (
    ("model_id", "int4"),
    ("layer", "int4"),
    ("sentence_id", "int8"),
    ("position", "int4"),
    ("token_id", "int4"),
    ("char_start", "int4"),
    ("char_end", "int4"),
    ("prefix_hash", "int8"),
    ("embedding", "halfvec"),
)
SCAN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sentence_id", "int8"),
    ("position", "int4"),
    ("token_id", "int4"),
    ("char_start", "int4"),  # coalesce(char_start, -1): the COPY sends no NULL
    ("char_end", "int4"),
    ("embedding", "halfvec"),
)


class EmbeddingsMixin(StoreBase):
    """Bulk writes (one transaction per batch, all layers) and streaming reads of a leaf."""

    if TYPE_CHECKING:  # CatalogMixin's, which Store combines with this one
        def get_model(self, name: str | ModelInfo) -> ModelInfo: ...

    # ---- embeddings -----------------------------------------------------

    def write_embeddings(
        self,
        model: ModelInfo,
        batch: EmbeddingBatch,
        *,
        max_contexts_per_token: int | None = None,
        on_commit: Any = None,
    ) -> int:
        """Write one batch of contexts for all its layers in one transaction.

        With ``max_contexts_per_token`` the batch's rows are first granted
        against ``token_quota`` (first come, first served, shared by all
        layers, across runs and concurrent writers); rows beyond a token's
        quota are dropped. ``on_commit(conn, rows_written)`` runs inside the
        same transaction, e.g. to advance an ingest run's progress, so rows and
        progress commit together. Returns the number of contexts written.
        """
        if len(batch) == 0 and on_commit is None:
            return 0
        known = set(model.layer_numbers)
        missing = sorted(set(batch.vectors) - known)
        if missing:
            raise UnknownLayer(f"model '{model.name}' has no layer {missing[0]}: register it first")
        for layer, vecs in batch.vectors.items():
            if vecs.ndim != 2 or vecs.shape[1] != model.hidden_size:
                raise DimensionMismatch(
                    f"layer {layer} vectors have shape {tuple(vecs.shape)}, "
                    f"model '{model.name}' has hidden size {model.hidden_size}"
                )
        citus = self.citus()
        with self.transaction() as conn:
            # Rows and the caller's progress commit atomically, so a commit lost
            # to a crash is simply redone on resume: no need to wait for the
            # WAL flush on every batch.
            conn.execute("SET LOCAL synchronous_commit = off")
            # token_quota and model_layer rows are on every node: writers of one model
            # take turns per batch on Citus
            self._citus_turn(conn, citus, "llens_write", model.id)
            if max_contexts_per_token is not None and len(batch):
                batch = self._apply_quota(conn, model, batch, max_contexts_per_token)
            n = len(batch)
            if n:
                self._copy_embeddings(conn, model, batch)
                # an owner-run function: a writer cannot UPDATE model_layer, only add to its counts
                conn.execute("SELECT llens_add_rows(%s, %s, %s)", (model.id, sorted(batch.vectors), n))
            if on_commit is not None:
                on_commit(conn, n)
        return n

    @staticmethod
    def _apply_quota(conn: psycopg.Connection, model: ModelInfo, batch: EmbeddingBatch, cap: int) -> EmbeddingBatch:
        """Keep each token's first rows (in corpus order) up to what llens_take_quota grants it.

        The function (owner-run: a writer cannot UPDATE token_quota) locks the
        tokens' quota rows in token-id order, so concurrent writers queue on
        shared tokens instead of deadlocking.
        """
        tok = batch.token_id.astype(np.int64)
        uniq, counts = np.unique(tok, return_counts=True)
        rows = conn.execute(
            "SELECT tok, granted FROM llens_take_quota(%s, %s::int[], %s::int[], %s)",
            (model.id, uniq.tolist(), counts.tolist(), int(cap)),
        ).fetchall()
        granted: dict[int, int] = dict(rows)
        # the k-th row of a token (k from 0, corpus order) is kept if k < granted, without a Python loop
        order = np.argsort(tok, kind="stable")
        st = tok[order]
        first = np.r_[0, np.flatnonzero(st[1:] != st[:-1]) + 1]
        sizes = np.diff(np.r_[first, len(st)])
        rank = np.arange(len(st)) - np.repeat(first, sizes)
        allowed = np.array([granted.get(int(t), 0) for t in st[first]], dtype=np.int64)
        keep = np.zeros(len(batch), dtype=bool)
        keep[order] = rank < allowed.repeat(sizes)
        return batch.select(keep)

    def set_placement(self, model: ModelInfo, layer: int, sentence_id: np.ndarray, position: np.ndarray,
                      char_start: np.ndarray, char_end: np.ndarray, prefix_hash: np.ndarray) -> int:
        """Give stored rows their spans and prefix hashes (-1 spans: NULL); return rows changed.

        For rows imported without the model's tokenizer, placed again once it is known.
        """
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE token_embedding e SET char_start = nullif(u.cs, -1), char_end = nullif(u.ce, -1), "
                "prefix_hash = u.ph FROM unnest(%(s)s::int8[], %(p)s::int4[], %(cs)s::int4[], %(ce)s::int4[], "
                "%(ph)s::int8[]) AS u(sid, pos, cs, ce, ph) WHERE e.model_id = %(m)s AND e.layer = %(l)s "
                "AND e.sentence_id = u.sid AND e.position = u.pos AND (e.char_start IS DISTINCT FROM nullif(u.cs, -1) "
                "OR e.char_end IS DISTINCT FROM nullif(u.ce, -1) OR e.prefix_hash <> u.ph)",
                {"m": model.id, "l": layer, "s": sentence_id.tolist(), "p": position.tolist(),
                 "cs": char_start.tolist(), "ce": char_end.tolist(), "ph": prefix_hash.tolist()},
            )
            if cur.rowcount:
                conn.execute("UPDATE model_layer SET version = version + 1 WHERE model_id = %s AND layer = %s",
                             (model.id, layer))
            return cur.rowcount

    def count_quota(self, model: ModelInfo, layer: int) -> None:
        """Raise ``token_quota`` to the contexts each token has in this leaf.

        Rows written without ``max_contexts_per_token`` (an import) take no quota;
        counting them afterwards makes a later ingest's cap include them. One context
        is one row of a leaf, and every layer of a model holds the same contexts, so
        the largest count over the model's leaves is the contexts stored.
        """
        with self.transaction() as conn:
            # owner-run (writers cannot write token_quota): the counts come from the rows
            conn.execute("SELECT llens_count_quota(%s, %s)", (model.id, layer))

    @staticmethod
    def _copy_embeddings(conn: psycopg.Connection, model: ModelInfo, batch: EmbeddingBatch) -> None:
        n = len(batch)
        parts = [HEADER]
        for layer in sorted(batch.vectors):
            parts.append(
                encode_rows(
                    EMBEDDING_COLUMNS,
                    {
                        "model_id": np.full(n, model.id, dtype=np.int32),
                        "layer": np.full(n, layer, dtype=np.int32),
                        "sentence_id": batch.sentence_id,
                        "position": batch.position,
                        "token_id": batch.token_id,
                        "char_start": batch.char_start,
                        "char_end": batch.char_end,
                        "prefix_hash": batch.prefix_hash,
                        "embedding": normalize_rows(batch.vectors[layer]),
                    },
                    nullable=("char_start", "char_end"),
                )
            )
        parts.append(TRAILER)
        cols = ", ".join(name for name, _ in EMBEDDING_COLUMNS)
        # COPY into the parent: tuples are routed to their (model, layer) leaf.
        with conn.cursor().copy(f"COPY token_embedding ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(b"".join(parts))

    def token_quota(self, model: ModelInfo | str) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, contexts stored) of a model's tokens that have any, from ``token_quota``.

        What an ingest plans with: a row whose token already has its cap here (counting
        the rows planned before it) is refused at write time whatever else runs, since
        the quota only grows while rows are written (see ingest._plan)."""
        info = self.get_model(model) if isinstance(model, str) else model
        rows = self._fetch("SELECT token_id, used FROM token_quota WHERE model_id = %s AND used > 0", (info.id,))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        arr = np.array(rows, dtype=np.int64)
        return arr[:, 0], arr[:, 1]

    def prefix_hashes(self, model: ModelInfo | str) -> np.ndarray:
        """Every stored prefix hash of a model (rebuilds prefix dedup state on resume)."""
        info = self.get_model(model) if isinstance(model, str) else model
        if not info.layers:
            return np.zeros(0, dtype=np.int64)
        rows = self._read_leaf_columns(info, info.layers[0].layer, (("prefix_hash", "int8"),))
        return rows["prefix_hash"].astype(np.int64)

    def _read_leaf_columns(
        self, info: ModelInfo, layer: int, columns: tuple[tuple[str, str], ...]
    ) -> np.ndarray:
        """Fixed-size, non-NULL columns of every row of a leaf, by one binary COPY.

        ``columns`` are (name, pg type) pairs from this module, never user input.
        """
        names = ", ".join(name for name, _ in columns)
        payload = bytearray()
        with self.transaction() as conn, conn.cursor().copy(
            f"COPY (SELECT {names} FROM token_embedding WHERE model_id = %s AND layer = %s) "
            "TO STDOUT (FORMAT BINARY)",
            (info.id, layer),
        ) as copy:
            for chunk in copy:
                payload += chunk
        return decode_rows(columns, bytes(payload)[len(HEADER): -len(TRAILER)])

    def iter_layer(
        self, model: ModelInfo | str, layer: int, *, chunk_rows: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream a leaf as (keys, vectors) chunks of at most ``chunk_rows`` rows, in one snapshot.

        ``keys`` is a structured array (sentence_id, position, token_id);
        ``vectors`` is float16 [n, D] (the stored unit vectors). Memory is
        bounded by about ``chunk_rows`` whatever the leaf's size.
        """
        info = self.get_model(model) if isinstance(model, str) else model
        info.layer(layer)
        # TID range scans came with PostgreSQL 14; a distributed leaf (Citus) has no ctid to range over
        if self.conn.info.server_version >= 140000 and not self.citus():
            yield from self._iter_layer_ranges(info, layer, chunk_rows)
        else:
            yield from self._iter_layer_copy(info, layer, chunk_rows)

    def _iter_layer_ranges(
        self, info: ModelInfo, layer: int, chunk_rows: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The leaf as one bytea per range of heap blocks, each built by the server.

        Binary COPY sends one message per row, and reading each costs the client ~3-7 us of
        Python under the GIL: 35k rows x 8 leaves copied side by side were seconds of one
        core. Here each message holds ~``chunk_rows`` rows packed back to back
        (int8send || int4send x 4 || halfvec_send). One statement, so one snapshot;
        each block range is read once by a TID range scan.
        """
        dim = info.hidden_size
        with self.transaction() as conn:
            blocks, rows = one_row(conn.execute(
                "SELECT pg_relation_size(to_regclass(llens_leaf_name(%(m)s, %(l)s))) "
                "/ current_setting('block_size')::int, row_count FROM model_layer "
                "WHERE model_id = %(m)s AND layer = %(l)s", {"m": info.id, "l": layer}))
            # blocks that hold ~chunk_rows rows at the leaf's mean density (a hint: never correctness)
            step = max(1, min(1 << 30, int(chunk_rows * (blocks or 0) // max(int(rows), 1))))
            # the last range is open above (block numbers are uint32): a block added
            # after the size was read holds no row this statement's snapshot sees anyway
            cur = conn.cursor(binary=True)
            for (body,) in cur.stream(
                "SELECT (SELECT string_agg(int8send(sentence_id) || int4send(position) || int4send(token_id) "
                "|| int4send(coalesce(char_start, -1)) || int4send(coalesce(char_end, -1)) "
                "|| halfvec_send(embedding), ''::bytea) FROM token_embedding "
                "WHERE model_id = %(m)s AND layer = %(l)s AND ctid >= format('(%%s,0)', g)::tid "
                "AND ctid < format('(%%s,0)', CASE WHEN g + %(s)s > n.blocks THEN 4294967295 ELSE g + %(s)s END)::tid) "
                "FROM (SELECT coalesce(pg_relation_size(to_regclass(llens_leaf_name(%(m)s, %(l)s))), 0) "
                "/ current_setting('block_size')::int8 AS blocks) n, generate_series(0, n.blocks, %(s)s) AS g",
                {"m": info.id, "l": layer, "s": step},
            ):
                if body:
                    keys, vectors = _split_packed(body, dim)
                    for lo in range(0, len(keys), chunk_rows):  # a denser range than the mean: split
                        yield keys[lo:lo + chunk_rows], vectors[lo:lo + chunk_rows]

    def _iter_layer_copy(
        self, info: ModelInfo, layer: int, chunk_rows: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The leaf by one binary COPY (a message per row: the path for Citus and PostgreSQL < 14)."""
        dim = info.hidden_size
        size = row_size(SCAN_COLUMNS, dim)
        buf = bytearray()
        started = False
        with self.transaction() as conn, conn.cursor().copy(
            "COPY (SELECT sentence_id, position, token_id, coalesce(char_start, -1), coalesce(char_end, -1), "
            "embedding FROM token_embedding "
            "WHERE model_id = %s AND layer = %s) TO STDOUT (FORMAT BINARY)",
            (info.id, layer),
        ) as copy:
            for chunk in copy:
                buf += chunk
                if not started and len(buf) >= len(HEADER):
                    del buf[: len(HEADER)]
                    started = True
                while started and len(buf) >= size * chunk_rows:
                    yield _split_scan(bytes(memoryview(buf)[: size * chunk_rows]), dim)  # one copy, not two
                    del buf[: size * chunk_rows]
        if started:
            body = bytes(buf[: len(buf) - len(TRAILER)])
            if body:
                yield _split_scan(body, dim)

    def sample_layer(self, model: ModelInfo | str, layer: int, rows: int = 2048) -> np.ndarray:
        """About ``rows`` stored vectors of a leaf (float16 [n, D]), drawn by page sampling.

        Cheap whatever the leaf's size (TABLESAMPLE SYSTEM reads only the
        sampled pages): the search policy's distribution test compares
        queries against it.
        """
        info = self.get_model(model) if isinstance(model, str) else model
        li = info.layer(layer)
        pct = min(100.0, 100.0 * 1.5 * rows / max(li.row_count, 1))
        with self.transaction() as conn:
            leaf = one_row(conn.execute("SELECT llens_leaf_name(%s, %s)", (info.id, layer)))[0]
            sampled = sql.SQL("{} TABLESAMPLE SYSTEM ({}) REPEATABLE (0)").format(
                sql.Identifier(leaf), sql.Literal(pct)) if pct < 100 else sql.Identifier(leaf)
            query = sql.SQL("COPY (SELECT embedding FROM {} LIMIT {}) TO STDOUT (FORMAT BINARY)").format(
                sampled, sql.Literal(int(rows)))
            payload = bytearray()
            with conn.cursor().copy(query) as copy:
                for chunk in copy:
                    payload += chunk
        body = bytes(payload)[len(HEADER): -len(TRAILER)]
        if not body:
            return np.zeros((0, info.hidden_size), dtype=np.float16)
        return decode_rows((("embedding", "halfvec"),), body, info.hidden_size)["embedding"].astype(np.float16)

    def layer_keys(self, model: ModelInfo | str, layer: int) -> np.ndarray:
        """(sentence_id, position) of every row of a leaf, by binary COPY, no vectors.

        Lets an import skip rows already written (re-import is idempotent).
        """
        info = self.get_model(model) if isinstance(model, str) else model
        info.layer(layer)
        rows = self._read_leaf_columns(info, layer, (("sentence_id", "int8"), ("position", "int4")))
        keys = np.empty(len(rows), dtype=[("sentence_id", "<i8"), ("position", "<i4")])
        keys["sentence_id"] = rows["sentence_id"]
        keys["position"] = rows["position"]
        return keys

    def token_texts(self, model: ModelInfo | str, token_ids: Sequence[int] | None = None) -> dict[int, str]:
        """Token id -> text from the model's vocabulary (all of it when ``token_ids`` is None)."""
        info = self.get_model(model) if isinstance(model, str) else model
        if token_ids is None:
            rows = self._fetch("SELECT token_id, token FROM token WHERE model_id = %s", (info.id,))
        else:
            rows = self._fetch(
                "SELECT token_id, token FROM token WHERE model_id = %s AND token_id = ANY(%s::int[])",
                (info.id, sorted({int(t) for t in token_ids})),
            )
        return {int(i): t for i, t in rows}

    def add_tokens(self, model: ModelInfo | str, token_ids: Sequence[int], tokens: Sequence[str]) -> int:
        """Add vocabulary entries one by one (ids already known are kept); return rows added.

        For indexes imported without their tokenizer: only the tokens seen are known.
        """
        info = self.get_model(model) if isinstance(model, str) else model
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO token (model_id, token_id, token) "
                "SELECT %s, t.i, t.s FROM unnest(%s::int[], %s::text[]) AS t(i, s) ON CONFLICT DO NOTHING",
                (info.id, [int(t) for t in token_ids], [s.replace("\x00", "") for s in tokens]),
            )
            return cur.rowcount



def _split_scan(body: bytes, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rows = decode_rows(SCAN_COLUMNS, body, dim)
    return _keys_of(rows), rows["embedding"].astype(np.float16)


def _keys_of(rows: np.ndarray) -> np.ndarray:
    """KEY_DTYPE keys of decoded rows (their fields of the same names)."""
    keys = np.empty(len(rows), dtype=KEY_DTYPE)
    for name in KEY_DTYPE.names or ():
        keys[name] = rows[name]
    return keys


def _split_packed(body: bytes, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, float16 vectors) of rows packed as _iter_layer_ranges' query sends them."""
    packed = np.dtype([("sentence_id", ">i8"), ("position", ">i4"), ("token_id", ">i4"),
                       ("char_start", ">i4"), ("char_end", ">i4"),
                       ("_dim", ">i2"), ("_unused", ">i2"), ("embedding", ">f2", (dim,))])
    if len(body) % packed.itemsize:
        raise ValueError(f"a leaf chunk of {len(body)} bytes is not whole rows of {packed.itemsize}")
    rows = np.frombuffer(body, dtype=packed)
    if len(rows) and (rows["_dim"] != dim).any():
        raise DimensionMismatch(f"a stored vector does not have the model's {dim} dimensions")
    return _keys_of(rows), rows["embedding"].astype(np.float16)
