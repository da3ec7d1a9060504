"""Auto mode with an HNSW index: in-distribution queries use it, OOD ones fall back to the exact scan.

Needs a server whose pgvector can build HNSW (an AVX-512 CPU for the
embedded one, or LLENS_TEST_DATABASE_URL): skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from _query_data import fill
from conftest import requires_ann

from latentlens.query import Lens

pytestmark = requires_ann


@pytest.fixture(scope="module")
def indexed(db_url):
    from latentlens.store import Store

    with Store.open(db_url) as s:
        d = fill(s, "ann-model", n_sentences=200, dim=32, layers=(0, 4))
        s.build_index("ann-model")
        d["info"] = s.get_model("ann-model")
        return d


@pytest.fixture
def lens(db_url, tmp_path):
    with Lens.connect(db_url, cache_dir=tmp_path / "scan") as lens:
        yield lens


def keys(results):
    return [{(n.layer, n.sentence_id, n.position) for n in r.neighbours} for r in results]


def test_index_built(indexed):
    assert all(li.index_kind for li in indexed["info"].layers)


def test_in_distribution_uses_hnsw(lens, indexed):
    q = indexed["vectors"][4][:20] + 0.01
    got = lens.neighbors(q, "ann-model", layers=[4], k=5)
    assert lens.last_modes[4] == "ann"
    exact = lens.neighbors(q, "ann-model", layers=[4], k=5, exact=True)
    assert lens.last_modes[4] == "scan"
    rec = np.mean([len(a & b) / 5 for a, b in zip(keys(got), keys(exact), strict=True)])
    assert rec >= 0.9


def ood_queries(indexed, n: int = 20) -> np.ndarray:
    """Random directions with the stored clusters' subspace projected out: best cosine ~0.3."""
    stacked = np.concatenate([v - v.mean(0) for v in indexed["vectors"].values()] +
                             [v.mean(0, keepdims=True) for v in indexed["vectors"].values()])
    _, _, vt = np.linalg.svd(stacked, full_matrices=False)
    basis = vt[:28]
    q = np.random.default_rng(0).normal(size=(n, 32))
    return (q - (q @ basis.T) @ basis).astype(np.float32)


def test_ood_queries_really_are(tmp_path, db_url, indexed):
    with Lens.connect(db_url, cache_dir=tmp_path / "s") as lens:
        top = lens.neighbors(ood_queries(indexed), "ann-model", k=1, exact=True)
    assert max(r.neighbours[0].similarity for r in top) < 0.5


def test_out_of_distribution_falls_back_to_exact(lens, indexed):
    q = ood_queries(indexed)
    auto = lens.neighbors(q, "ann-model", k=10)
    assert set(lens.last_modes.values()) <= {"scan", "ann+scan"}
    assert "ann" not in lens.last_modes.values()
    exact = lens.neighbors(q, "ann-model", k=10, exact=True)
    assert keys(auto) == keys(exact)


def test_exact_false_never_scans(lens, indexed):
    q = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    res = lens.neighbors(q, "ann-model", k=5, exact=False, ef_search=100)
    assert set(lens.last_modes.values()) == {"ann"}
    assert all(len(r.neighbours) == 5 for r in res)
