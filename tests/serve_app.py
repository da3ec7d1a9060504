"""The web app as in-process tests build it: TestClient sends ``Host: testserver``."""

from __future__ import annotations

from typing import Any

TEST_HOSTS = ["testserver"]  # the test client's Host


def make_app(db_url: str, **kw: Any) -> Any:
    """The app without sign-in and without its token (tested on their own in test_serve_perimeter.py);
    ``kw`` overrides (e.g. ``auth=True`` for a team server's sign-in)."""
    from latentlens.serve import create_app

    return create_app(db_url, **{"auth": False, "token": None, "allow_hosts": TEST_HOSTS, **kw})
