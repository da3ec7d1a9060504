"""Language models as latentlens runs them: loading (transformers ids, local dirs, GGUF) and hidden states.

Where a model keeps its language model, layers, heads and tokenizer is known
by one place, the architecture registry (``latentlens.architectures``); the
names this package had for it (``Adapter``, ``adapter_for_config``,
``language_model_of``, ``heads_of``, ``ADAPTERS``, ...) answer from there.
Only this package (and ingest/query/vlm/architectures) imports torch and
transformers; the store never does.
"""

from typing import Any

from latentlens.architectures import (
    Adapter,
    LensHeads,
    heads_of,
    language_model_of,
    supported_model_types,
)
from latentlens.architectures import family_for as adapter_for_config
from latentlens.models.base import Encoding, LanguageModel, TextStates
from latentlens.models.loading import DTYPES, default_name, load_from_store, load_language_model

__all__ = [
    "ADAPTERS", "DTYPES", "Adapter", "Encoding", "LanguageModel", "LensHeads", "TextStates",
    "adapter_for_config", "heads_of",
    "default_name", "language_model_of", "load_from_store", "load_language_model",
    "supported_model_types",
]


def __getattr__(name: str) -> Any:
    if name == "ADAPTERS":  # every registered class (imports the families: computed, not a copy)
        from latentlens.architectures import all_families

        return all_families()
    raise AttributeError(f"module 'latentlens.models' has no attribute {name!r}")
