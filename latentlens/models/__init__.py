"""Architecture adapters: the one place that knows where a model keeps its language model, layers and tokenizer.

Only this package (and ingest/query/vlm, through it) imports torch and
transformers; the store never does.
"""

from latentlens.models.adapters import (
    ADAPTERS,
    Adapter,
    LensHeads,
    adapter_for_config,
    heads_of,
    language_model_of,
    supported_model_types,
)
from latentlens.models.base import Encoding, LanguageModel, TextStates
from latentlens.models.loading import DTYPES, default_name, load_from_store, load_language_model

__all__ = [
    "ADAPTERS", "DTYPES", "Adapter", "Encoding", "LanguageModel", "LensHeads", "TextStates",
    "adapter_for_config", "heads_of",
    "default_name", "language_model_of", "load_from_store", "load_language_model",
    "supported_model_types",
]
