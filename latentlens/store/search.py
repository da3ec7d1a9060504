"""ANN indexes and k-NN search in PostgreSQL (HNSW where it can, exact scans otherwise)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from latentlens.db import first_line
from latentlens.errors import EmptyResult, IndexUnsupported, InputError, PermissionDenied
from latentlens.pgcopy import HEADER, TRAILER, encode_rows
from latentlens.store.analyses import PROVENANCE, provenance_of
from latentlens.store.base import StoreBase
from latentlens.store.types import (
    SPAN_UNKNOWN,
    Context,
    KnnResult,
    ModelInfo,
    check_k,
    unit_queries,
)

# maintenance_work_mem of the transaction that builds an index (only there:
# other sessions keep the server's setting)
BUILD_MAINTENANCE_WORK_MEM = "1GB"
# model_layer.index_kind: HNSW over halfvec (up to 4000 dimensions); wider,
# HNSW over the binary quantization or pgvectorscale's DiskANN (sql/0008_wide_index.sql)
INDEX_KINDS = ("hnsw_halfvec", "hnsw_binary", "diskann")
# Recall calibration of a new index (calibrate_index): the recall@10 HNSW must
# reach on in-distribution queries, and the ef_search values tried for it.
RECALL_TARGET = 0.97
EF_LADDER = (40, 64, 100, 160, 250, 400, 640, 1000)
# Hits within a query are correlated (a query finds its region of the graph or not), so
# the estimate's noise goes with the query count: 64 queries passed 0.97 at ef_search 40
# where 256 measured 0.93-0.96 (docs/ingest.md); 256 cost ~1 s more a leaf.
CALIBRATION_QUERIES = 256
# Calibration queries are stored rows turned to these cosines with them (evenly spread):
# the queries the search policy sends to HNSW are those whose best cosine with a sample
# of the leaf is at least its out-of-distribution threshold (0.5), up to ~0.95 for text.
CALIBRATION_COSINES = (0.5, 0.95)
# A wide layer's binary HNSW is kept if it reaches the target at this ef_search or less:
# llens_knn re-ranks max(200, ef) candidates, and beyond ~400 that costs more a query than
# DiskANN, whose recall is then higher too (measured at 50k x 4096: docs/query.md)
WIDE_BINARY_MAX_EF = 400


# Store.contexts. LATERAL ... OFFSET 0 keeps each join a nested loop of primary-key probes,
# one per key: the embedding row (with run-time partition pruning; a plain join hashes every
# leaf of the model, a full read of the embeddings: 1.1 s for 8 x 100k rows, vs 0.1 s), its
# sentence and its token. The planner expects a key's probe to find a row in every leaf of the
# model (8x the real count at 8 layers), so plain joins to sentence and token hashed both
# tables whole: 20 ms of an 8-query answer's lookup at 97k sentences, more than its scan, and
# growing with the corpus, not with the answer.
CONTEXTS = """
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
 CROSS JOIN LATERAL (SELECT s.text FROM sentence s WHERE s.id = h.sentence_id OFFSET 0) s
  LEFT JOIN LATERAL (SELECT t.token FROM token t
                      WHERE t.model_id = h.model_id AND t.token_id = h.token_id OFFSET 0) t ON true
"""

# Store.context_columns: the same probes for the embedding rows only (spans and token ids);
# each distinct sentence's text and token's text are fetched once by the two statements after
# it, in the same round trip. Per key, the sentence and token probes and the text sent back
# for every key cost half of Store.contexts (an image's answer: 5.8k keys, 2k sentences).
CONTEXT_SPANS = """
SELECT k.i, e.token_id, e.char_start, e.char_end
  FROM unnest(%(l)s::int[], %(s)s::bigint[], %(p)s::int[]) WITH ORDINALITY AS k(layer, sentence_id, position, i)
 CROSS JOIN LATERAL (
       SELECT e.token_id, e.char_start, e.char_end FROM token_embedding e
        WHERE e.model_id = %(m)s AND e.layer = k.layer
          AND e.sentence_id = k.sentence_id AND e.position = k.position
       OFFSET 0) e
"""
CONTEXT_SENTENCES = """
SELECT k.id, s.text FROM unnest(%(ids)s::bigint[]) AS k(id)
 CROSS JOIN LATERAL (SELECT s.text FROM sentence s WHERE s.id = k.id OFFSET 0) s
"""
CONTEXT_TOKENS = """
SELECT k.id, t.token FROM unnest(%(ids)s::int[]) AS k(id)
 CROSS JOIN LATERAL (SELECT t.token FROM token t WHERE t.model_id = %(m)s AND t.token_id = k.id OFFSET 0) t
"""

# Store.contexts on a Citus coordinator: Citus cannot push down the single-node query's
# LATERAL ... OFFSET 0 over unnest() ("Offset clause is currently unsupported when a lateral
# subquery references a column from a table function"). A plain join with the keys is sent
# to the shards that hold the sentence ids; each shard's leaves are pruned by layer.
CITUS_CONTEXTS = """
SELECT k.layer, e.sentence_id, e.position, e.token_id, t.token, s.text, e.char_start, e.char_end
  FROM token_embedding e
  JOIN unnest(%(l)s::int[], %(s)s::bigint[], %(p)s::int[]) AS k(layer, sentence_id, position)
    ON e.layer = k.layer AND e.sentence_id = k.sentence_id AND e.position = k.position
  JOIN sentence s ON s.id = e.sentence_id
  LEFT JOIN token t ON t.model_id = e.model_id AND t.token_id = e.token_id
 WHERE e.model_id = %(m)s AND e.layer = ANY(%(l)s::int[]) AND e.sentence_id = ANY(%(s)s::bigint[])
"""


@dataclass
class ContextColumns:
    """Store.context_columns: per key, in the order asked; where no row is stored, ``found`` is
    False, token and spans None and the sentence "" (as Store.contexts leaves such a key out)."""

    found: np.ndarray  # [n] bool
    token_id: np.ndarray  # [n] int64: the stored row's (-1 where not found)
    char_start: list[int | None]
    char_end: list[int | None]
    token: list[str | None]
    sentence: list[str]


@dataclass(frozen=True)
class IndexProgress:
    """A step of an index build, as pg_stat_progress_create_index reports it."""

    layer: int
    phase: str
    done: int
    total: int
    finished: bool = False
    unit: str = "step"  # what done/total count: pgvector reports heap blocks while loading


class SearchMixin(StoreBase):
    """Index builds and batched k-NN, one round trip per batch of queries."""

    if TYPE_CHECKING:  # CatalogMixin's and EmbeddingsMixin's, which Store combines with this one
        def get_model(self, name: str | ModelInfo) -> ModelInfo: ...

        def iter_layer(
            self, model: ModelInfo | str, layer: int, *, chunk_rows: int = 65536
        ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

        def sample_layer(self, model: ModelInfo | str, layer: int, rows: int = 2048) -> np.ndarray: ...

        def provenance(self, info: ModelInfo, layers: Sequence[int] | None = None,
                       search: Mapping[int, Sequence[str]] | None = None) -> dict: ...

    # ---- indexes --------------------------------------------------------

    def check_build(self, info: ModelInfo, layers: Sequence[int], kind: str | None = None) -> None:
        """What build_index refuses before building anything: an unknown layer or index kind,
        a server that cannot build ANN indexes (one clear error, not after other leaves built)."""
        for layer in layers:
            info.layer(layer)
        if kind is not None and kind not in INDEX_KINDS:
            raise InputError(f"unknown index kind '{kind}' (use {', '.join(INDEX_KINDS)})")
        if not self.ann_supported():
            raise IndexUnsupported(
                "this server's pgvector cannot build ANN indexes on this CPU (its ANN probe "
                "failed, llens.ann_index = off); queries use exact search, which needs no index"
            )

    def build_index(
        self, model: ModelInfo | str, layers: Sequence[int] | None = None, *,
        m: int | None = None, ef_construction: int | None = None,
        maintenance_work_mem: str | None = BUILD_MAINTENANCE_WORK_MEM,
        progress: Callable[[IndexProgress], None] | None = None,
        kind: str | None = None,
    ) -> list[int]:
        """Build (or rebuild) each layer's ANN index; return the layers done.

        Readers keep answering during a build (``llens_build_index`` builds
        under a temporary name and swaps). ``m`` / ``ef_construction`` default
        to the SQL function's (16 / 64). ``maintenance_work_mem`` is set for
        the building transaction only (HNSW builds that spill are far slower).
        ``progress`` gets IndexProgress events polled from
        pg_stat_progress_create_index on a second connection. ``kind``: None
        for the default of the model's width (HNSW over halfvec up to 4000
        dimensions, over the binary quantization above), or one of
        INDEX_KINDS ('diskann': pgvectorscale's, for wide layers, where the
        server has it; better recall, slower to build: docs/query.md). By
        default a wide layer whose binary HNSW misses the recall target, or
        needs more than WIDE_BINARY_MAX_EF for it, gets DiskANN instead where
        the server has it (measured per leaf, the better kept).
        Each index's recall is then measured (calibrate_index) where the user
        may record it (the owner): a writer's build leaves that to the owner
        (and keeps the width's default kind).
        """
        info = self.get_model(model) if isinstance(model, str) else model
        todo = list(layers) if layers is not None else info.layer_numbers
        self.check_build(info, todo, kind)
        args = ["p_model_id => %(m)s", "p_layer => %(l)s"]
        if m is not None:
            args.append("p_m => %(hm)s")
        if ef_construction is not None:
            args.append("p_ef_construction => %(efc)s")
        if kind is not None:
            args.append("p_kind => %(kind)s")
        sql = f"SELECT llens_build_index({', '.join(args)})"
        fallback = f"SELECT llens_build_index({', '.join([*args, 'p_kind => %(kind)s'])})" if kind is None else None
        calibrate = self.may_calibrate()
        for layer in todo:
            found = self._build_one(info, layer, sql, {"m": info.id, "l": layer, "hm": m, "efc": ef_construction,
                                                        "kind": kind}, maintenance_work_mem, progress, calibrate)
            # binary HNSW that misses the recall target (sign bits that barely differ between
            # rows, as with a large shared offset), or reaches it only by re-ranking so many
            # candidates that DiskANN is faster: DiskANN, where the server has it
            if (fallback is not None and info.hidden_size > 4000 and found
                    and (not found["recall_ok"] or found["ef_search"] > WIDE_BINARY_MAX_EF)
                    and self.vectorscale_installed()):
                if progress is not None:
                    progress(IndexProgress(layer, "binary HNSW short of its recall target: DiskANN", 0, 1))
                self._build_one(info, layer, fallback, {"m": info.id, "l": layer, "hm": m, "efc": ef_construction,
                                                        "kind": "diskann"}, maintenance_work_mem, progress, calibrate)
            if progress is not None:
                progress(IndexProgress(layer, "done", 1, 1, finished=True))
        return todo

    def _build_one(self, info: ModelInfo, layer: int, sql: str, params: dict, maintenance_work_mem: str | None,
                   progress: Callable[[IndexProgress], None] | None, calibrate: bool) -> dict:
        """One llens_build_index call, then its recall calibration (returned; {} when
        this user may not record it)."""
        watcher = _ProgressWatcher(self.url, self.conn.info.backend_pid, layer, progress)
        try:
            with self.transaction() as conn, watcher:
                if maintenance_work_mem:
                    conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (maintenance_work_mem,))
                conn.execute(sql, params)
        except psycopg.errors.InvalidParameterValue as e:
            raise InputError(first_line(e).removeprefix("llens: ")) from None
        except psycopg.errors.FeatureNotSupported as e:  # diskann without pgvectorscale
            raise IndexUnsupported(first_line(e).removeprefix("llens: ")) from None
        if not calibrate:
            return {}
        if progress is not None:
            progress(IndexProgress(layer, "measuring recall", 0, 1))
        return self.calibrate_index(info, layer)

    def vectorscale_installed(self) -> bool:
        """Whether this database has pgvectorscale (DiskANN indexes for layers over 4000 dimensions)."""
        return bool(self._fetch("SELECT count(*) FROM pg_extension WHERE extname = 'vectorscale'")[0][0])

    def calibrate_index(
        self, model: ModelInfo | str, layer: int, *, queries: int = CALIBRATION_QUERIES, k: int = 10,
        target: float = RECALL_TARGET,
    ) -> dict:
        """Measure the index's recall@k against exact search and record the ef_search it needs.

        Queries are those the search policy sends to HNSW: stored rows drawn by
        page sampling, each turned by a random orthogonal direction to a cosine
        with it spread evenly over CALIBRATION_COSINES (best sample cosine from
        the out-of-distribution threshold up); the truth is one exact pass over
        the leaf. The row count measured at is recorded (``calibrated_rows``):
        a leaf that outgrows it by RECALL_STALE_GROWTH counts as unmeasured
        until :meth:`refresh_recall` measures it again. The
        smallest ef_search of EF_LADDER with recall >= ``target`` goes into
        model_layer.index_params (``ef_search``, ``recall_at_10``,
        ``recall_ok``), so every client and llens_knn use it; if none reaches
        it, ``recall_ok`` is false and the search policy never uses this index.
        """
        info = self.get_model(model)  # fresh: the caller's may predate the rows just loaded
        if not self.may_calibrate():  # before the measuring, which takes a while
            raise PermissionDenied(
                f"permission denied for database user {self.conn.info.user}: an index's recall sets everyone's "
                f"default search, so only the database's owner records it (ask them to run "
                f"`llens index calibrate {info.name}`; what each role may do: docs/team.md)")
        sample = self.sample_layer(info, layer, 8 * queries).astype(np.float32)
        if len(sample) < 2 * k:
            return {}
        rng = np.random.default_rng(0)
        rows = info.layer(layer).row_count
        q = calibration_queries(sample, queries, rng)
        kth = self._exact_kth(info, layer, q, k)[:, None] - 1e-4
        found: dict = {"recall_ok": False, "ef_search": None, "recall_at_10": None, "calibrated_rows": rows}
        for ef in EF_LADDER:
            got = self.knn(info, layer, q, k, ef_search=ef)
            # tie-aware: a hit is any row as similar as the true k-th (stored rows repeat)
            recall = float(np.mean((got.similarity >= kth).sum(axis=1) / k))
            found.update(ef_search=ef, recall_at_10=round(recall, 4))
            if recall >= target:
                found["recall_ok"] = True
                break
        with self.transaction() as conn:
            conn.execute(
                "UPDATE model_layer SET index_params = coalesce(index_params, '{}'::jsonb) || %s "
                "WHERE model_id = %s AND layer = %s", (Jsonb(found), info.id, layer))
        return found

    def may_calibrate(self) -> bool:
        """Whether this user may record an index's recall (model_layer.index_params: the owner's alone)."""
        return bool(self._fetch("SELECT has_column_privilege('model_layer', 'index_params', 'UPDATE')")[0][0])

    def refresh_recall(self, model: ModelInfo | str, layers: Sequence[int] | None = None) -> list[int]:
        """Measure again the recall of each indexed leaf whose figure is missing or outgrown
        (see LayerInfo.index_recall); return those layers. Called after rows are added to an
        indexed leaf without rebuilding its index (an import, ``llens ingest --no-index``).
        Only the owner records recall (model_layer.index_params sets everyone's default
        search): for a writer nothing is measured, and the stale figure keeps the default exact."""
        info = self.get_model(model)
        todo = list(layers) if layers is not None else info.layer_numbers
        if not (self.ann_supported() and self.may_calibrate()):
            return []
        done = []
        for layer in todo:
            li = info.layer(layer)
            if li.index_kind and li.index_recall in ("stale", "unmeasured"):
                self.calibrate_index(info, layer)
                done.append(layer)
        return done

    def drop_index(self, model: ModelInfo | str, layers: Sequence[int] | None = None) -> list[int]:
        info = self.get_model(model) if isinstance(model, str) else model
        todo = list(layers) if layers is not None else info.layer_numbers
        with self.transaction() as conn:
            for layer in todo:
                info.layer(layer)
                conn.execute("SELECT llens_drop_index(%s, %s)", (info.id, layer))
        return todo

    def analyze(self, model: ModelInfo | str, layers: Sequence[int] | None = None) -> None:
        """Refresh the planner statistics of these leaves (after a load: see llens_analyze)."""
        info = self.get_model(model) if isinstance(model, str) else model
        todo = list(layers) if layers is not None else info.layer_numbers
        for layer in todo:
            with self.transaction() as conn:
                conn.execute("SELECT llens_analyze(%s, %s)", (info.id, layer))

    def _exact_kth(self, info: ModelInfo, layer: int, q: np.ndarray, k: int) -> np.ndarray:
        """Each query's exact k-th best similarity, from one streamed pass over the leaf.

        One binary COPY read whatever the number of queries (an exact
        llens_knn per query would scan the leaf once per query).
        """
        q = unit_queries(q, info.hidden_size, info.name)
        best = np.full((len(q), 0), -np.inf, dtype=np.float32)
        for _keys, v in self.iter_layer(info, layer):
            v = v.astype(np.float32)
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            both = np.concatenate([best, q @ v.T], axis=1)
            keep = min(k, both.shape[1])
            best = -np.sort(-np.partition(both, -keep, axis=1)[:, -keep:], axis=1)
        return best[:, min(k, best.shape[1]) - 1]

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
    ) -> KnnResult:
        """k nearest stored rows by cosine for a batch of queries, in one round trip.

        Each query runs ``llens_knn`` (sql/0002_search.sql), the one k-NN
        query of latentlens: the leaf's ANN index where it has one and the
        server supports it (at ``ef_search``; default: what the index needs
        for its recall target, see calibrate_index), else, or with ``exact``,
        an exact scan inside PostgreSQL (slow on big leaves: the library's
        fast exact path is latentlens.scan).
        """
        info = self.get_model(model) if isinstance(model, str) else model
        li = info.layer(layer)
        q = unit_queries(queries, info.hidden_size, info.name)
        k = check_k(k)
        if li.row_count == 0:
            raise EmptyResult(f"model '{info.name}' has no rows in layer {layer} yet")
        out = KnnResult.empty(layer, len(q), k)
        ef = None if ef_search is None else max(1, min(int(ef_search), 1000))
        with self.transaction() as conn:
            _load_queries(conn, q)
            rows = conn.execute(
                "SELECT q.i, n.sentence_id, n.position, n.token_id, n.distance FROM _llens_query q "
                "CROSS JOIN LATERAL llens_knn(%s::int, %s::int, q.v, %s::int, %s::bool, %s::int) n",
                (info.id, layer, k, bool(exact), ef),
            ).fetchall()
        if rows:
            arr = np.array(rows, dtype=np.float64)
            qi = arr[:, 0].astype(np.int64)
            order = np.lexsort((arr[:, 4], qi))
            arr, qi = arr[order], qi[order]
            first = np.r_[0, np.flatnonzero(np.diff(qi)) + 1]
            rank = np.arange(len(qi)) - np.repeat(first, np.diff(np.r_[first, len(qi)]))
            out.similarity[qi, rank] = 1.0 - arr[:, 4]
            out.sentence_id[qi, rank] = arr[:, 1].astype(np.int64)
            out.position[qi, rank] = arr[:, 2].astype(np.int32)
            out.token_id[qi, rank] = arr[:, 3].astype(np.int32)
        return out

    def contexts(
        self, model: ModelInfo | str, layer_keys: Sequence[tuple[int, int, int]]
    ) -> dict[tuple[int, int, int], Context]:
        """Sentence, token text and span for (layer, sentence_id, position) keys, in one query."""
        info = self.get_model(model) if isinstance(model, str) else model
        keys = list({(int(a), int(b), int(c)) for a, b, c in layer_keys})
        if not keys:
            return {}
        params = {"m": info.id, "l": [k[0] for k in keys], "s": [k[1] for k in keys], "p": [k[2] for k in keys]}
        if self.citus():
            rows = self._fetch(CITUS_CONTEXTS, params)
            return {(r[0], r[1], r[2]): Context(r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows}
        rows = self._fetch(CONTEXTS, params)
        return {(r[0], r[1], r[2]): Context(r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows}

    def context_columns(
        self, model: ModelInfo | str, layer: np.ndarray, sentence_id: np.ndarray, position: np.ndarray,
        token_id: np.ndarray | None = None,
    ) -> ContextColumns:
        """Store.contexts for keys given as arrays (distinct keys), answered as arrays in their order.

        One transaction, one pipeline (binary): the embedding rows' spans and token ids per
        key, each distinct sentence's text once and each distinct token's text once (named
        by the stored rows' token ids, as Store.contexts does). ``token_id``, the token ids
        the caller expects (a scan's leaf keys), sends the token texts' query with the
        others: one round trip, a second only for a stored id not among them. Built for
        an image's answer (576 queries x 8 layers), where the per-key rows of Store.contexts
        and their Python tuples cost as much as the search.
        """
        info = self.get_model(model) if isinstance(model, str) else model
        if self.citus():
            return self._citus_columns(info, layer, sentence_id, position)
        with self._reads() as conn, conn.pipeline():
            return self._columns(conn, info, layer, sentence_id, position, token_id)

    def answer_columns(
        self, info: ModelInfo, layer: np.ndarray, sentence_id: np.ndarray, position: np.ndarray,
        token_id: np.ndarray | None, layers: Sequence[int], search: Mapping[int, Sequence[str]],
        spans: np.ndarray | None = None,
    ) -> tuple[ContextColumns, dict]:
        """context_columns and provenance(info, layers, search) of one answer, in one transaction
        and one pipeline: 4 round trips (BEGIN, the queries, the pipeline's sync, COMMIT), where
        the two calls inside reading() took 6 (BEGIN, spans + sentences, tokens, sync,
        provenance, COMMIT): ~2 ms of a warm 8-query search under load.

        ``spans`` [2, n]: each key's (char_start, char_end) where the search read them with its
        row from a cached leaf (-1: NULL), SPAN_UNKNOWN where not; those keys are not probed
        (an image's 5.7k key probes were 16.6 of the 28 ms of this call), their token id is
        ``token_id``'s."""
        if self.citus():
            with self.reading():
                return (self._citus_columns(info, layer, sentence_id, position),
                        self.provenance(info, layers, search))
        with self.reading(), self._reads() as conn, conn.pipeline():
            prov = conn.execute(PROVENANCE, (info.id,))  # sent with the contexts' queries
            cc = self._columns(conn, info, layer, sentence_id, position, token_id, spans)
            return cc, provenance_of(prov.fetchall(), info, layers, search)

    def _citus_columns(self, info: ModelInfo, layer: np.ndarray, sentence_id: np.ndarray, position: np.ndarray,
                       ) -> ContextColumns:
        """context_columns on a Citus coordinator: Store.contexts (see CITUS_CONTEXTS)."""
        keys = list(zip(np.asarray(layer).tolist(), np.asarray(sentence_id).tolist(),
                        np.asarray(position).tolist(), strict=True))
        got = self.contexts(info, keys) if keys else {}
        cols = [got.get(key) for key in keys]
        return ContextColumns(
            np.array([c is not None for c in cols], dtype=bool),
            np.array([c.token_id if c else -1 for c in cols], dtype=np.int64),
            [c.char_start if c else None for c in cols], [c.char_end if c else None for c in cols],
            [c.token if c else None for c in cols], [c.sentence if c else "" for c in cols])

    @staticmethod
    def _columns(conn: psycopg.Connection, info: ModelInfo, layer: np.ndarray, sentence_id: np.ndarray,
                 position: np.ndarray, token_id: np.ndarray | None, spans: np.ndarray | None = None,
                 ) -> ContextColumns:
        """context_columns' queries on ``conn`` (in a pipeline): every statement is sent before
        the first result is read. Keys with known ``spans`` (see answer_columns) are not probed."""
        layer = np.asarray(layer, dtype=np.int64)
        sid = np.asarray(sentence_id, dtype=np.int64)
        pos = np.asarray(position, dtype=np.int64)
        n = len(layer)
        found = np.zeros(n, dtype=bool)
        tok = np.full(n, -1, dtype=np.int64)
        cs: list[int | None] = [None] * n
        ce: list[int | None] = [None] * n
        if n == 0:
            return ContextColumns(found, tok, cs, ce, [], [])
        known = (np.zeros(n, dtype=bool) if spans is None or token_id is None
                 else (spans[0] != SPAN_UNKNOWN) & (spans[1] != SPAN_UNKNOWN))
        probe = np.flatnonzero(~known)
        probed = None
        if len(probe):
            probed = conn.cursor(binary=True)
            probed.execute(CONTEXT_SPANS, {"m": info.id, "l": _int_array(layer[probe]), "s": _int_array(sid[probe]),
                                           "p": _int_array(pos[probe])}, prepare=False)
        texts = conn.cursor(binary=True)
        texts.execute(CONTEXT_SENTENCES, {"ids": _int_array(np.unique(sid))}, prepare=False)
        names = None
        if token_id is not None:
            asked = np.unique(np.asarray(token_id, dtype=np.int64))
            names = conn.cursor(binary=True)
            names.execute(CONTEXT_TOKENS, {"m": info.id, "ids": _int_array(asked)}, prepare=False)
        rows = probed.fetchall() if probed is not None else []
        sent: dict[int, str] = dict(texts.fetchall())
        probe_l = probe.tolist()
        for i, t, a, b in rows:
            j = probe_l[i - 1]
            tok[j], cs[j], ce[j] = t, a, b
        if rows:
            found[probe[np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)) - 1]] = True
        if spans is not None and token_id is not None and known.any():
            kj = np.flatnonzero(known)
            found[kj] = True
            tok[kj] = np.asarray(token_id, dtype=np.int64)[kj]
            for j, a, b in zip(kj.tolist(), spans[0][kj].tolist(), spans[1][kj].tolist(), strict=True):
                cs[j], ce[j] = (a if a >= 0 else None), (b if b >= 0 else None)
        vocab: dict[int, str] = {}
        missing = np.unique(tok[found])
        if names is not None:
            vocab = dict(names.fetchall())
            missing = np.setdiff1d(missing, asked)  # rows rewritten since the caller read its ids
        if len(missing):
            names = conn.cursor(binary=True)
            names.execute(CONTEXT_TOKENS, {"m": info.id, "ids": _int_array(missing)}, prepare=False)
            vocab.update(names.fetchall())
        found_l = found.tolist()
        tokens = [vocab.get(t) if f else None for t, f in zip(tok.tolist(), found_l, strict=True)]
        sentences = [sent.get(x, "") if f else "" for x, f in zip(sid.tolist(), found_l, strict=True)]
        return ContextColumns(found, tok, cs, ce, tokens, sentences)

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




def _int_array(a: np.ndarray) -> str:
    """Integers as a PostgreSQL array literal, for a parameter cast to int[] / bigint[] in the SQL:
    psycopg adapts a Python list element by element (8 ms for an image's 17k key numbers)."""
    return "{" + ",".join(map(str, np.asarray(a, dtype=np.int64).tolist())) + "}"


def _load_queries(conn: psycopg.Connection, q: np.ndarray) -> None:
    """Send a batch of unit query vectors to a temp table by binary COPY (one round trip)."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS _llens_query (i integer, v halfvec) ON COMMIT DELETE ROWS")
    payload = HEADER + encode_rows(
        (("i", "int4"), ("v", "halfvec")),
        {"i": np.arange(len(q), dtype=np.int32), "v": q},
    ) + TRAILER
    with conn.cursor().copy("COPY _llens_query (i, v) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(payload)


class _ProgressWatcher:
    """Polls pg_stat_progress_create_index for one backend while it builds an index."""

    def __init__(self, url: str, pid: int, layer: int, progress: Callable[[IndexProgress], None] | None,
                 interval: float = 0.5):
        self.url, self.pid, self.layer, self.progress, self.interval = url, pid, layer, progress, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _ProgressWatcher:
        if self.progress is not None:
            self._thread = threading.Thread(target=self._run, name="llens-index-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        progress = self.progress
        if progress is None:  # __enter__ starts no thread then
            return
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                while not self._stop.wait(self.interval):
                    row = conn.execute(
                        "SELECT phase, tuples_done, tuples_total, blocks_done, blocks_total "
                        "FROM pg_stat_progress_create_index WHERE pid = %s", (self.pid,)
                    ).fetchone()
                    if row is None:
                        continue
                    phase, td, tt, bd, bt = row
                    done, total, unit = (td, tt, "row") if tt else (bd, bt, "block")
                    progress(IndexProgress(self.layer, phase, int(done or 0), int(total or 0), unit=unit))
        except psycopg.Error:
            return  # progress is best effort: the build itself reports its errors


def calibration_queries(sample: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit queries from stored rows, query i at cosine c_i with its row, the c_i
    evenly spread over CALIBRATION_COSINES (the turn is orthogonal to the row)."""
    rows = sample[rng.choice(len(sample), min(n, len(sample)), replace=False)].astype(np.float32)
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    noise = rng.normal(size=rows.shape).astype(np.float32)
    noise -= (noise * rows).sum(axis=1, keepdims=True) * rows
    noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    cos = np.linspace(*CALIBRATION_COSINES, len(rows), dtype=np.float32)[:, None]
    return cos * rows + np.sqrt(1 - cos ** 2) * noise
