"""The store: models, corpora, sentences and token embeddings in PostgreSQL.

Speaks numpy and SQL only (never torch), so a SQL-only install stays light.
One ``Store`` wraps one psycopg connection and is not thread-safe: give each
thread its own (``Store.open`` is cheap once the server is up).

Bulk writes use binary COPY encoded with numpy (latentlens.pgcopy); a batch
of embeddings for all layers, the quota bookkeeping and the caller's run
progress commit in one transaction, so a killed process never leaves rows
that its run does not account for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from latentlens import db
from latentlens.config import Settings
from latentlens.errors import (
    DimensionMismatch,
    EmptyResult,
    IndexUnsupported,
    InputError,
    LatentLensError,
    ModelMismatch,
    SchemaOutOfDate,
    UnknownCorpus,
    UnknownLayer,
    UnknownModel,
)
from latentlens.pgcopy import HEADER, TRAILER, decode_rows, encode_rows, normalize_rows, row_size

HALFVEC_HNSW_MAX_DIM = 4000

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
    ("embedding", "halfvec"),
)


# --------------------------------------------------------------------------
# value objects


@dataclass(frozen=True)
class LayerInfo:
    layer: int
    row_count: int
    version: int
    index_kind: str | None


@dataclass(frozen=True)
class ModelInfo:
    id: int
    name: str
    hidden_size: int
    num_layers: int
    revision: str | None = None
    architecture: str | None = None
    dtype: str | None = None
    tokenizer_class: str | None = None
    bos_token_id: int | None = None
    params: dict = field(default_factory=dict)
    layers: tuple[LayerInfo, ...] = ()

    @property
    def layer_numbers(self) -> list[int]:
        return [li.layer for li in self.layers]

    @property
    def row_count(self) -> int:
        return sum(li.row_count for li in self.layers)

    def layer(self, layer: int) -> LayerInfo:
        for li in self.layers:
            if li.layer == layer:
                return li
        have = ", ".join(str(x) for x in self.layer_numbers) or "none"
        raise UnknownLayer(f"model '{self.name}' has no stored layer {layer} (stored layers: {have})")


@dataclass(frozen=True)
class CorpusInfo:
    id: int
    name: str
    content_hash: str
    source: str | None
    sentence_count: int


@dataclass(frozen=True)
class RunInfo:
    """One ``llens ingest`` run (one shard of one model over one corpus)."""

    id: int
    model: str
    model_id: int
    corpus: str
    corpus_id: int
    layers: list[int]
    params: dict
    shard: int
    num_shards: int
    status: str
    sentences_total: int | None
    sentences_done: int
    resume_ordinal: int
    tokens_seen: int
    rows_written: int
    counters: dict
    error: str | None
    hostname: str | None
    pid: int | None
    started_at: Any
    heartbeat_at: Any
    finished_at: Any

    @property
    def duration_s(self) -> float:
        end = self.finished_at or self.heartbeat_at
        return max(0.0, (end - self.started_at).total_seconds())


@dataclass
class EmbeddingBatch:
    """Rows for one batch of token contexts, shared by every layer.

    ``char_start``/``char_end`` < 0 mean the span is unknown (stored as NULL).
    ``vectors`` maps layer -> [N, D] float array (normalised by the store).
    """

    sentence_id: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray
    prefix_hash: np.ndarray
    vectors: Mapping[int, np.ndarray]

    def __len__(self) -> int:
        return len(self.sentence_id)

    def select(self, mask: np.ndarray) -> EmbeddingBatch:
        return EmbeddingBatch(
            self.sentence_id[mask], self.position[mask], self.token_id[mask],
            self.char_start[mask], self.char_end[mask], self.prefix_hash[mask],
            {layer: v[mask] for layer, v in self.vectors.items()},
        )


@dataclass
class KnnResult:
    """k nearest rows of one (model, layer) for Q queries, best first.

    Arrays are [Q, k]; where a leaf has fewer than k rows the tail is padded
    with similarity -inf and ids -1.
    """

    layer: int
    similarity: np.ndarray
    sentence_id: np.ndarray
    position: np.ndarray
    token_id: np.ndarray


@dataclass(frozen=True)
class Context:
    """Where a stored embedding came from."""

    sentence_id: int
    position: int
    token_id: int
    token: str | None
    sentence: str
    char_start: int | None
    char_end: int | None


def text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


# --------------------------------------------------------------------------
# the store


class Store:
    """Typed access to the latentlens schema over one psycopg connection."""

    def __init__(self, conn: psycopg.Connection, url: str):
        self.conn = conn
        self.url = url

    # ---- lifecycle ------------------------------------------------------

    @classmethod
    def open(cls, database_url: str | None = None, *, upgrade: bool | None = None) -> Store:
        """Connect to the configured database and check its schema.

        ``upgrade=None`` migrates the embedded default automatically but only
        tells a team server's users to run ``llens db upgrade``.
        """
        from latentlens import migrate

        settings = Settings.resolve(database_url)
        url = db.resolve_url(settings)
        conn = db.connect(url)
        store = cls(conn, url)
        current = migrate.current_revision(conn)
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
        if settings.embedded:
            store._set_meta("ann_index", "on" if db.embedded_ann_supported() else "off")
        return store

    def _set_meta(self, key: str, value: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO llens_meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value WHERE llens_meta.value <> excluded.value",
                (key, value),
            )

    def ann_supported(self) -> bool:
        """Whether this server can build/scan ANN indexes (see db.embedded_ann_supported)."""
        rows = self._fetch("SELECT value FROM llens_meta WHERE key = 'ann_index'")
        return not rows or rows[0][0] != "off"

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """Commit on success, roll back on error."""
        try:
            with self.conn.transaction():
                yield self.conn
        finally:
            if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self.conn.rollback()

    def _fetch(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[tuple]:
        with self.transaction() as conn:
            return conn.execute(sql, params).fetchall()

    def instance_id(self) -> str:
        """A uuid made when the schema was created: identifies this database in caches."""
        return self._fetch("SELECT value FROM llens_meta WHERE key = 'instance_id'")[0][0]

    # ---- models ---------------------------------------------------------

    def register_model(
        self,
        name: str,
        *,
        hidden_size: int,
        num_layers: int,
        revision: str | None = None,
        architecture: str | None = None,
        dtype: str | None = None,
        tokenizer_class: str | None = None,
        bos_token_id: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> ModelInfo:
        """Register a model by name, or check an existing one has the same shape."""
        if not name or len(name) > 512:
            raise InputError("a model name must have 1 to 512 characters")
        with self.transaction() as conn:
            conn.execute(
                """
                INSERT INTO model (name, revision, architecture, hidden_size, num_layers,
                                   dtype, tokenizer_class, bos_token_id, params)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (name) DO NOTHING
                """,
                (name, revision, architecture, hidden_size, num_layers, dtype,
                 tokenizer_class, bos_token_id, Jsonb(dict(params or {}))),
            )
        info = self.get_model(name)
        if info.hidden_size != hidden_size or info.num_layers != num_layers:
            raise ModelMismatch(
                f"model '{name}' is registered with hidden size {info.hidden_size} and "
                f"{info.num_layers} layers, not {hidden_size} and {num_layers}: "
                "use another name or delete the old one"
            )
        return info

    def ensure_layers(self, model: ModelInfo | str, layers: Sequence[int]) -> ModelInfo:
        """Create the leaf partitions (and model_layer rows) of these layers."""
        info = self.get_model(model) if isinstance(model, str) else model
        bad = [x for x in layers if x < 0 or x > info.num_layers]
        if bad:
            raise UnknownLayer(
                f"layer {bad[0]} is out of range for '{info.name}' "
                f"(0 = input embeddings .. {info.num_layers} = last block)"
            )
        with self.transaction() as conn:
            for layer in sorted(set(layers)):
                conn.execute("SELECT llens_ensure_layer(%s, %s)", (info.id, layer))
        return self.get_model(info.name)

    def set_vocabulary(self, model: ModelInfo | str, tokens: Sequence[str]) -> int:
        """Store the model's token texts (index = token id) once; return rows added."""
        info = self.get_model(model) if isinstance(model, str) else model
        with self.transaction() as conn:
            # concurrent ingests of one model: the second waits, then sees the rows
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('llens_vocab'), %s)", (info.id,))
            have = conn.execute("SELECT count(*) FROM token WHERE model_id = %s", (info.id,)).fetchone()[0]
            if have:
                return 0
            with conn.cursor().copy("COPY token (model_id, token_id, token) FROM STDIN") as copy:
                for i, tok in enumerate(tokens):
                    copy.write_row((info.id, i, tok.replace("\x00", "")))
        return len(tokens)

    def get_model(self, name: str | ModelInfo) -> ModelInfo:
        if isinstance(name, ModelInfo):
            name = name.name
        rows = self._fetch(
            """
            SELECT m.id, m.name, m.hidden_size, m.num_layers, m.revision, m.architecture, m.dtype,
                   m.tokenizer_class, m.bos_token_id, m.params,
                   coalesce(array_agg(ml.layer ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}'),
                   coalesce(array_agg(ml.row_count ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}'),
                   coalesce(array_agg(ml.version ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}'),
                   coalesce(array_agg(ml.index_kind ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}')
              FROM model m LEFT JOIN model_layer ml ON ml.model_id = m.id
             WHERE m.name = %s
             GROUP BY m.id
            """,
            (name,),
        )
        if not rows:
            names = [m.name for m in self.list_models()]
            hint = ", ".join(f"'{n}'" for n in names[:10]) if names else "none yet; run `llens ingest`"
            raise UnknownModel(f"unknown model '{name}' (models in the store: {hint})")
        return self._model_from_row(rows[0])

    @staticmethod
    def _model_from_row(r: tuple) -> ModelInfo:
        layers = tuple(LayerInfo(int(a), int(b), int(c), d) for a, b, c, d in zip(r[10], r[11], r[12], r[13]))
        return ModelInfo(
            id=r[0], name=r[1], hidden_size=r[2], num_layers=r[3], revision=r[4], architecture=r[5],
            dtype=r[6], tokenizer_class=r[7], bos_token_id=r[8], params=r[9] or {}, layers=layers,
        )

    def list_models(self) -> list[ModelInfo]:
        rows = self._fetch(
            """
            SELECT m.id, m.name, m.hidden_size, m.num_layers, m.revision, m.architecture, m.dtype,
                   m.tokenizer_class, m.bos_token_id, m.params,
                   coalesce(array_agg(ml.layer ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}'),
                   coalesce(array_agg(ml.row_count ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}'),
                   coalesce(array_agg(ml.version ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}'),
                   coalesce(array_agg(ml.index_kind ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}')
              FROM model m LEFT JOIN model_layer ml ON ml.model_id = m.id
             GROUP BY m.id ORDER BY m.name
            """
        )
        return [self._model_from_row(r) for r in rows]

    def model_corpora(self, model: ModelInfo | str) -> list[str]:
        """Names of the corpora ingested (fully or partly) into a model."""
        info = self.get_model(model)
        rows = self._fetch(
            "SELECT DISTINCT c.name FROM ingest_run r JOIN corpus c ON c.id = r.corpus_id "
            "WHERE r.model_id = %s ORDER BY 1",
            (info.id,),
        )
        return [r[0] for r in rows]

    def delete_model(self, name: str) -> None:
        """Drop a model's partitions (all layers) and every row that refers to it."""
        info = self.get_model(name)
        with self.transaction() as conn:
            conn.execute("SELECT llens_drop_model(%s)", (info.id,))

    # ---- corpora and sentences -----------------------------------------

    def register_corpus(
        self, name: str, *, content_hash: str, source: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> CorpusInfo:
        """Register a corpus once by name; the same name with other content is an error."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO corpus (name, source, content_hash, params) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (name) DO NOTHING",
                (name, source, content_hash, Jsonb(dict(params or {}))),
            )
        info = self.get_corpus(name)
        if info.content_hash != content_hash:
            raise InputError(
                f"a different corpus is already registered as '{name}' "
                "(its content hash differs): give this one another name"
            )
        return info

    def find_corpus_by_hash(self, content_hash: str) -> CorpusInfo | None:
        rows = self._fetch(
            "SELECT id, name, content_hash, source, sentence_count FROM corpus WHERE content_hash = %s ORDER BY id LIMIT 1",
            (content_hash,),
        )
        return CorpusInfo(*rows[0]) if rows else None

    def get_corpus(self, name: str) -> CorpusInfo:
        rows = self._fetch(
            "SELECT id, name, content_hash, source, sentence_count FROM corpus WHERE name = %s", (name,)
        )
        if not rows:
            names = [c.name for c in self.list_corpora()]
            hint = ", ".join(f"'{n}'" for n in names[:10]) if names else "none yet"
            raise UnknownCorpus(f"unknown corpus '{name}' (corpora in the store: {hint})")
        return CorpusInfo(*rows[0])

    def list_corpora(self) -> list[CorpusInfo]:
        rows = self._fetch("SELECT id, name, content_hash, source, sentence_count FROM corpus ORDER BY name")
        return [CorpusInfo(*r) for r in rows]

    def delete_corpus(self, name: str) -> None:
        """Delete a corpus, its sentences, and every embedding row taken from them."""
        info = self.get_corpus(name)
        with self.transaction() as conn:
            conn.execute(
                """
                WITH gone AS (
                    DELETE FROM token_embedding e USING sentence s
                     WHERE s.id = e.sentence_id AND s.corpus_id = %(c)s
                    RETURNING e.model_id, e.layer)
                UPDATE model_layer ml SET row_count = ml.row_count - g.n, version = ml.version + 1
                  FROM (SELECT model_id, layer, count(*) AS n FROM gone GROUP BY 1, 2) g
                 WHERE ml.model_id = g.model_id AND ml.layer = g.layer
                """,
                {"c": info.id},
            )
            conn.execute("DELETE FROM corpus WHERE id = %s", (info.id,))

    def add_sentences(
        self, corpus: CorpusInfo | str, texts: Sequence[str], ordinals: Sequence[int] | None = None
    ) -> np.ndarray:
        """Insert sentences (exact duplicates stored once); return their ids, aligned to ``texts``."""
        info = self.get_corpus(corpus) if isinstance(corpus, str) else corpus
        if ordinals is None:
            ordinals = range(len(texts))
        hashes = [text_hash(t) for t in texts]
        with self.transaction() as conn:
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _llens_new_sentence "
                "(ordinal integer, text text, text_hash bytea) ON COMMIT DELETE ROWS"
            )
            with conn.cursor().copy("COPY _llens_new_sentence (ordinal, text, text_hash) FROM STDIN") as copy:
                for o, t, h in zip(ordinals, texts, hashes):
                    copy.write_row((o, t, h))
            conn.execute(
                """
                INSERT INTO sentence (corpus_id, ordinal, text, text_hash)
                SELECT %(c)s, ordinal, text, text_hash FROM (
                    SELECT DISTINCT ON (text_hash) ordinal, text, text_hash
                      FROM _llens_new_sentence ORDER BY text_hash, ordinal) first
                 ORDER BY ordinal  -- ids follow corpus order
                ON CONFLICT (corpus_id, text_hash) DO NOTHING
                """,
                {"c": info.id},
            )
            rows = conn.execute(
                """
                SELECT n.text_hash, s.id FROM (SELECT DISTINCT text_hash FROM _llens_new_sentence) n
                  JOIN sentence s ON s.corpus_id = %(c)s AND s.text_hash = n.text_hash
                """,
                {"c": info.id},
            ).fetchall()
            conn.execute(
                "UPDATE corpus SET sentence_count = (SELECT count(*) FROM sentence WHERE corpus_id = %(c)s) WHERE id = %(c)s",
                {"c": info.id},
            )
        by_hash = {bytes(h): i for h, i in rows}
        return np.array([by_hash[h] for h in hashes], dtype=np.int64)

    def sentences(self, ids: Sequence[int]) -> dict[int, str]:
        rows = self._fetch("SELECT id, text FROM sentence WHERE id = ANY(%s)", (list(map(int, ids)),))
        return dict(rows)

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
        with self.transaction() as conn:
            # Rows and the caller's progress commit atomically, so a commit lost
            # to a crash is simply redone on resume: no need to wait for the
            # WAL flush on every batch.
            conn.execute("SET LOCAL synchronous_commit = off")
            if max_contexts_per_token is not None and len(batch):
                batch = self._apply_quota(conn, model, batch, max_contexts_per_token)
            n = len(batch)
            if n:
                self._copy_embeddings(conn, model, batch)
                conn.execute(
                    "UPDATE model_layer SET row_count = row_count + %s, version = version + 1 "
                    "WHERE model_id = %s AND layer = ANY(%s)",
                    (n, model.id, sorted(batch.vectors)),
                )
            if on_commit is not None:
                on_commit(conn, n)
        return n

    @staticmethod
    def _apply_quota(conn: psycopg.Connection, model: ModelInfo, batch: EmbeddingBatch, cap: int) -> EmbeddingBatch:
        token_ids = np.unique(batch.token_id).tolist()
        # Create missing quota rows, then lock them in token-id order so that
        # concurrent writers queue on shared tokens instead of deadlocking.
        conn.execute(
            "INSERT INTO token_quota (model_id, token_id) SELECT %s, t FROM unnest(%s::int[]) AS t ORDER BY t "
            "ON CONFLICT DO NOTHING",
            (model.id, token_ids),
        )
        rows = conn.execute(
            "SELECT token_id, used FROM token_quota WHERE model_id = %s AND token_id = ANY(%s::int[]) "
            "ORDER BY token_id FOR UPDATE",
            (model.id, token_ids),
        ).fetchall()
        used = dict(rows)
        # first come first served within the batch (rows are in corpus order):
        # the k-th row of a token is kept if used + k < cap, without a Python loop
        tok = batch.token_id.astype(np.int64)
        order = np.argsort(tok, kind="stable")
        st = tok[order]
        first = np.r_[0, np.flatnonzero(st[1:] != st[:-1]) + 1]
        rank = np.arange(len(st)) - np.repeat(first, np.diff(np.r_[first, len(st)]))
        base = np.array([used.get(int(t), 0) for t in st[first]], dtype=np.int64)
        keep = np.zeros(len(batch), dtype=bool)
        keep[order] = base.repeat(np.diff(np.r_[first, len(st)])) + rank < cap
        kept_tok, kept_n = np.unique(tok[keep], return_counts=True)
        granted = dict(zip(kept_tok.tolist(), kept_n.tolist()))
        if granted:
            conn.execute(
                "UPDATE token_quota q SET used = q.used + g.n FROM unnest(%s::int[], %s::int[]) AS g(token_id, n) "
                "WHERE q.model_id = %s AND q.token_id = g.token_id",
                (list(granted), list(granted.values()), model.id),
            )
        return batch.select(keep)

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

    def prefix_hashes(self, model: ModelInfo | str) -> np.ndarray:
        """Every stored prefix hash of a model (rebuilds prefix dedup state on resume)."""
        info = self.get_model(model) if isinstance(model, str) else model
        if not info.layers:
            return np.zeros(0, dtype=np.int64)
        layer = info.layers[0].layer
        with self.transaction() as conn:
            cur = conn.cursor()
            payload = bytearray()
            with cur.copy(
                "COPY (SELECT prefix_hash FROM token_embedding WHERE model_id = %s AND layer = %s) "
                "TO STDOUT (FORMAT BINARY)",
                (info.id, layer),
            ) as copy:
                for chunk in copy:
                    payload += chunk
        body = bytes(payload)[len(HEADER): -len(TRAILER)]
        return decode_rows((("prefix_hash", "int8"),), body)["prefix_hash"].astype(np.int64)

    def iter_layer(
        self, model: ModelInfo | str, layer: int, *, chunk_rows: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream a leaf as (keys, vectors) chunks by binary COPY.

        ``keys`` is a structured array (sentence_id, position, token_id);
        ``vectors`` is float16 [n, D] (the stored unit vectors). Memory is
        bounded by ``chunk_rows`` whatever the leaf's size.
        """
        info = self.get_model(model) if isinstance(model, str) else model
        info.layer(layer)
        dim = info.hidden_size
        size = row_size(SCAN_COLUMNS, dim)
        buf = bytearray()
        started = False
        with self.transaction() as conn, conn.cursor().copy(
            "COPY (SELECT sentence_id, position, token_id, embedding FROM token_embedding "
            "WHERE model_id = %s AND layer = %s) TO STDOUT (FORMAT BINARY)",
            (info.id, layer),
        ) as copy:
            for chunk in copy:
                buf += chunk
                if not started and len(buf) >= len(HEADER):
                    del buf[: len(HEADER)]
                    started = True
                while started and len(buf) >= size * chunk_rows:
                    yield _split_scan(bytes(buf[: size * chunk_rows]), dim)
                    del buf[: size * chunk_rows]
        if started:
            body = bytes(buf[: len(buf) - len(TRAILER)])
            if body:
                yield _split_scan(body, dim)

    def layer_keys(self, model: ModelInfo | str, layer: int) -> np.ndarray:
        """(sentence_id, position) of every row of a leaf, by binary COPY, no vectors.

        Lets an import skip rows already written (re-import is idempotent).
        """
        info = self.get_model(model) if isinstance(model, str) else model
        info.layer(layer)
        cols = (("sentence_id", "int8"), ("position", "int4"))
        payload = bytearray()
        with self.transaction() as conn, conn.cursor().copy(
            "COPY (SELECT sentence_id, position FROM token_embedding WHERE model_id = %s AND layer = %s) "
            "TO STDOUT (FORMAT BINARY)",
            (info.id, layer),
        ) as copy:
            for chunk in copy:
                payload += chunk
        body = bytes(payload)[len(HEADER): -len(TRAILER)]
        rows = decode_rows(cols, body)
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

    # ---- ingest runs ----------------------------------------------------

    _RUN_SELECT = """
        SELECT r.id, m.name, r.model_id, c.name, r.corpus_id, r.layers, r.params, r.shard,
               r.num_shards, r.status, r.sentences_total, r.sentences_done, r.resume_ordinal,
               r.tokens_seen, r.rows_written, r.counters, r.error, r.hostname, r.pid,
               r.started_at, r.heartbeat_at, r.finished_at
          FROM ingest_run r JOIN model m ON m.id = r.model_id JOIN corpus c ON c.id = r.corpus_id
    """

    def create_run(
        self, model: ModelInfo, corpus: CorpusInfo, *, layers: Sequence[int], params: Mapping[str, Any],
        shard: int = 0, num_shards: int = 1, sentences_total: int | None = None,
        hostname: str | None = None, pid: int | None = None,
    ) -> RunInfo:
        rows = self._fetch(
            "INSERT INTO ingest_run (model_id, corpus_id, layers, params, shard, num_shards, "
            "sentences_total, hostname, pid) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (model.id, corpus.id, list(layers), Jsonb(dict(params)), shard, num_shards,
             sentences_total, hostname, pid),
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
        self, model: ModelInfo, corpus: CorpusInfo, *, params: Mapping[str, Any], shard: int, num_shards: int
    ) -> list[RunInfo]:
        """Runs of the same model, corpus, parameters and shard, newest first."""
        rows = self._fetch(
            self._RUN_SELECT + " WHERE r.model_id = %s AND r.corpus_id = %s AND r.params = %s "
            "AND r.shard = %s AND r.num_shards = %s ORDER BY r.id DESC",
            (model.id, corpus.id, Jsonb(dict(params)), shard, num_shards),
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
        """Take over a run (compare-and-swap on its status and pid); False if someone else did."""
        rows = self._fetch(
            "UPDATE ingest_run SET status = 'running', hostname = %s, pid = %s, error = NULL, "
            "finished_at = NULL, heartbeat_at = now(), sentences_total = coalesce(%s, sentences_total) "
            "WHERE id = %s AND status = %s AND pid IS NOT DISTINCT FROM %s RETURNING id",
            (hostname, pid, sentences_total, run.id, run.status, run.pid),
        )
        return bool(rows)

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

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE ingest_run SET status = %s, error = %s, heartbeat_at = now(), "
                "finished_at = CASE WHEN %s = 'done' THEN now() ELSE finished_at END WHERE id = %s",
                (status, error, status, run_id),
            )

    def corpus_sentences(self, corpus: CorpusInfo | str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(ids, ordinals, texts) of a corpus in ordinal order (resume needs no corpus file)."""
        info = self.get_corpus(corpus) if isinstance(corpus, str) else corpus
        rows = self._fetch(
            "SELECT id, ordinal, text FROM sentence WHERE corpus_id = %s ORDER BY ordinal", (info.id,)
        )
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        ords = np.array([r[1] for r in rows], dtype=np.int64)
        return ids, ords, [r[2] for r in rows]

    # ---- indexes --------------------------------------------------------

    def build_index(
        self, model: ModelInfo | str, layers: Sequence[int] | None = None, *,
        m: int = 16, ef_construction: int = 64, progress: Any = None,
    ) -> list[int]:
        """Build (or rebuild) each layer's ANN index; return the layers done."""
        info = self.get_model(model) if isinstance(model, str) else model
        todo = list(layers) if layers is not None else info.layer_numbers
        for layer in todo:
            info.layer(layer)
        if not self.ann_supported():
            raise IndexUnsupported(
                "this server's pgvector cannot build ANN indexes on this CPU (the embedded "
                "pgvector needs AVX-512); queries use exact search, which needs no index"
            )
        for layer in todo:
            with self.transaction() as conn:
                conn.execute("SELECT llens_build_index(%s, %s, %s, %s)", (info.id, layer, m, ef_construction))
            if progress is not None:
                progress(layer)
        return todo

    def drop_index(self, model: ModelInfo | str, layers: Sequence[int] | None = None) -> list[int]:
        info = self.get_model(model) if isinstance(model, str) else model
        todo = list(layers) if layers is not None else info.layer_numbers
        with self.transaction() as conn:
            for layer in todo:
                info.layer(layer)
                conn.execute("SELECT llens_drop_index(%s, %s)", (info.id, layer))
        return todo

    # ---- search ---------------------------------------------------------

    def knn(
        self,
        model: ModelInfo | str,
        layer: int,
        queries: np.ndarray,
        k: int = 10,
        *,
        exact: bool = False,
        ef_search: int | None = None,
        rerank: int | None = None,
    ) -> KnnResult:
        """k nearest stored rows by cosine for a batch of queries, in one round trip.

        Without ``exact`` the leaf's ANN index is used if it has one (HNSW
        over halfvec; over the binary quantization for D > 4000, re-ranking
        ``rerank`` candidates, default max(10k, 200), by exact cosine).
        ``exact`` orders by the uncast column, which no index matches, so
        PostgreSQL scans the leaf: slow, but exact, for checks.
        """
        info = self.get_model(model) if isinstance(model, str) else model
        li = info.layer(layer)
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != info.hidden_size:
            raise DimensionMismatch(
                f"query vectors have {q.shape[-1]} dimensions, model '{info.name}' has {info.hidden_size}"
            )
        if k < 1:
            raise InputError("k must be at least 1")
        if li.row_count == 0:
            raise EmptyResult(f"model '{info.name}' has no rows in layer {layer} yet")
        nq, d = q.shape
        kind = None if exact else li.index_kind
        ef = max(ef_search or 40, k)
        if kind == "hnsw_halfvec":
            order = f"e.embedding::halfvec({d}) <=> q.v::halfvec({d})"
            inner = f"SELECT e.sentence_id, e.position, e.token_id, {order} AS dist FROM token_embedding e WHERE e.model_id = %(m)s AND e.layer = %(l)s ORDER BY {order} LIMIT %(k)s"
        elif kind == "hnsw_binary":
            ncand = rerank or max(10 * k, 200)
            ef = max(ef, ncand)
            inner = (
                "SELECT c.sentence_id, c.position, c.token_id, c.embedding <=> q.v AS dist FROM ("
                " SELECT e.sentence_id, e.position, e.token_id, e.embedding FROM token_embedding e"
                " WHERE e.model_id = %(m)s AND e.layer = %(l)s"
                f" ORDER BY binary_quantize(e.embedding)::bit({d}) <~> binary_quantize(q.v::halfvec({d}))"
                f" LIMIT {int(ncand)}) c ORDER BY c.embedding <=> q.v LIMIT %(k)s"
            )
        else:
            inner = "SELECT e.sentence_id, e.position, e.token_id, e.embedding <=> q.v AS dist FROM token_embedding e WHERE e.model_id = %(m)s AND e.layer = %(l)s ORDER BY e.embedding <=> q.v LIMIT %(k)s"
        sim = np.full((nq, k), -np.inf, dtype=np.float32)
        sid = np.full((nq, k), -1, dtype=np.int64)
        pos = np.full((nq, k), -1, dtype=np.int32)
        tok = np.full((nq, k), -1, dtype=np.int32)
        with self.transaction() as conn:
            conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(int(ef)),))
            _load_queries(conn, q)
            rows = conn.execute(
                f"SELECT q.i, n.sentence_id, n.position, n.token_id, n.dist FROM _llens_query q "
                f"CROSS JOIN LATERAL ({inner}) n ORDER BY q.i, n.dist",
                {"m": info.id, "l": layer, "k": k},
            ).fetchall()
        fill = np.zeros(nq, dtype=np.int64)
        for i, s, p, t, dist in rows:
            j = fill[i]
            if j < k:
                sim[i, j], sid[i, j], pos[i, j], tok[i, j] = 1.0 - dist, s, p, t
                fill[i] = j + 1
        return KnnResult(layer=layer, similarity=sim, sentence_id=sid, position=pos, token_id=tok)

    def contexts(
        self, model: ModelInfo | str, layer_keys: Sequence[tuple[int, int, int]]
    ) -> dict[tuple[int, int, int], Context]:
        """Sentence, token text and span for (layer, sentence_id, position) keys, in one query."""
        info = self.get_model(model) if isinstance(model, str) else model
        keys = list({(int(a), int(b), int(c)) for a, b, c in layer_keys})
        if not keys:
            return {}
        rows = self._fetch(
            """
            -- LATERAL ... OFFSET 0 keeps this a nested loop of primary-key probes with
            -- run-time partition pruning; a plain join hashes every leaf of the model
            -- (a full read of the embeddings: 1.1 s for 8 x 100k rows, vs 0.1 s).
            WITH hit AS MATERIALIZED (
                SELECT k.layer, e.model_id, e.sentence_id, e.position, e.token_id, e.char_start, e.char_end
                  FROM unnest(%(l)s::int[], %(s)s::bigint[], %(p)s::int[]) AS k(layer, sentence_id, position)
                 CROSS JOIN LATERAL (
                       SELECT e.* FROM token_embedding e
                        WHERE e.model_id = %(m)s AND e.layer = k.layer
                          AND e.sentence_id = k.sentence_id AND e.position = k.position
                       OFFSET 0) e)
            SELECT h.layer, h.sentence_id, h.position, h.token_id, t.token, s.text, h.char_start, h.char_end
              FROM hit h
              JOIN sentence s ON s.id = h.sentence_id
              LEFT JOIN token t ON t.model_id = h.model_id AND t.token_id = h.token_id
            """,
            {"m": info.id, "l": [k[0] for k in keys], "s": [k[1] for k in keys], "p": [k[2] for k in keys]},
        )
        return {(r[0], r[1], r[2]): Context(r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows}

    def leaf_bytes(self, model: ModelInfo | str) -> dict[int, int]:
        """Bytes on disk of each layer's leaf (heap, TOAST and indexes), for sizing."""
        info = self.get_model(model) if isinstance(model, str) else model
        rows = self._fetch(
            "SELECT layer, pg_total_relation_size(to_regclass(llens_leaf_name(%s, layer))) "
            "FROM model_layer WHERE model_id = %s ORDER BY layer",
            (info.id, info.id),
        )
        return {int(layer): int(size or 0) for layer, size in rows}

    def leaf_version(self, model: ModelInfo | str, layer: int) -> tuple[int, int]:
        """(row_count, version) of a leaf, read fresh: changes whenever rows are written."""
        info = self.get_model(model) if isinstance(model, str) else model
        rows = self._fetch(
            "SELECT row_count, version FROM model_layer WHERE model_id = %s AND layer = %s", (info.id, layer)
        )
        if not rows:
            info.layer(layer)
        return int(rows[0][0]), int(rows[0][1])


def _split_scan(body: bytes, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rows = decode_rows(SCAN_COLUMNS, body, dim)
    keys = np.empty(len(rows), dtype=[("sentence_id", "<i8"), ("position", "<i4"), ("token_id", "<i4")])
    keys["sentence_id"] = rows["sentence_id"]
    keys["position"] = rows["position"]
    keys["token_id"] = rows["token_id"]
    return keys, rows["embedding"].astype(np.float16)


def _load_queries(conn: psycopg.Connection, q: np.ndarray) -> None:
    """Send a batch of query vectors to a temp table by binary COPY (one round trip)."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS _llens_query (i integer, v halfvec) ON COMMIT DELETE ROWS")
    payload = HEADER + encode_rows(
        (("i", "int4"), ("v", "halfvec")),
        {"i": np.arange(len(q), dtype=np.int32), "v": normalize_rows(q)},
    ) + TRAILER
    with conn.cursor().copy("COPY _llens_query (i, v) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(payload)


__all__ = [
    "Context", "CorpusInfo", "EmbeddingBatch", "KnnResult", "LatentLensError",
    "LayerInfo", "ModelInfo", "RunInfo", "Store", "text_hash",
]
