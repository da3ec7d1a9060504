"""Exceptions raised by the library.

Every user mistake (unknown model, wrong dimension, unreachable database, …)
is a `LatentLensError` subclass with a one-line message; the CLI turns these
into `Error: …` and a non-zero exit, never a traceback. Exit codes: 2 bad
input (what the user named or gave cannot be used), 3 database unreachable,
4 schema out of date, 5 permission denied (the database role may not do
that), 1 anything else.
"""

from __future__ import annotations

#: what the 'models' extra installs (a SQL-only install lacks them), and how to get them
MODEL_PACKAGES = frozenset({"torch", "transformers", "safetensors", "gguf", "accelerate", "PIL"})
MODELS_EXTRA = "pip install torch==2.13.0 'latentlens-db[models]'"


def missing_model_package(e: ModuleNotFoundError) -> bool:
    """Whether an import failed for want of the 'models' extra (not a bug elsewhere)."""
    return (e.name or "").split(".")[0] in MODEL_PACKAGES


class LatentLensError(Exception):
    """Base class: the message is meant for the user, on one line."""

    exit_code = 1


class ConfigError(LatentLensError):
    """Bad settings: an invalid URL, data dir or option."""


class DatabaseUnavailable(LatentLensError):
    """The database cannot be reached or the embedded server cannot start."""

    exit_code = 3


class SchemaOutOfDate(LatentLensError):
    """The database schema is missing or older than this version of latentlens."""

    exit_code = 4


class UnknownModel(LatentLensError):
    """No model of that name is registered in the store."""

    exit_code = 2


class UnknownLayer(LatentLensError):
    """The model has no stored embeddings for that layer."""

    exit_code = 2


class UnknownAtlas(LatentLensError):
    """No atlas of that name is stored (`llens atlas build` makes one)."""

    exit_code = 2


class UnknownCorpus(LatentLensError):
    """No corpus of that name is registered in the store."""

    exit_code = 2


class DimensionMismatch(LatentLensError):
    """A vector's size differs from the model's hidden size."""

    exit_code = 2


class ModelMismatch(LatentLensError):
    """A model re-registered under a name with different shape or layers."""

    exit_code = 2


class EmptyResult(LatentLensError):
    """The query has nothing to search (e.g. a model with no rows yet)."""

    exit_code = 2


class InputError(LatentLensError):
    """A file or argument the user gave cannot be used."""

    exit_code = 2


class IndexUnsupported(LatentLensError):
    """The server cannot build or use ANN indexes (see db.embedded_ann_supported)."""


class UnsupportedModel(LatentLensError):
    """The model's architecture has no adapter (the message lists the supported ones)."""

    exit_code = 2


class PermissionDenied(LatentLensError):
    """The database role may not do this (a reader writing, a writer deleting another's work)."""

    exit_code = 5


class NotDistributed(LatentLensError):
    """The server cannot distribute the store (it has no Citus extension)."""

    exit_code = 2
