"""Deciding and running a search: the policy, HNSW, the exact scan, the merge.

Two ways answer "the k nearest stored rows of these queries in this layer":

* the exact scan (latentlens.scan): a local copy of the leaf, scanned by
  blocks with a bfloat16 (where the CPU has the units) or float32 matmul and
  re-ranked in float32, certified equal to float32. Its cost is one read
  of the leaf (N x D) plus the matmul (N x D x Q): the read dominates small
  batches, so a few queries on a big leaf pay for the whole leaf; a leaf not
  yet cached is copied from the database first;
* HNSW in PostgreSQL (``llens_knn``): about a millisecond per query whatever
  the leaf's size, but approximate, and it misses badly on queries far from
  every stored row (visual tokens: best cosine ~0.1-0.25), and one round of
  graph search per query makes it slower than the scan for large batches.

In ``auto`` mode each (layer, batch) goes where it is cheaper by a cost
model calibrated once per machine (scan) and per leaf (HNSW, measured on the
first queries it answers), and HNSW only gets queries it can answer well:

1. no index, no ANN support on the server, k > 1000, or visual queries
   (``query_kind="visual"``) -> scan;
2. estimated HNSW cost of the batch >= the scan's -> scan;
3. otherwise a cheap distribution test: each query's best cosine against a
   sample of the leaf. Queries below ``ood_threshold`` there go to the scan
   (if the split is still cheaper than scanning all), the rest to HNSW; any
   HNSW answer whose best similarity is below ``ood_threshold`` is redone by
   the scan. So out-of-distribution queries are always answered exactly.

Every result records the path that answered it ("scan", "ann", "sql"); the
``exact`` mode always scans, ``ann`` never falls back. Without torch (a
SQL-only install) the exact path runs inside PostgreSQL ("sql").
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from latentlens import config
from latentlens.errors import EmptyResult, InputError
from latentlens.store import KnnResult, ModelInfo, Store

if TYPE_CHECKING:
    from latentlens.scan import ScanEngine

Mode = Literal["auto", "exact", "ann"]
QueryKind = Literal["auto", "text", "visual"]
MODES = ("auto", "exact", "ann")
QUERY_KINDS = ("auto", "text", "visual")

# Best cosine below which a query counts as out-of-distribution: text tokens'
# nearest contexts score ~0.9, visual tokens' ~0.1-0.3.
DEFAULT_OOD_THRESHOLD = 0.5
# hnsw.ef_search where the index has no measured value (Store.calibrate_index
# records the one each index needs for its recall target when it is built)
AUTO_EF_SEARCH = 100
HNSW_MAX_K = 1000
SAMPLE_ROWS = 2048
# queries HNSW answers first on a leaf whose HNSW cost this process has not measured
ANN_PROBE = 16

# Prior costs (seconds), replaced by measurements: per HNSW query
# (a + b * ef * log2 N), and per element (row x dimension) to copy a leaf
# into the scan cache. Measured on a 2-core AVX2 machine.
ANN_PRIOR = (3e-4, 6e-7)
COPY_PRIOR = 3.5e-8
# warm scans a CostModel keeps while its constants are not yet known
PENDING_SCANS = 16
SQL_EXACT_PRIOR = 2e-9  # per element and query: llens_knn's exact scan, where torch is missing


def validate_layers(info: ModelInfo, layers: Sequence[int] | None) -> list[int]:
    """The stored layers to search (default: all with rows), or a clear error naming what exists."""
    have = ", ".join(f"{li.layer} ({li.row_count} rows)" for li in info.layers) or "none"
    if info.row_count == 0:
        raise EmptyResult(f"model '{info.name}' has no rows yet (stored layers: {have}): run `llens ingest`")
    if layers is None:
        return [li.layer for li in info.layers if li.row_count > 0]
    chosen = sorted(set(int(x) for x in layers))
    if not chosen:
        raise InputError("no layers chosen")
    for layer in chosen:
        if info.layer(layer).row_count == 0:
            raise EmptyResult(f"layer {layer} of model '{info.name}' has no rows (stored layers: {have})")
    return chosen


def check_mode(mode: str, query_kind: str = "auto") -> None:
    if mode not in MODES:
        raise InputError(f"unknown search mode '{mode}' (use {', '.join(MODES)})")
    if query_kind not in QUERY_KINDS:
        raise InputError(f"unknown query kind '{query_kind}' (use {', '.join(QUERY_KINDS)})")


@dataclass
class LayerSearch:
    """One layer's answers, the path each query took, and why."""

    result: KnnResult
    paths: list[str]
    reason: str
    seconds: float = 0.0
    estimates: dict[str, float] = field(default_factory=dict)


@dataclass
class _Exact:
    """A layer whose whole batch the exact scan answers, and why (Searcher._search_layer)."""

    reason: str
    estimates: dict[str, float] = field(default_factory=dict)


class _NeedsSampleTest:
    """Searcher._search_layer's answer where its plan waits on the distribution test: search()
    runs the test for every such layer of the batch at once (_sample_max_many), then asks again."""


# --------------------------------------------------------------------------
# costs


def _cost_path() -> Path:
    # v2: measured at Q = 1 and 512; v3: with the one-pass threshold selection; v4: a few
    # queries multiply block @ q.T (scan._block_scores: Q = 1 measures faster than in v3)
    return config.cache_dir() / "scan" / "costs-v4.json"


class CostModel:
    """Seconds a scan or an HNSW batch will take, from one-time measurements.

    scan(N, D, Q) = N * D * (read + Q * mul) [+ N * D * copy when not cached];
    the two scan constants are measured once per machine and torch build
    (~1.5 s) and kept in the cache dir; copy and HNSW costs start from priors
    and follow what this process observes.
    """

    def __init__(self, scan: tuple[float, float] | None = None) -> None:
        """``scan``: the (read, mul) constants when known (else measured_once's, when first needed)."""
        self._scan: tuple[float, float] | None = scan
        self.copy = COPY_PRIOR
        self.scan_factor = 1.0
        self._ann: dict[tuple[int, int], float] = {}  # (model id, layer) -> s per query at AUTO_EF_SEARCH
        # warm scans seen before the constants were known (observed, not measured: see observe_scan)
        self._pending: list[tuple[int, int, int, float]] = []

    def scan_constants(self) -> tuple[float, float]:
        if self._scan is None:
            self._scan = _load_or_measure_scan()
            pending, self._pending = self._pending, []
            for obs in pending:
                self.observe_scan(*obs)
        return self._scan

    def scan(self, rows: int, dim: int, nq: int, cached: bool) -> float:
        read, mul = self.scan_constants()
        t = rows * dim * (read + nq * mul) * self.scan_factor
        return t if cached else t + rows * dim * self.copy

    @property
    def measured_ann(self) -> set[tuple[int, int]]:
        """The leaves whose HNSW cost has been observed (the others use the prior)."""
        return set(self._ann)

    def ann(self, key: tuple[int, int], rows: int, nq: int, ef: int) -> float:
        per = self._ann.get(key)
        if per is None:
            per = ANN_PRIOR[0] + ANN_PRIOR[1] * AUTO_EF_SEARCH * math.log2(max(rows, 2))
        return nq * per * max(ef, 1) / AUTO_EF_SEARCH

    def observe_ann(self, key: tuple[int, int], nq: int, ef: int, seconds: float) -> None:
        # weighted to the latest: a leaf's first batch also pays for reading its index from disk
        per = seconds / max(nq, 1) * AUTO_EF_SEARCH / max(ef, 1)
        old = self._ann.get(key)
        self._ann[key] = per if old is None else 0.25 * old + 0.75 * per

    def observe_scan(self, rows: int, dim: int, nq: int, seconds: float) -> None:
        """Correct the calibrated scan model by what warm scans take in this process.

        Only scans long enough for the model's terms to dominate count: a
        tiny leaf's scan is Python overhead and would skew big leaves' estimates.
        Observing never measures: an exact search (which needs no cost model) on a
        machine not yet calibrated paid the ~1.5 s measurement and its ~300 MiB
        inside its first query; its scans are kept until the constants are known.
        """
        if self._scan is None:
            known = _load_scan()
            if known is None:
                self._pending = [*self._pending[-(PENDING_SCANS - 1):], (rows, dim, nq, seconds)]
                return
            self._scan = known
        model = self.scan(rows, dim, nq, cached=True) / self.scan_factor
        if model < 0.05:
            return
        ratio = seconds / model
        self.scan_factor = 0.25 * self.scan_factor + 0.75 * min(max(ratio, 0.2), 5.0)

    def observe_copy(self, elements: int, seconds: float) -> None:
        if elements > 1_000_000:
            self.copy = 0.5 * (self.copy + seconds / elements)


def _load_or_measure_scan() -> tuple[float, float]:
    from latentlens.scan import measure_scan, measured_once

    c = measured_once(_cost_path(), measure_scan)
    return float(c["read"]), float(c["mul"])


def _load_scan() -> tuple[float, float] | None:
    """The scan constants if this machine has measured them already (never measures)."""
    from latentlens.scan import measured_before

    c = measured_before(_cost_path())
    return None if c is None else (float(c["read"]), float(c["mul"]))


# --------------------------------------------------------------------------
# the searcher


class Searcher:
    """Runs searches for a Lens: owns the scan engine, the cost model and leaf samples."""

    def __init__(self, store: Store, *, scan_args: dict[str, Any] | None = None,
                 ood_threshold: float = DEFAULT_OOD_THRESHOLD):
        self.store = store
        self.ood_threshold = ood_threshold
        self.costs = CostModel()
        self._scan_args = scan_args or {}
        self._scan: ScanEngine | None = None
        self._torch: bool | None = None
        self._samples: dict[tuple[int, int, int, int], np.ndarray] = {}
        self._stacked: dict[tuple, Any] = {}  # _sample_max_many's last [L, S, D] torch stack

    # ---- engines ------------------------------------------------------------

    @property
    def has_torch(self) -> bool:
        if self._torch is None:
            try:
                import torch  # noqa: F401
            except ImportError:
                self._torch = False
            else:
                self._torch = True
        return self._torch

    @property
    def scan(self) -> ScanEngine:
        if self._scan is None:
            from latentlens.scan import ScanEngine

            self._scan = ScanEngine(self.store, **self._scan_args)
        return self._scan

    def _exact(self, info: ModelInfo, layer: int, q: np.ndarray, k: int) -> tuple[KnnResult, str]:
        li = info.layer(layer)
        if not self.has_torch:
            return self.store.knn(info, layer, q, k, exact=True), "sql"
        cached = self.scan.cache.cached(info, layer, (li.row_count, li.version)) is not None
        t = time.perf_counter()
        res = self.scan.search(info, layer, q, k, version=(li.row_count, li.version))
        took = time.perf_counter() - t
        if cached:
            self.costs.observe_scan(li.row_count, info.hidden_size, len(q), took)
        else:
            self.costs.observe_copy(li.row_count * info.hidden_size, took)
        return res, "scan"

    def _ann(self, info: ModelInfo, layer: int, q: np.ndarray, k: int, ef: int) -> KnnResult:
        t = time.perf_counter()
        res = self.store.knn(info, layer, q, k, ef_search=ef)
        self.costs.observe_ann((info.id, layer), len(q), ef, time.perf_counter() - t)
        return res

    # ---- policy ---------------------------------------------------------------

    def search(
        self, info: ModelInfo, layers: Sequence[int], q: np.ndarray, k: int, *,
        mode: Mode = "auto", query_kind: QueryKind = "auto", ef_search: int | None = None,
        ann_supported: bool | None = None,
    ) -> dict[int, LayerSearch]:
        """Top-k of unit queries ``q`` [Q, D] in each layer, each layer by its own plan
        (``ann_supported``: Store.ann_supported() where the caller read it with ``info``)."""
        check_mode(mode, query_kind)
        out = {}
        # one round trip for the batch, not one per layer
        server_ann = mode != "exact" and any(info.layer(x).index_kind for x in layers) and (
            self.store.ann_supported() if ann_supported is None else ann_supported)
        self._prefetch(info, [x for x in layers if mode == "exact" or query_kind == "visual"
                              or not (server_ann and info.layer(x).index_kind)])
        exact: dict[int, _Exact] = {}
        near: dict[int, np.ndarray] = {}
        spent: dict[int, float] = {}  # a waiting layer's time before its second pass
        todo = list(layers)
        while todo:
            waiting = []
            for layer in todo:
                t = time.perf_counter()
                ls = self._search_layer(info, layer, q, k, mode, query_kind, ef_search, server_ann, near)
                took = time.perf_counter() - t + spent.get(layer, 0.0)
                if isinstance(ls, _NeedsSampleTest):
                    waiting.append(layer)
                    spent[layer] = took
                elif isinstance(ls, _Exact):
                    exact[layer] = ls  # scanned together below
                else:
                    ls.seconds = took
                    out[layer] = ls
            # the distribution test of every waiting layer in one op, then their plans again
            t = time.perf_counter()
            near.update(self._sample_max_many(info, waiting, q))
            for layer in waiting:
                spent[layer] += (time.perf_counter() - t) / len(waiting)
            todo = waiting
        nq = len(q)
        for layer, (res, path, seconds) in self._exact_many(info, list(exact), q, k).items():
            out[layer] = LayerSearch(res, [path] * nq, exact[layer].reason, seconds=seconds,
                                     estimates=exact[layer].estimates)
        return {layer: out[layer] for layer in layers}

    def _exact_many(self, info: ModelInfo, layers: list[int], q: np.ndarray, k: int
                    ) -> dict[int, tuple[KnnResult, str, float]]:
        """The exact answer of each layer, (result, path, seconds): leaf by leaf, or for a few
        queries over several cached leaves side by side (ScanEngine.search_many), their time
        shared by rows (what a scan of each costs the batch)."""
        if not layers:
            return {}
        if not self.has_torch or self.scan.leaf_workers(len(q), len(layers)) < 2:
            out = {}
            for layer in layers:
                t = time.perf_counter()
                res, path = self._exact(info, layer, q, k)
                out[layer] = (res, path, time.perf_counter() - t)
            return out
        versions = {x: (info.layer(x).row_count, info.layer(x).version) for x in layers}
        cached = all(self.scan.cache.cached(info, x, versions[x]) is not None for x in layers)
        t = time.perf_counter()
        found = self.scan.search_many(info, layers, q, k, versions=versions)
        took = time.perf_counter() - t
        rows = sum(info.layer(x).row_count for x in layers)
        out = {}
        for layer in layers:
            share = took * info.layer(layer).row_count / max(rows, 1)
            if cached:
                self.costs.observe_scan(info.layer(layer).row_count, info.hidden_size, len(q), share)
            out[layer] = (found[layer], "scan", share)
        if not cached:
            self.costs.observe_copy(rows * info.hidden_size, took)
        return out

    def _prefetch(self, info: ModelInfo, layers: list[int]) -> None:
        """Copy the uncached leaves that will be scanned all at once (in parallel), not one by one."""
        layers = [x for x in layers if info.layer(x).row_count > 0]
        if len(layers) < 2 or not self.has_torch:
            return
        missing = [x for x in layers
                   if self.scan.cache.cached(info, x, (info.layer(x).row_count, info.layer(x).version)) is None]
        if len(missing) < 2:
            return
        t = time.perf_counter()
        self.scan.prefetch(info, missing)
        self.costs.observe_copy(sum(info.layer(x).row_count for x in missing) * info.hidden_size,
                                time.perf_counter() - t)

    def _search_layer(
        self, info: ModelInfo, layer: int, q: np.ndarray, k: int, mode: Mode, query_kind: QueryKind,
        ef_search: int | None, server_ann: bool, near_of: dict[int, np.ndarray],
    ) -> LayerSearch | _Exact | _NeedsSampleTest:
        """The layer's answer, or _Exact when the whole batch goes to the exact scan (run by
        search() with the other such layers); a mixed batch's scan of its far queries runs here.
        Where the plan needs the distribution test and ``near_of`` (layer -> each query's best
        sample cosine) lacks the layer: _NeedsSampleTest, nothing done yet."""
        li = info.layer(layer)
        nq = len(q)
        # wide layers' indexes (binary HNSW, DiskANN) re-rank 10k candidates, at most 1000
        max_k = HNSW_MAX_K if li.index_kind == "hnsw_halfvec" else HNSW_MAX_K // 10
        ann_ok = li.index_kind is not None and k <= max_k and server_ann
        ef = min(HNSW_MAX_K, max(ef_search or li.index_ef_search or AUTO_EF_SEARCH, k))

        if mode == "exact":
            return _Exact("exact search requested")
        if not ann_ok:
            why = ("no ANN index on this layer" if li.index_kind is None
                   else f"k > {max_k}" if k > max_k else "ANN disabled on this server")
            return _Exact(why)
        if mode == "ann":
            return LayerSearch(self._ann(info, layer, q, k, ef), ["ann"] * nq, "ANN search requested")
        if query_kind == "visual":
            return _Exact("visual queries are out of distribution: exact scan")
        if not li.index_recall_ok:
            return _Exact({
                "below": "the index missed its recall target when it was measured: exact scan",
                "stale": "the leaf grew since the index's recall was measured (llens index calibrate): exact scan",
            }.get(li.index_recall, "the index's recall is unmeasured (llens index calibrate): exact scan"))

        cached = self.has_torch and self.scan.cache.cached(info, layer, (li.row_count, li.version)) is not None
        key = (info.id, layer)

        def scan_cost(n: int) -> float:
            if n == 0:
                return 0.0
            if not self.has_torch:  # exact search runs in PostgreSQL: one leaf scan per query
                return n * li.row_count * info.hidden_size * SQL_EXACT_PRIOR
            return self.costs.scan(li.row_count, info.hidden_size, n, cached)

        est_scan = scan_cost(nq)
        est_ann = self.costs.ann(key, li.row_count, nq, ef)
        estimates = {"scan_s": est_scan, "ann_s": est_ann}
        if est_ann >= est_scan:
            return _Exact("exact scan estimated cheaper than HNSW for this batch", estimates)

        # distribution test: queries far from a sample of the leaf go to the scan
        if query_kind == "text":
            near = np.ones(nq, dtype=bool)
        elif layer not in near_of:
            return _NeedsSampleTest()
        else:
            near = near_of[layer] >= self.ood_threshold
        n_far = int((~near).sum())
        est_split = scan_cost(n_far) + self.costs.ann(key, li.row_count, nq - n_far, ef)
        estimates["split_s"] = est_split
        if n_far == nq or est_split >= est_scan:
            return _Exact(f"{n_far} of {nq} queries out of distribution: exact scan", estimates)

        res = KnnResult.empty(layer, nq, k)
        paths = ["ann"] * nq
        idx = np.flatnonzero(near)
        if key not in self.costs.measured_ann and len(idx) > 2 * ANN_PROBE:
            # HNSW's cost on this leaf is a prior until measured: answer a few queries
            # with it first, then decide for the rest on what they cost
            head, idx = idx[:ANN_PROBE], idx[ANN_PROBE:]
            res.take(head, self._ann(info, layer, q[head], k, ef))
            # the rest: HNSW for the near ones and a scan for the far ones, or one scan for all
            if scan_cost(n_far) + self.costs.ann(key, li.row_count, len(idx), ef) >= scan_cost(n_far + len(idx)):
                idx = idx[:0]
        if len(idx):
            res.take(idx, self._ann(info, layer, q[idx], k, ef))
        # one exact pass for the far queries (no answer yet) and for HNSW answers far
        # from everything, which are not trusted
        weak = np.flatnonzero(~(res.similarity[:, 0] >= self.ood_threshold))
        if len(weak):
            fix, path = self._exact(info, layer, q[weak], k)
            res.take(weak, fix)
            for i in weak:
                paths[i] = path
        n_ann = paths.count("ann")
        reason = f"HNSW for {n_ann} in-distribution queries"
        if len(weak):
            reason += f", exact for {len(weak)}"
        return LayerSearch(res, paths, reason, estimates=estimates)

    def _sample_of(self, info: ModelInfo, layer: int) -> np.ndarray:
        """The leaf's fixed sample, unit rows (kept per leaf version)."""
        li = info.layer(layer)
        key = (info.id, layer, li.row_count, li.version)
        sample = self._samples.get(key)
        if sample is None:
            sample = self.store.sample_layer(info, layer, SAMPLE_ROWS).astype(np.float32)
            norms = np.linalg.norm(sample, axis=1, keepdims=True)
            sample = sample / np.maximum(norms, 1e-12)
            self._samples = {k: v for k, v in self._samples.items() if k[:2] != key[:2]}
            self._samples[key] = sample
        return sample

    def _sample_max_many(self, info: ModelInfo, layers: Sequence[int], q: np.ndarray) -> dict[int, np.ndarray]:
        """Each query's best cosine against a fixed sample of each leaf (about a lower bound of
        its top-1: rounded to bfloat16 where the scan is). With torch, one batched matmul over the samples of
        equal size (8 layers' tests one by one were ~10 ms of a warm 8-query search, each op
        of well under a millisecond paying torch's thread-pool hand-off; one op ~1 ms); on
        torch's threads, as the scan that may follow (a numpy (OpenBLAS) matmul leaves its
        threads spinning and slowed the next scan's matmul 1.4x)."""
        out: dict[int, np.ndarray] = {}
        samples = {layer: self._sample_of(info, layer) for layer in layers}
        by_size: dict[int, list[int]] = {}
        for layer, sample in samples.items():
            if len(sample) == 0:
                out[layer] = np.full(len(q), -1.0, dtype=np.float32)
            elif not self.has_torch:
                out[layer] = (q @ sample.T).max(axis=1)
            else:
                by_size.setdefault(len(sample), []).append(layer)
        if by_size:
            import torch

            # in the scan's dtype (bfloat16 where the CPU has BF16 units): the stack is read
            # whole for a few queries (8 x 2048 x 576 float32 is 37 MB, ~4.7 ms a search at
            # 36.5k x 8); a routing test, whose rounding (< 0.01 in cosine) moves only
            # queries at the threshold: the answers' exactness does not rest on it
            dtype = torch.bfloat16 if self.scan.dtype == torch.bfloat16 else torch.float32
            qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(dtype)
            for group in by_size.values():
                key = (dtype, *((info.id, x, info.layer(x).row_count, info.layer(x).version) for x in group))
                st = self._stacked.get(key)
                if st is None:  # the last stack is kept: a search asks the same layers again
                    st = torch.from_numpy(np.stack([samples[x] for x in group])).to(dtype)  # [L, S, D]
                    self._stacked = {key: st}
                best = torch.matmul(st, qt.T).amax(dim=1).float().numpy()  # [L, Q]
                out.update(zip(group, best, strict=True))
        return out


# --------------------------------------------------------------------------
# merging layers


def merge_layers(by_layer: dict[int, KnnResult], k: int, keep: int | None = None) -> list[list[tuple[int, int]]]:
    """For each query, its global top-k across layers by cosine, as (layer, rank in layer) pairs.

    Like the reference's ContextualIndex.search: every layer's top-k, merged
    (``keep``: how many of the merged list to return, default k).
    """
    layers = sorted(by_layer)
    sims = np.stack([by_layer[x].similarity for x in layers])  # [L, Q, k]
    nq = sims.shape[1]
    flat = sims.transpose(1, 0, 2).reshape(nq, -1)  # [Q, L*k]
    order = np.argsort(-flat, axis=1, kind="stable")[:, : (k if keep is None else keep)]
    finite = np.isfinite(np.take_along_axis(flat, order, axis=1))
    li, rank = np.divmod(order, k)
    # whole rows as Python lists at once: per-element numpy indexing cost more than the search
    # itself for an image's 576 queries (profiled: 0.06 s a call)
    lay, rank_l = np.asarray(layers)[li].tolist(), rank.tolist()
    if finite.all():
        return [list(zip(a, b, strict=True)) for a, b in zip(lay, rank_l, strict=True)]
    return [[(a, b) for a, b, f in zip(la, ra, fa, strict=True) if f]
            for la, ra, fa in zip(lay, rank_l, finite.tolist(), strict=True)]


__all__ = [
    "AUTO_EF_SEARCH", "DEFAULT_OOD_THRESHOLD", "CostModel", "LayerSearch", "Mode", "QueryKind", "Searcher",
    "check_mode", "merge_layers", "validate_layers",
]
