"""The store: models, corpora, sentences and token embeddings in PostgreSQL.

Speaks numpy and SQL only (never torch), so a SQL-only install stays light.
One ``Store`` wraps one psycopg connection and is not thread-safe: give each
thread its own (``Store.open`` is cheap once the server is up).

Bulk writes use binary COPY encoded with numpy (latentlens.pgcopy); a batch
of embeddings for all layers, the quota bookkeeping and the caller's run
progress commit in one transaction, so a killed process never leaves rows
that its run does not account for.

One module per concern, combined into ``Store``:
``base`` (connection, transactions, schema check), ``catalog`` (models,
layers, vocabularies, corpora, sentences), ``embeddings`` (bulk write and
read), ``runs`` (ingest runs), ``search`` (indexes, k-NN, contexts), ``evals``
(evaluation runs and their verdicts), ``analyses`` (saved analyses, provenance),
``phrases`` (sentences containing a phrase, for the web app's context search),
``atlas`` (visual tokens of image collections and their neighbours).
"""

from __future__ import annotations

from latentlens.errors import LatentLensError, UnknownAtlas
from latentlens.store.analyses import AnalysesMixin, AnalysisInfo
from latentlens.store.atlas import AtlasHit, AtlasInfo, AtlasMixin, AtlasRunInfo
from latentlens.store.catalog import CatalogMixin
from latentlens.store.embeddings import (
    EMBEDDING_COLUMNS,
    SCAN_COLUMNS,
    EmbeddingsMixin,
)
from latentlens.store.evals import EvalItem, EvalRunInfo, EvalsMixin, EvalVerdict
from latentlens.store.phrases import PhrasesMixin
from latentlens.store.runs import RunsMixin
from latentlens.store.search import ContextColumns, SearchMixin
from latentlens.store.types import (
    Context,
    CorpusInfo,
    EmbeddingBatch,
    KnnResult,
    LayerInfo,
    ModelInfo,
    RunInfo,
    text_hash,
)


class Store(CatalogMixin, EmbeddingsMixin, RunsMixin, SearchMixin, EvalsMixin, AnalysesMixin, PhrasesMixin,
            AtlasMixin):
    """Typed access to the latentlens schema over one psycopg connection."""


__all__ = [
    "EMBEDDING_COLUMNS", "SCAN_COLUMNS",
    "AnalysisInfo", "AtlasHit", "AtlasInfo", "AtlasRunInfo", "Context", "ContextColumns", "CorpusInfo", "EmbeddingBatch", "EvalItem", "EvalRunInfo", "EvalVerdict", "KnnResult",
    "LatentLensError",
    "LayerInfo", "ModelInfo", "RunInfo", "Store", "UnknownAtlas", "text_hash",
]
