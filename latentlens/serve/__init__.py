"""`llens serve`: the team's web app over the store (FastAPI + Jinja2, run by uvicorn).

    from latentlens.serve import create_app
    app = create_app()              # the configured database; see docs/serve.md

Modules: ``app`` (the factory, errors), ``perimeter`` (what every request
passes first: Host allow-list, access token, cross-site writes, counted
uploads), ``api`` (JSON under /api/), ``pages`` (HTML), ``work`` (what both
call in the library), ``deps`` (sign-in and the per-request connection),
``state`` (what the process shares: loaded models, activities, drafts). Needs the ``serve``
extra: ``pip install 'latentlens-db[serve]'``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def create_app(*args: Any, **kwargs: Any):
    """See latentlens.serve.app.create_app (imported here lazily: FastAPI loads only when used)."""
    from latentlens.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
