"""ANN indexes and k-NN search in PostgreSQL (HNSW where it can, exact scans otherwise)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from latentlens.db import first_line
from latentlens.errors import EmptyResult, IndexUnsupported, InputError
from latentlens.pgcopy import HEADER, TRAILER, encode_rows
from latentlens.store.base import StoreBase
from latentlens.store.types import Context, KnnResult, ModelInfo, check_k, unit_queries

# maintenance_work_mem of the transaction that builds an index (only there:
# other sessions keep the server's setting)
BUILD_MAINTENANCE_WORK_MEM = "1GB"
# Recall calibration of a new index (calibrate_index): the recall@10 HNSW must
# reach on in-distribution queries, and the ef_search values tried for it.
RECALL_TARGET = 0.97
EF_LADDER = (40, 64, 100, 160, 250, 400, 640, 1000)
CALIBRATION_QUERIES = 64
CALIBRATION_NOISE = 0.5  # norm of the noise added to a unit stored row: cosine ~0.9, a typical text token's best


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

    # ---- indexes --------------------------------------------------------

    def build_index(
        self, model: ModelInfo | str, layers: Sequence[int] | None = None, *,
        m: int | None = None, ef_construction: int | None = None,
        maintenance_work_mem: str | None = BUILD_MAINTENANCE_WORK_MEM,
        progress: Callable[[IndexProgress], None] | None = None,
    ) -> list[int]:
        """Build (or rebuild) each layer's ANN index; return the layers done.

        Readers keep answering during a build (``llens_build_index`` builds
        under a temporary name and swaps). ``m`` / ``ef_construction`` default
        to the SQL function's (16 / 64). ``maintenance_work_mem`` is set for
        the building transaction only (HNSW builds that spill are far slower).
        ``progress`` gets IndexProgress events polled from
        pg_stat_progress_create_index on a second connection.
        """
        info = self.get_model(model) if isinstance(model, str) else model
        todo = list(layers) if layers is not None else info.layer_numbers
        for layer in todo:
            info.layer(layer)
        if not self.ann_supported():
            raise IndexUnsupported(
                "this server's pgvector cannot build ANN indexes on this CPU (its ANN probe "
                "failed, llens.ann_index = off); queries use exact search, which needs no index"
            )
        args = ["p_model_id => %(m)s", "p_layer => %(l)s"]
        if m is not None:
            args.append("p_m => %(hm)s")
        if ef_construction is not None:
            args.append("p_ef_construction => %(efc)s")
        sql = f"SELECT llens_build_index({', '.join(args)})"
        for layer in todo:
            watcher = _ProgressWatcher(self.url, self.conn.info.backend_pid, layer, progress)
            try:
                with self.transaction() as conn, watcher:
                    if maintenance_work_mem:
                        conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (maintenance_work_mem,))
                    conn.execute(sql, {"m": info.id, "l": layer, "hm": m, "efc": ef_construction})
            except psycopg.errors.InvalidParameterValue as e:
                raise InputError(first_line(e).removeprefix("llens: ")) from None
            if progress is not None:
                progress(IndexProgress(layer, "measuring recall", 0, 1))
            self.calibrate_index(info, layer)
            if progress is not None:
                progress(IndexProgress(layer, "done", 1, 1, finished=True))
        return todo

    def calibrate_index(
        self, model: ModelInfo | str, layer: int, *, queries: int = CALIBRATION_QUERIES, k: int = 10,
        target: float = RECALL_TARGET,
    ) -> dict:
        """Measure the index's recall@k against exact search and record the ef_search it needs.

        Queries are in-distribution (stored rows drawn by page sampling, moved
        to cosine ~0.9 by random noise): where HNSW is meant to be used; the
        truth is one exact pass over the leaf. The
        smallest ef_search of EF_LADDER with recall >= ``target`` goes into
        model_layer.index_params (``ef_search``, ``recall_at_10``,
        ``recall_ok``), so every client and llens_knn use it; if none reaches
        it, ``recall_ok`` is false and the search policy never uses this index.
        """
        info = self.get_model(model)  # fresh: the caller's may predate the rows just loaded
        sample = self.sample_layer(info, layer, 8 * queries).astype(np.float32)
        if len(sample) < 2 * k:
            return {}
        rng = np.random.default_rng(0)
        q = sample[rng.choice(len(sample), min(queries, len(sample)), replace=False)]
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        noise = rng.normal(size=q.shape).astype(np.float32)
        q = q + CALIBRATION_NOISE * noise / np.linalg.norm(noise, axis=1, keepdims=True)
        kth = self._exact_kth(info, layer, q, k)[:, None] - 1e-4
        found: dict = {"recall_ok": False, "ef_search": None, "recall_at_10": None}
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
            params,
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
                    self.progress(IndexProgress(self.layer, phase, int(done or 0), int(total or 0), unit=unit))
        except psycopg.Error:
            return  # progress is best effort: the build itself reports its errors
