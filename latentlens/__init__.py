"""latentlens: a shared, PostgreSQL + pgvector backed LatentLens.

Data flows one way: models -> ingest -> store <- query <- vlm/report.
Importing the package is cheap; torch is imported only by the modules that
run models (models, ingest, query's hidden-state helpers, vlm).
"""

from __future__ import annotations

__version__ = "0.1.0"

from latentlens.errors import LatentLensError

__all__ = ["LatentLensError", "__version__", "connect"]


def connect(database_url: str | None = None, **kwargs):
    """Open the query API (see latentlens.query.Lens) on the configured database."""
    from latentlens.query import Lens

    return Lens.connect(database_url, **kwargs)
