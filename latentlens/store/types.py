"""Value objects the store hands out and takes in (numpy arrays, no torch)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentlens.errors import DimensionMismatch, InputError, UnknownLayer

# The largest k any search serves: results are Q x layers x k rows with
# sentences, and HNSW itself stops at 1000 (larger k scan exactly).
MAX_K = 10_000
# (sentence_id, position, token_id) of a stored row, as the scan cache keeps them
# a leaf row's key as Store.iter_layer streams it, with its char span (-1 where the column is
# NULL), so that an answer scanned from a cached leaf needs no lookup of its spans
KEY_DTYPE = np.dtype([("sentence_id", "<i8"), ("position", "<i4"), ("token_id", "<i4"),
                      ("char_start", "<i4"), ("char_end", "<i4")])
# a KnnResult's char span where it was not read with the row (an ANN or SQL answer): look it up
SPAN_UNKNOWN = -2
IMPORTED_WITHOUT_SOURCE = "this index was imported without --source; import it again with --source CHECKPOINT"


def check_layer_range(layers: Any, num_layers: int, model: str, *, visual: bool = False) -> list[int]:
    """Sorted unique layers, each in 0..num_layers, or UnknownLayer naming the range.

    hidden_states has num_layers + 1 entries: 0 is the input embeddings (for
    visual tokens, the projector's output), num_layers the last block's output.
    """
    chosen = sorted({int(x) for x in layers})
    bad = [x for x in chosen if x < 0 or x > num_layers]
    if bad or not chosen:
        what, zero = ("visual layer", "projector output") if visual else ("layer", "input embeddings")
        raise UnknownLayer(f"{what} {bad[0] if bad else '(none)'} is out of range for '{model}' "
                           f"(0 = {zero} .. {num_layers} = last block)")
    return chosen


# A leaf whose rows grew by more than this share since its index's recall was
# measured has its recall measured again (Store.refresh_recall) or, until then,
# counts as unmeasured: the default search keeps off its HNSW index.
RECALL_STALE_GROWTH = 0.2


@dataclass(frozen=True)
class LayerInfo:
    layer: int
    row_count: int
    version: int
    index_kind: str | None
    index_params: dict = field(default_factory=dict)

    @property
    def index_ef_search(self) -> int | None:
        """The hnsw.ef_search this leaf's index needs for recall@10 >= 0.97 on in-distribution
        queries, measured when it was built (None: unmeasured, or no ef_search reaches it)."""
        ef = self.index_params.get("ef_search")
        return int(ef) if ef else None

    @property
    def index_recall(self) -> str:
        """What is known of this leaf's HNSW recall: 'ok' (measured at the target on this
        leaf, give or take RECALL_STALE_GROWTH of rows), 'below' (measured, missed it),
        'unmeasured' (no figure, or one without the row count it was measured at) or
        'stale' (the leaf grew by more than RECALL_STALE_GROWTH since)."""
        p = self.index_params or {}
        if "recall_ok" not in p or not p.get("calibrated_rows"):
            return "unmeasured"
        if p["recall_ok"] is not True:
            return "below"
        if self.row_count > int(p["calibrated_rows"]) * (1 + RECALL_STALE_GROWTH):
            return "stale"
        return "ok"

    @property
    def index_recall_ok(self) -> bool:
        """True only where the recall target was measured on (about) the leaf as it is now:
        a missing or outgrown figure does not count as passing."""
        return self.index_recall == "ok"


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

    def check_layer_range(self, layers: Any) -> None:
        check_layer_range(layers, self.num_layers, self.name)

    @property
    def loadable(self) -> bool:
        """Whether a checkpoint is recorded (``llens ingest``, or an import with --source)."""
        return bool((self.params or {}).get("source"))

    def require_source(self) -> None:
        """One line instead of a failed load where the model was imported without --source
        (its name is no checkpoint: loading it would fail or load another model)."""
        imported = self.architecture == "imported" or "imported_from" in (self.params or {})
        if imported and not self.loadable:
            raise InputError(f"model '{self.name}': {IMPORTED_WITHOUT_SOURCE}")

    def checkpoint(self) -> tuple[str, str | None]:
        """(source, revision) to load this model from: what ``llens ingest`` (or an import
        with --source) recorded, else its name (a local dir is stored under its name)."""
        params = self.params or {}
        return str(params.get("source") or self.name), params.get("revision") or self.revision

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
    """One ``llens ingest`` run (one shard of one model over one corpus), or one
    ``llens import-index`` (``kind`` 'import': a pre-built index loaded, ``params["origin"]``)."""

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
    kind: str = "ingest"

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
    # [Q, k] char spans where the search read them with the rows (the scan of a cached leaf):
    # -1 where NULL, SPAN_UNKNOWN where not read; None: none read (the answer looks them up)
    char_start: np.ndarray | None = None
    char_end: np.ndarray | None = None

    @classmethod
    def empty(cls, layer: int, nq: int, k: int) -> KnnResult:
        return cls(layer, np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64),
                   np.full((nq, k), -1, dtype=np.int32), np.full((nq, k), -1, dtype=np.int32))

    def take(self, rows: np.ndarray, other: KnnResult) -> None:
        """Overwrite the results of queries ``rows`` with ``other``'s (answers for those queries)."""
        for name in ("similarity", "sentence_id", "position", "token_id"):
            getattr(self, name)[rows] = getattr(other, name)
        if other.char_start is not None and other.char_end is not None:
            if self.char_start is None or self.char_end is None:
                self.char_start = np.full(self.position.shape, SPAN_UNKNOWN, dtype=np.int32)
                self.char_end = np.full(self.position.shape, SPAN_UNKNOWN, dtype=np.int32)
            self.char_start[rows] = other.char_start
            self.char_end[rows] = other.char_end
        elif self.char_start is not None and self.char_end is not None:
            self.char_start[rows] = SPAN_UNKNOWN
            self.char_end[rows] = SPAN_UNKNOWN


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




def check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or k < 1 or k > MAX_K:
        raise InputError(f"k must be between 1 and {MAX_K:,} (got {k})")
    return int(k)


def check_vector_values(q: np.ndarray, label: str = "query vector", *, zeros: bool = True) -> None:
    """InputError naming the first row of ``q`` [Q, D] that is NaN/infinite or (``zeros``) all zeros.

    Neither has a direction to search by (a cosine needs a non-zero, finite
    norm). ``label`` starts the message, e.g. "query vector" or "q.npy: vector".
    """
    finite = np.isfinite(q).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        more = f" ({len(bad)} of {len(q)} vectors do)" if len(bad) > 1 else ""
        raise InputError(f"{label} {int(bad[0])} contains NaN or infinite values{more}")
    zero = ~(q != 0).any(axis=1) if zeros else np.zeros(len(q), dtype=bool)
    if zero.any():
        bad = np.flatnonzero(zero)
        more = f" ({len(bad)} of {len(q)} vectors are)" if len(bad) > 1 else ""
        raise InputError(f"{label} {int(bad[0])} is all zeros{more}: it has no direction to search by")


def unit_queries(vectors: Any, dim: int, model: str = "") -> np.ndarray:
    """Query vectors as float32 unit rows [Q, D], or a one-line error.

    Normalised in float32 (mid-layer hidden states have norms in the
    thousands); a zero, NaN or infinite vector has no direction to search by.
    """
    if hasattr(vectors, "detach"):  # a torch tensor, without importing torch
        vectors = vectors.detach().float().cpu().numpy()
    a = np.asarray(vectors)
    if a.dtype.kind not in "fiub":  # strings, objects, complex or records are no vectors
        raise InputError(f"query vectors must be numbers, got an array of {a.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        q = a.astype(np.float32, copy=False)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise DimensionMismatch(f"query vectors must be [N, D] or [D], got shape {tuple(q.shape)}")
    if q.shape[1] != dim:
        who = f"model '{model}'" if model else "the model"
        raise DimensionMismatch(f"query vectors have {q.shape[1]} dimensions, {who} has hidden size {dim}")
    if len(q) == 0:
        raise InputError("no query vectors given")
    check_vector_values(q)
    with np.errstate(over="ignore"):
        norms = np.linalg.norm(q, axis=1)
    if not (np.isfinite(norms) & (norms > 0)).all():  # squares that over- or underflow float32
        q64 = q.astype(np.float64)
        return np.ascontiguousarray((q64 / np.linalg.norm(q64, axis=1)[:, None]).astype(np.float32))
    return np.ascontiguousarray(q / norms[:, None])
