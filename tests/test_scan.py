"""The exact scan engine and its leaf cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _query_data import brute_force, fill

from latentlens.errors import DimensionMismatch, InputError
from latentlens.scan import LeafCache, ScanEngine, block_rows_for, normalize_queries, topk_blocks


@pytest.fixture(scope="module")
def data(db_url):
    from latentlens.store import Store

    with Store.open(db_url) as s:
        return fill(s, "scan-model", n_sentences=80)


def test_topk_blocks_matches_full_topk():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(1000, 16)).astype(np.float16)
    q = torch.nn.functional.normalize(torch.randn(7, 16), dim=1)
    blocks = ((s, rows[s: s + 128]) for s in range(0, 1000, 128))
    v, i = topk_blocks(blocks, q, 10, block_rows=128)
    full = q @ torch.from_numpy(rows).float().T
    fv, fi = torch.topk(full, 10, dim=1)
    assert torch.equal(i, fi)
    assert torch.allclose(v, fv)


def test_block_rows_bounded():
    assert block_rows_for(1) == 65536
    assert block_rows_for(576) <= 65536
    assert block_rows_for(10**6) == 4096


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scan_is_exact(store, data, tmp_path, dtype):
    eng = ScanEngine(store, cache_root=tmp_path / "c", dtype=dtype, block_rows=64)
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    q = normalize_queries(queries, 32)
    res = eng.search(data["info"], 4, q, 5)
    want = brute_force({4: data["vectors"][4]}, queries, 5)
    for qi in range(len(queries)):
        rows = [r for _, _, r in want[qi]]
        assert list(res.sentence_id[qi]) == list(data["sentence_id"][rows])
        assert list(res.position[qi]) == list(data["position"][rows])
        np.testing.assert_allclose(res.similarity[qi], [s for s, _, _ in want[qi]], atol=2e-3)


def test_scan_agrees_with_sql_exact(store, data, tmp_path):
    eng = ScanEngine(store, cache_root=tmp_path / "c")
    q = normalize_queries(np.random.default_rng(3).normal(size=(8, 32)), 32)
    a = eng.search(data["info"], 8, q, 10)
    b = store.knn(data["info"], 8, q.numpy(), 10, exact=True)
    overlap = np.mean([len(set(zip(a.sentence_id[i], a.position[i], strict=True))
                           & set(zip(b.sentence_id[i], b.position[i], strict=True))) / 10 for i in range(8)])
    assert overlap >= 0.95
    np.testing.assert_allclose(a.similarity[:, 0], b.similarity[:, 0], atol=3e-3)


def test_cache_filled_once_and_invalidated_on_write(store, tmp_path):
    d = fill(store, "scan-versioned", n_sentences=10, seed=5)
    cache = LeafCache(store, tmp_path / "c")
    leaf = cache.get(d["info"], 0)
    assert leaf.rows == d["info"].layer(0).row_count
    again = cache.get(d["info"], 0)
    assert again.path == leaf.path
    # a second batch of rows changes (row_count, version): the cache is refilled
    from latentlens.store import EmbeddingBatch

    n = 3
    info = store.get_model("scan-versioned")
    sid = store.add_sentences(store.get_corpus("corpus-scan-versioned"), ["new one here"])[0]
    store.write_embeddings(info, EmbeddingBatch(
        np.full(n, sid, np.int64), np.arange(1, n + 1, dtype=np.int32), np.zeros(n, np.int32),
        np.full(n, -1, np.int32), np.full(n, -1, np.int32), np.arange(n, dtype=np.int64) + 999_000,
        {layer: np.ones((n, 32), np.float32) for layer in info.layer_numbers},
    ))
    fresh = cache.get(store.get_model("scan-versioned"), 0)
    assert fresh.path != leaf.path
    assert fresh.rows == leaf.rows + n
    assert not leaf.path.exists()  # stale version pruned
    keys = fresh.keys()
    assert (keys["sentence_id"] == sid).sum() == n


def test_stream_fallback_without_cache(store, data):
    eng = ScanEngine(store, use_cache=False)
    q = normalize_queries(np.asarray(data["vectors"][0][:4]), 32)
    res = eng.search(data["info"], 0, q, 3)
    # each stored vector is its own nearest neighbour
    assert list(res.sentence_id[:, 0]) == list(data["sentence_id"][:4])
    assert list(res.position[:, 0]) == list(data["position"][:4])
    assert np.all(res.similarity[:, 0] > 0.999)


def test_k_larger_than_leaf_pads(store, tmp_path):
    d = fill(store, "scan-tiny", n_sentences=1, seed=9)
    n = d["info"].layer(0).row_count
    eng = ScanEngine(store, cache_root=tmp_path / "c")
    res = eng.search(d["info"], 0, normalize_queries(np.ones(32), 32), n + 4)
    assert np.isfinite(res.similarity[0, :n]).all()
    assert np.isneginf(res.similarity[0, n:]).all()
    assert (res.sentence_id[0, n:] == -1).all()


def test_normalize_queries_errors():
    with pytest.raises(DimensionMismatch, match="hidden size 32"):
        normalize_queries(np.ones((2, 31)), 32, "m")
    with pytest.raises(InputError, match="NaN"):
        normalize_queries(np.full(32, np.nan), 32)
    assert normalize_queries(torch.ones(32, dtype=torch.float64) * 1e4, 32).shape == (1, 32)
