"""Value objects the store hands out and takes in (numpy arrays, no torch)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentlens.errors import UnknownLayer


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


