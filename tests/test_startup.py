"""What a new process pays before its first query: imports and the schema check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from latentlens import migrate


def test_head_from_the_files_is_alembics_head():
    from alembic.script import ScriptDirectory

    assert migrate._head_from_files() == ScriptDirectory.from_config(migrate._config()).get_current_head()
    assert migrate.head_revision() == migrate._head_from_files()


@pytest.mark.parametrize("chain, head", [
    ({"a": None, "b": "a", "c": "b"}, "c"),
    ({"a": None, "b": "a", "c": "a"}, None),  # a branch: two heads, alembic decides
    ({"a": None, "b": "x"}, None),  # a down_revision that is no file's
])
def test_head_from_files_only_for_one_chain(tmp_path, monkeypatch, chain, head):
    (tmp_path / "versions").mkdir()
    for rev, down in chain.items():
        (tmp_path / "versions" / f"{rev}.py").write_text(
            f'"""m"""\nrevision = "{rev}"\ndown_revision = {json.dumps(down) if down else None}\n')
    monkeypatch.setattr(migrate, "files", lambda _pkg: tmp_path)
    assert migrate._head_from_files() == head


_PROBE = """
import json, sys
import numpy as np
from latentlens.query import Lens
lens = Lens.connect(sys.argv[1])
lens.neighbors(np.ones((2, 32), np.float32), "startup-model", k=3, mode="exact")
print(json.dumps(sorted(m for m in ("alembic", "sqlalchemy", "transformers") if m in sys.modules)))
"""


def test_a_vector_query_imports_no_migration_or_model_libraries(db_url, tmp_path):
    """Store.open imported alembic + sqlalchemy to read the schema head (~0.3-0.7 s of every connect)."""
    from _query_data import fill

    from latentlens.store import Store

    with Store.open(db_url) as s:
        fill(s, "startup-model", n_sentences=5, layers=(0, 1))
    out = subprocess.run([sys.executable, "-c", _PROBE, db_url], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LLENS_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
