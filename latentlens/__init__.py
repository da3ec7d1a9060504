"""latentlens: a shared, PostgreSQL + pgvector backed LatentLens.

Data flows one way: models -> ingest -> store <- query <- vlm/report.
Importing the package is cheap. torch (the ``models`` extra) is imported
only where models run (models, ingest, text and image queries, vlm) and by
the exact local scan (latentlens.scan); a vector query answered by HNSW, or
by PostgreSQL where torch is not installed, never imports it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from latentlens.errors import LatentLensError

__all__ = ["LatentLensError", "__version__", "connect"]


def connect(database_url: str | None = None, **kwargs):
    """Open the query API (see latentlens.query.Lens) on the configured database."""
    from latentlens.query import Lens

    return Lens.connect(database_url, **kwargs)
