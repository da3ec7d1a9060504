"""The exact scan engine and its leaf cache."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _query_data import brute_force, fill

from latentlens.errors import DimensionMismatch, InputError
from latentlens.scan import (
    LeafCache,
    ScanEngine,
    block_rows_for,
    normalize_queries,
    topk_blocks,
    version_dir,
)


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


@pytest.mark.parametrize("nq", [1, 8, 32, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_scores_either_orientation(nq, dtype):
    """A few queries multiply block @ q.T (the block streamed as it lies), more q @ block.T:
    both give the [Q, n] scores of q . row, within the matmul dtype's rounding."""
    from latentlens.scan import _block_scores

    rng = np.random.default_rng(nq)
    rows = rng.normal(size=(300, 64)).astype(np.float16)
    block = torch.from_numpy(rows).to(torch.bfloat16).view(torch.int16).numpy() if dtype == torch.bfloat16 else rows
    q = torch.nn.functional.normalize(torch.randn(nq, 64), dim=1).to(dtype)
    conv, scores = torch.empty((512, 64), dtype=dtype), torch.empty(nq * 512, dtype=dtype)
    s = _block_scores(q, block, conv, scores, 512)
    assert s.shape == (nq, 300) and s.dtype == dtype
    assert s.stride(1) == (nq if nq <= 32 else 1)  # few queries: the transposed view of [n, Q]
    want = q.float() @ torch.from_numpy(rows).float().T
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(s.float(), want, atol=tol, rtol=tol)


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


def test_engines_share_one_set_of_scratch_buffers(store, data, tmp_path, monkeypatch):
    """Two engines of one process (two Lenses: a bench, a server's requests) scan on the same
    scratch buffers, one scan at a time; a scan that finds them taken uses its engine's own,
    and every answer is the same."""
    from latentlens import scan

    monkeypatch.setattr(scan, "_SCRATCH", {})
    q = normalize_queries(np.random.default_rng(4).normal(size=(40, 32)), 32)
    a = ScanEngine(store, cache_root=tmp_path / "c", dtype="bfloat16")
    b = ScanEngine(store, cache_root=tmp_path / "c", dtype="bfloat16")
    ra = a.search(data["info"], 4, q, 5)
    held = dict(scan._SCRATCH)
    assert held and a._buffers == {}  # on the shared set, not its own
    rb = b.search(data["info"], 4, q, 5)
    assert b._buffers == {} and all(scan._SCRATCH[name] is t for name, t in held.items())
    with scan._SCRATCH_LOCK:  # another thread's scan holds them
        rc = b.search(data["info"], 4, q, 5)
    assert "scores" in b._buffers and all(scan._SCRATCH[name] is t for name, t in held.items())
    for r in (rb, rc):
        assert np.array_equal(r.sentence_id, ra.sentence_id) and np.array_equal(r.similarity, ra.similarity)


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
    assert again is leaf  # the same Leaf, its keys and maps opened once per process
    assert leaf.keys() is again.keys() and leaf._map() is again._map()
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
    assert list(cache._leaves) == [fresh.path]  # the old version's maps are let go
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


# --------------------------------------------------------------------------
# parity with float32 on near-ties (the bf16 scan's certificate)


def _write_leaf(path, rows: np.ndarray):
    """A cached leaf folder as LeafCache._fill writes it, without a database."""
    import json

    from latentlens.scan import CACHE_FORMAT, Leaf
    from latentlens.store.types import KEY_DTYPE

    path.mkdir(parents=True)
    v = rows.astype(np.float16)
    v.tofile(path / "vectors.f16")
    keys = np.zeros(len(v), KEY_DTYPE)
    keys["sentence_id"] = np.arange(len(v))
    keys["char_start"] = keys["char_end"] = -1  # no spans (NULL)
    np.save(path / "keys.npy", keys)
    np.save(path / "inv_norm.npy", (1 / np.linalg.norm(v.astype(np.float32), axis=1)).astype(np.float32))
    (path / "meta.json").write_text(json.dumps({"format": CACHE_FORMAT, "rows": len(v), "dim": v.shape[1],
                                                "row_count": len(v), "version": 1}))
    return Leaf(path, len(v), v.shape[1], len(v), 1), v


def _near_ties(n_far=20000, n_tied=3000, dim=64, nq=6, seed=0, level=0.9):
    """Rows whose cosines with each query crowd within ~2e-3 of each other at the top (far below
    bf16's rounding of the scores, ~4e-3 at 0.9), above a mass of unrelated rows (``level``:
    where the ties sit: 0.9 in distribution, 0.25 out of it, where the unrelated rows crowd too)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(nq, dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    far = rng.normal(size=(n_far, dim))
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    tied = []
    for qi in range(nq):
        noise = rng.normal(size=(n_tied // nq, dim))
        noise -= (noise @ q[qi])[:, None] * q[qi]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        c = level + rng.uniform(0, 2e-3, size=(len(noise), 1))
        tied.append(c * q[qi] + np.sqrt(1 - c**2) * noise)
    rows = np.concatenate([far, *tied])
    return rows[rng.permutation(len(rows))].astype(np.float32), q.astype(np.float32)


def _float32_top(v16: np.ndarray, q: np.ndarray, k: int):
    v = v16.astype(np.float32)
    sims = (q @ v.T) / np.linalg.norm(v, axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def _assert_float32_answer(sims, got, v16, q, k):
    want_s, want = _float32_top(v16, q, k + 1)
    for qi in range(len(q)):
        # the same rows in the same order, except where float32 itself ties (within 1e-6)
        for j in range(k):
            if got[qi, j] != want[qi, j]:
                assert abs(float(sims[qi, j]) - want_s[qi, j]) < 1e-6, (qi, j)
        np.testing.assert_allclose(sims[qi].numpy(), want_s[qi, :k], atol=1e-6)
    return want


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("read_only", [False, True])
def test_scan_equals_float32_on_near_ties(tmp_path, dtype, read_only, monkeypatch):
    rows, q = _near_ties()
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    if read_only:  # no vectors.bf16 can be written: blocks are converted as they are read
        def refuse(self):
            raise OSError("read-only")
        monkeypatch.setattr(type(leaf), "ensure_bf16", refuse)
    k = 10
    eng = ScanEngine(None, dtype=dtype, block_rows=4096, select="threshold")
    sims, got = eng.search_leaf(leaf, torch.from_numpy(q), k)
    want = _assert_float32_answer(sims, got, v16, q, k)
    # one pass certified every query: no rescan (the top-(k + margin) scan needed one for ~all)
    assert eng.widened == 0
    if dtype == "bfloat16":
        # the ties were real: bf16's own top-(k + margin) misses float32 answers
        qb = torch.from_numpy(q).bfloat16()
        approx = (qb @ torch.from_numpy(v16).bfloat16().T).float()
        plain = torch.topk(approx, k + eng.margin, dim=1).indices.numpy()
        assert any(not set(want[qi, :k]) <= set(plain[qi]) for qi in range(len(q)))


@pytest.mark.parametrize("nq", [576, 8])
@pytest.mark.parametrize("level", [0.9, 0.25])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_one_pass_equals_float32_on_near_ties(tmp_path, nq, level, k):
    """An image's patches or a few tokens, near-ties in and out of distribution: the float32
    answer, certified in one pass."""
    rows, q = _near_ties(n_far=8000, n_tied=nq * 60 if nq > 8 else 3000, dim=64, nq=nq, seed=nq + k, level=level)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    eng = ScanEngine(None, dtype="bfloat16", block_rows=8192, select="threshold")
    sims, got = eng.search_leaf(leaf, torch.from_numpy(q), k)
    _assert_float32_answer(sims, got, v16, q, k)
    assert eng.widened == 0


def test_auto_selection_takes_the_one_pass_on_dense_leaves(tmp_path):
    """auto: top-k first; the queries it leaves get the one pass, and so does every later
    batch on that leaf (no rescan any more); the answer is float32's throughout."""
    rows, q = _near_ties()
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    eng = ScanEngine(None, dtype="bfloat16", block_rows=4096)
    assert eng.select == "auto"
    qt = torch.from_numpy(q)
    sims, got = eng.search_leaf(leaf, qt, 10)
    _assert_float32_answer(sims, got, v16, q, 10)
    assert leaf.path in eng._dense and 0 < eng.widened <= len(q)  # one rescan at most, by the one pass
    before = eng.widened
    sims, got = eng.search_leaf(leaf, qt, 10)
    _assert_float32_answer(sims, got, v16, q, 10)
    assert eng.widened == before


def test_auto_selection_takes_the_one_pass_for_an_image(tmp_path):
    """auto: a batch of an image's size (> DIRECT_SELECT_QUERIES) goes straight to the one
    pass: no top-k scan and no rescan, even on a leaf it has not seen dense yet."""
    from latentlens.scan import DIRECT_SELECT_QUERIES

    nq = DIRECT_SELECT_QUERIES + 8
    rows, q = _near_ties(nq=nq)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    eng = ScanEngine(None, dtype="bfloat16", block_rows=4096)
    sims, got = eng.search_leaf(leaf, torch.from_numpy(q), 10)
    _assert_float32_answer(sims, got, v16, q, 10)
    assert eng.select == "auto" and eng.widened == 0 and leaf.path not in eng._dense


def test_topk_selection_still_available_and_exact(tmp_path, monkeypatch):
    """LLENS_SCAN_SELECT=topk: the top-(k + margin) path (rescans on near-ties), same answer."""
    from latentlens.scan import scan_select

    rows, q = _near_ties(n_far=6000, n_tied=1200)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    monkeypatch.setenv("LLENS_SCAN_SELECT", "topk")
    eng = ScanEngine(None, dtype="bfloat16", block_rows=4096)
    sims, got = eng.search_leaf(leaf, torch.from_numpy(q), 10)
    _assert_float32_answer(sims, got, v16, q, 10)
    assert eng.select == "topk" and eng.widened > 0
    with pytest.raises(InputError, match="unknown scan selection"):
        scan_select("sort")
    monkeypatch.delenv("LLENS_SCAN_SELECT")
    assert scan_select() == "auto"


def test_threshold_blocks_keeps_every_row_that_can_win():
    """Every row left out scored below the final threshold, which is what the certificate assumes."""
    from latentlens.scan import threshold_blocks

    rows, q = _near_ties(n_far=6000, n_tied=600, nq=6)
    v16 = rows.astype(np.float16)
    qt = torch.from_numpy(q)
    blocks = ((s, v16[s: s + 1024]) for s in range(0, len(v16), 1024))
    got = threshold_blocks(blocks, qt, 10, lambda kth: kth - 0.01, torch.float32, 1024)
    scores = (qt @ torch.from_numpy(v16).float().T)
    for qi in range(len(q)):
        kept = set(got.row[got.query == qi].tolist())
        must = set(torch.nonzero(scores[qi] >= got.threshold[qi]).flatten().tolist())
        assert must <= kept
        # the threshold is the running 10th best minus the slack, never above the true one
        assert float(got.threshold[qi]) <= float(torch.topk(scores[qi], 10).values[-1]) - 0.01 + 1e-6
    assert not got.over.any()
    assert torch.equal(got.query, torch.sort(got.query).values)


@pytest.mark.parametrize("n", [5, 33, 1057])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nq", [3, 40])  # one mask over the scores / chunk maxima
def test_threshold_blocks_rows_past_whole_chunks(n, dtype, nq):
    """A block whose rows are not whole 32-row chunks: the rows past them are kept too."""
    from latentlens.scan import threshold_blocks

    v = np.random.default_rng(n).normal(size=(n, 16)).astype(np.float16)
    q = torch.nn.functional.normalize(torch.randn(nq, 16), dim=1)
    got = threshold_blocks(((s, v[s: s + 256]) for s in range(0, n, 256)), q, 3, lambda kth: kth - 0.05, dtype, 256)
    scores = (q.to(dtype) @ torch.from_numpy(v).to(dtype).T).float()
    for qi in range(nq):
        kept = got.row[got.query == qi].tolist()
        assert set(torch.nonzero(scores[qi] >= got.threshold[qi]).flatten().tolist()) <= set(kept)
        assert len(set(kept)) == len(kept) and max(kept) < n


@pytest.mark.parametrize("nq", [4, 40])
def test_threshold_blocks_caps_candidates_per_query(nq):
    """Rows that all tie: each query stops collecting at the cap (memory stays Q x cap triples)."""
    from latentlens.scan import threshold_blocks

    v16 = np.tile(np.linspace(-1, 1, 32, dtype=np.float32), (5000, 1)).astype(np.float16)
    qt = torch.nn.functional.normalize(torch.randn(nq, 32), dim=1)
    qt[0] = torch.from_numpy(v16[0].astype(np.float32))
    blocks = ((s, v16[s: s + 1024]) for s in range(0, len(v16), 1024))
    got = threshold_blocks(blocks, qt, 10, lambda kth: kth, torch.bfloat16, 1024, cap=100)
    assert got.over.all() and len(got.query) == 0


def test_all_rows_tied_falls_back_and_stays_exact(tmp_path, monkeypatch):
    import latentlens.scan as scan

    monkeypatch.setattr(scan, "MAX_CANDIDATES", 64)
    rows = np.tile(np.linspace(-1, 1, 32, dtype=np.float32), (3000, 1))
    rows[::7] += 0.01
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    q = np.random.default_rng(3).normal(size=(5, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    eng = ScanEngine(None, dtype="bfloat16", block_rows=4096)
    sims, got = eng.search_leaf(leaf, torch.from_numpy(q), 10)
    want_s, _ = _float32_top(v16, q, 10)
    np.testing.assert_allclose(sims.numpy(), want_s, atol=1e-6)
    assert eng.widened >= 5  # every query over the cap: the top-k path answered (and rescanned)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_threshold_inverts_the_outside_bound(dtype):
    """A row scoring below _threshold(kth) has a cosine bound below the least the k rows at
    kth can have: the one pass certifies by construction."""
    from latentlens.scan import _error_terms, _outside_bound, _threshold

    q = torch.nn.functional.normalize(torch.randn(200, 96), dim=1)
    kth = torch.linspace(-0.9, 0.95, 200)
    for inv_range in ((1.0, 1.0), (0.999, 1.002), (0.5, 3.0)):
        t = _threshold(q, kth, dtype, 2.0 ** -9, inv_range)
        assert (t < kth).all()
        err, u_out = _error_terms(q, dtype, 2.0 ** -9)
        h = kth - u_out * kth.abs()
        least = torch.minimum(h * inv_range[0], h * inv_range[1]) - err
        assert (_outside_bound(q, t, dtype, 2.0 ** -9, inv_range) <= least).all()
    assert torch.isneginf(_threshold(q, torch.full((200,), -float("inf")), dtype, 0.0, (1.0, 1.0))).all()


def test_bf16_copy_is_the_rounded_rows(tmp_path):
    rows, _ = _near_ties(n_far=5000, n_tied=60)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows * 3.0)
    rho = leaf.ensure_bf16()
    b = torch.from_numpy(np.fromfile(leaf.bf16_path, dtype=np.int16).reshape(v16.shape)).view(torch.bfloat16)
    assert torch.equal(b, torch.from_numpy(v16).to(torch.bfloat16))
    assert 0 < rho <= 2.0 ** -8
    assert leaf.ensure_bf16() == rho  # kept: not rewritten


def test_resident_float16_path_equals_float32_on_near_ties(tmp_path):
    """The GPU path (leaf kept on the device as float16, float16 matmul) run on the CPU."""
    rows, q = _near_ties(n_far=6000, n_tied=1200)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    eng = ScanEngine(None, device="cpu")
    eng._resident_scan = True
    sims, got = eng.search_leaf(leaf, torch.from_numpy(q), 10)
    want_s, want = _float32_top(v16, q, 10)
    np.testing.assert_allclose(sims.numpy(), want_s, atol=1e-6)
    for qi in range(len(q)):
        for j in range(10):
            if got[qi, j] != want[qi, j]:
                assert abs(float(sims[qi, j]) - want_s[qi, j]) < 1e-6
    assert list(eng._resident) == [leaf.path]


def test_scan_device_choice(monkeypatch):
    from latentlens.scan import scan_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scan_device("auto").type == "cpu"
    assert scan_device(None).type == "cpu"
    with pytest.raises(InputError, match="no CUDA device"):
        scan_device("cuda")
    with pytest.raises(InputError, match="unknown scan device"):
        scan_device("gpu0")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_measure_scan_runs_in_the_scan_dtype(monkeypatch, dtype):
    from latentlens.scan import measure_scan

    monkeypatch.setenv("LLENS_SCAN_DTYPE", dtype)
    c = measure_scan(dim=64, rows=8192, repeats=1)
    assert c["read"] > 0 and c["mul"] > 0


def test_dense_leaf_starts_with_the_candidates_that_certified(tmp_path, monkeypatch):
    """The top-k path (queries over the one pass's candidate cap) learns how wide to start."""
    import latentlens.scan as scan

    monkeypatch.setattr(scan, "MAX_CANDIDATES", 16)  # 500 near-ties a query: all over the cap
    rows, q = _near_ties()
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    eng = ScanEngine(None, dtype="bfloat16", block_rows=4096, select="threshold")
    qt = torch.from_numpy(q)
    first = eng.search_leaf(leaf, qt, 10)
    assert eng.widened > len(q) and eng._keep_hint[leaf.path] > 10 + eng.margin
    before = eng.widened
    again = eng.search_leaf(leaf, qt, 10)
    assert eng.widened - before < before  # fewer (here: no) second passes
    assert torch.equal(first[0], again[0])
    want_s, _ = _float32_top(v16, q, 10)
    np.testing.assert_allclose(again[0].numpy(), want_s, atol=1e-6)


@pytest.mark.parametrize("select", ["threshold", "topk"])
def test_dense_and_grouped_reranks_agree(tmp_path, monkeypatch, select):
    """A few queries re-rank by one matmul of their distinct rows (_dense_cosines), an image's
    patches by a sampled matmul (_pair_dots): on near-ties both give the float32 answer, the same
    rows (two whose cosines differ in the last bits may swap places)."""
    from latentlens import scan as scan_mod

    rows, q = _near_ties(n_far=6000, n_tied=1200)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    qt = torch.from_numpy(q)
    got = {}
    for dense in (True, False):
        calls = []
        monkeypatch.setattr(scan_mod, "_dense_rerank", lambda *a, dense=dense, calls=calls: calls.append(a) or dense)
        eng = ScanEngine(None, dtype="bfloat16", block_rows=4096, select=select)
        got[dense] = eng.search_leaf(leaf, qt, 10)
        assert calls  # the re-rank asked which way to go
        _assert_float32_answer(*got[dense], v16, q, 10)
    # the same rows; two whose cosines differ in the last float32 bits may swap places (the two
    # kernels sum in different orders)
    assert [sorted(r) for r in got[True][1].tolist()] == [sorted(r) for r in got[False][1].tolist()]
    torch.testing.assert_close(got[True][0], got[False][0], atol=1e-6, rtol=0)


def test_one_pass_rerank_in_slices_of_distinct_rows(tmp_path, monkeypatch):
    """An image's re-rank reads its distinct candidate rows RERANK_BYTES at a time: with slices
    of a few rows, the float32 answer on near-ties, as in one slice."""
    from latentlens import scan as scan_mod

    rows, q = _near_ties(n_far=6000, n_tied=1200, nq=40)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    qt = torch.from_numpy(q)
    monkeypatch.setattr(scan_mod, "_dense_rerank", lambda *a: False)
    whole = ScanEngine(None, dtype="bfloat16", block_rows=4096, select="threshold").search_leaf(leaf, qt, 10)
    monkeypatch.setattr(scan_mod, "RERANK_BYTES", 7 * 64 * 4)  # 7 rows a slice
    sliced = ScanEngine(None, dtype="bfloat16", block_rows=4096, select="threshold").search_leaf(leaf, qt, 10)
    _assert_float32_answer(*sliced, v16, q, 10)
    assert torch.equal(sliced[1], whole[1])
    torch.testing.assert_close(sliced[0], whole[0], atol=1e-6, rtol=0)


def test_pair_dots_are_the_pairs_float32_dots():
    """_pair_dots: each pair's dot, whatever the pairs' rows (repeated, unsorted within a query)
    and with queries that have no pairs (first, middle, last)."""
    from latentlens.scan import _pair_dots

    g = torch.Generator().manual_seed(3)
    vecs = torch.randn(50, 24, generator=g).half()
    queries = torch.randn(7, 24, generator=g)
    qidx = torch.tensor([1, 1, 1, 2, 2, 4, 4, 4, 4, 5])
    slot = torch.tensor([9, 3, 9, 0, 49, 7, 2, 7, 30, 11])
    want = (vecs.double()[slot] * queries.double()[qidx]).sum(1)
    got = _pair_dots(vecs, queries, slot, qidx)
    assert got.dtype == torch.float32 and got.shape == (10,)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert len(_pair_dots(vecs, queries, slot[:0], qidx[:0])) == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_blocks_int16_chunk_maxima_change_nothing(seed, monkeypatch):
    """bfloat16 chunk maxima read as int16 bit patterns (exact where positive) keep exactly the
    rows, scores and thresholds of the exact maxima: queries near, across (cosines ~0: thresholds
    <= 0) and opposite (every score negative) the rows, in one batch of an image's size."""
    import latentlens.scan as scan
    from latentlens.scan import threshold_blocks

    rng = np.random.default_rng(seed)
    mean = rng.normal(size=32)
    mean /= np.linalg.norm(mean)
    rows = mean + 0.1 * rng.normal(size=(5000, 32))  # every row leans one way
    v16 = rows.astype(np.float16)
    q = np.concatenate([mean + 0.5 * rng.normal(size=(20, 32)), -mean + 0.1 * rng.normal(size=(20, 32)),
                        rng.normal(size=(20, 32))])
    ortho = q[40:] - (q[40:] @ mean)[:, None] * mean  # across: cosines around 0
    q[40:] = ortho
    qt = torch.nn.functional.normalize(torch.from_numpy(q.astype(np.float32)), dim=1)

    def run():
        blocks = ((s, v16[s: s + 1024]) for s in range(0, len(v16), 1024))
        return threshold_blocks(blocks, qt, 10, lambda kth: kth - 0.01, torch.bfloat16, 1024)

    got = run()
    scores = (qt.bfloat16() @ torch.from_numpy(v16).bfloat16().T).float()
    assert (scores[20:40] < 0).all() and (got.threshold <= 0).any() and (got.threshold > 0).any()
    monkeypatch.setattr(scan, "_chunk_max", lambda chunks: chunks.amax(dim=0))
    want = run()
    for name in ("query", "row", "score", "threshold", "over"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for qi in range(len(q)):  # and nothing that can win is left out
        kept = set(got.row[got.query == qi].tolist())
        assert set(torch.nonzero(scores[qi] >= got.threshold[qi]).flatten().tolist()) <= kept


def test_chunk_max_int16_is_exact_where_positive():
    from latentlens.scan import _chunk_max

    x = torch.randn(32, 50, 7).bfloat16()  # [rows of a chunk, chunks, queries]
    x[:, :, 0] = -x[:, :, 0].abs()  # a query whose chunks are all negative
    got, want = _chunk_max(x).float(), x.amax(dim=0).float()
    pos = want > 0
    assert torch.equal(got[pos], want[pos]) and pos.sum() > 100
    assert (got[~pos] <= want[~pos]).all()  # elsewhere a row's score, never above the maximum
    assert torch.equal(_chunk_max(x.float()), x.float().amax(dim=0))


# --------------------------------------------------------------------------
# a few queries: leaves scanned side by side (ScanEngine.search_many)


def _leaves_for_many(tmp_path, n_leaves: int, nq: int, level: float, seed: int):
    """``n_leaves`` near-tie leaves laid out as LeafCache finds them, and a stand-in ModelInfo."""
    root = tmp_path / "cache"
    layers, v16s, q = [], {}, None
    for layer in range(n_leaves):
        rows, qq = _near_ties(n_far=6000, n_tied=1600, dim=64, nq=nq, seed=seed, level=level)
        if q is None:
            q = qq
        else:  # the same queries, the ties around them rotated away per leaf
            rows = rows[np.random.default_rng(layer).permutation(len(rows))]
        _, v16s[layer] = _write_leaf(root / "inst" / "7" / str(layer) / version_dir(len(rows), 1), rows)
        layers.append(SimpleNamespace(layer=layer, row_count=len(rows), version=1))
    by = {li.layer: li for li in layers}
    info = SimpleNamespace(id=7, name="m", hidden_size=64, layer=by.__getitem__)
    return root, info, v16s, q


@pytest.mark.parametrize("level", [0.9, 0.25])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_search_many_equals_float32_on_near_ties(tmp_path, monkeypatch, level, k):
    """8 queries over 3 leaves, each leaf on a worker thread with one torch thread: every
    leaf's answer is float32's (near-ties in and out of distribution), the leaf by leaf scan's."""
    import threading

    from latentlens import scan as scan_mod

    root, info, v16s, q = _leaves_for_many(tmp_path, 3, 8, level, seed=k)
    monkeypatch.setattr(scan_mod, "_cores", lambda: 2)  # side by side even on one core
    monkeypatch.setenv("LLENS_SCAN_SIDE_BY_SIDE", "1")
    eng = ScanEngine(None, dtype="bfloat16", cache_root=root)
    eng.cache._instance = "inst"
    seen = []
    search_leaf = eng.search_leaf

    def spy(*a, **kw):
        seen.append(threading.current_thread().name)
        return search_leaf(*a, **kw)

    monkeypatch.setattr(eng, "search_leaf", spy)
    versions = {x: (len(v16s[x]), 1) for x in v16s}
    got = eng.search_many(info, [0, 1, 2], q, k, versions=versions)
    assert list(got) == [0, 1, 2] and len(seen) == 3 and all(n.startswith("llens-leaf") for n in seen)
    one = ScanEngine(None, dtype="bfloat16", cache_root=root)
    one.cache._instance = "inst"
    for layer, res in got.items():
        sims, rows = one.search_leaf(one.cache.get(info, layer, version=versions[layer]), torch.from_numpy(q), k)
        _assert_float32_answer(torch.from_numpy(res.similarity), rows.numpy(), v16s[layer], q, k)
        np.testing.assert_array_equal(res.sentence_id, rows.numpy())  # _write_leaf: sentence id = row
        np.testing.assert_array_equal(res.similarity, sims.numpy())


def test_search_many_big_batches_and_one_leaf_stay_on_the_calling_thread(tmp_path, monkeypatch):
    """An image's patches (their matmuls split well over torch's threads) and a single leaf
    are scanned as before; the answer is the same either way."""
    import threading

    from latentlens import scan as scan_mod

    root, info, v16s, q8 = _leaves_for_many(tmp_path, 2, 8, 0.25, seed=3)
    monkeypatch.setattr(scan_mod, "_cores", lambda: 2)
    monkeypatch.setenv("LLENS_SCAN_SIDE_BY_SIDE", "1")
    eng = ScanEngine(None, dtype="bfloat16", cache_root=root)
    eng.cache._instance = "inst"
    assert eng.leaf_workers(8, 2) == 2 and eng.leaf_workers(8, 1) == 1
    assert eng.leaf_workers(64, 2) == 1  # more than PARALLEL_LEAF_QUERIES
    monkeypatch.delenv("LLENS_SCAN_SIDE_BY_SIDE")
    assert eng.leaf_workers(8, 2) == 1  # the default: leaf by leaf on torch's threads
    monkeypatch.setenv("LLENS_SCAN_SIDE_BY_SIDE", "1")
    names = []
    search_leaf = eng.search_leaf
    monkeypatch.setattr(eng, "search_leaf", lambda *a, **kw: names.append(threading.current_thread().name)
                        or search_leaf(*a, **kw))
    versions = {x: (len(v16s[x]), 1) for x in v16s}
    q64 = np.concatenate([q8] * 8)
    got = eng.search_many(info, [0, 1], q64, 10, versions=versions)
    single = eng.search_many(info, [1], q8, 10, versions=versions)
    assert names == [threading.current_thread().name] * 3
    np.testing.assert_array_equal(got[1].sentence_id[:8], single[1].sentence_id)


def test_leaf_pool_keeps_torch_threads_for_everyone_else():
    """The pool's workers run torch on one thread each; the caller and threads started later
    keep torch's count (torch.set_num_threads(1) in a worker alone set it for every new thread)."""
    import threading

    from latentlens.scan import _leaf_pool

    before = torch.get_num_threads()
    pool = _leaf_pool(2)

    def threads() -> int:
        torch.ones(4).sum()  # torch sets a thread's count up on its first op
        return torch.get_num_threads()

    assert [f.result() for f in [pool.submit(threads) for _ in range(4)]] == [1] * 4
    assert torch.get_num_threads() == before
    seen = []
    t = threading.Thread(target=lambda: seen.append(threads()))
    t.start()
    t.join()
    assert seen == [before]
    assert _leaf_pool(2) is pool  # made once


def test_leaf_pools_of_other_sizes_leave_a_pool_in_use_alone():
    """A thread whose torch count differs gets a pool of its own: the pool another thread
    was handed stays open (a new size used to shut it down: its submit raised RuntimeError)."""
    from latentlens.scan import _leaf_pool

    two = _leaf_pool(2)
    one = _leaf_pool(1)
    assert one is not two and _leaf_pool(2) is two
    assert two.submit(lambda: 7).result() == 7


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_blocks_wide_rows_orientation_changes_nothing(seed, monkeypatch):
    """Past ROWS_FIRST_MAX_DIM an image's batch multiplies q @ block.T and reads its [Q, n]
    scores as [n, Q]: the same rows, scores, thresholds and order as block @ q.T (queries near,
    across and opposite the rows, a last block with rows past whole chunks)."""
    import latentlens.scan as scan
    from latentlens.scan import threshold_blocks

    rng = np.random.default_rng(seed)
    mean = rng.normal(size=48)
    mean /= np.linalg.norm(mean)
    v16 = (mean + 0.1 * rng.normal(size=(5000, 48))).astype(np.float16)
    q = np.concatenate([mean + 0.5 * rng.normal(size=(20, 48)), -mean + 0.1 * rng.normal(size=(20, 48)),
                        rng.normal(size=(20, 48))])
    qt = torch.nn.functional.normalize(torch.from_numpy(q.astype(np.float32)), dim=1)

    def run(dtype):
        blocks = ((s, v16[s: s + 1024]) for s in range(0, len(v16), 1024))  # 5000: a ragged last block
        return threshold_blocks(blocks, qt, 10, lambda kth: kth - 0.01, dtype, 1024)

    for dtype in (torch.bfloat16, torch.float32):
        want = run(dtype)
        monkeypatch.setattr(scan, "ROWS_FIRST_MAX_DIM", 16)
        got = run(dtype)
        monkeypatch.undo()
        for name in ("query", "row", "score", "threshold", "over"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (dtype, name)


@pytest.mark.parametrize("scan_dtype", [torch.float32, torch.bfloat16])
def test_sample_test_is_each_querys_best_cosine_against_the_sample(scan_dtype):
    """Searcher._sample_max_many (the policy's distribution test), several layers in one op:
    the best cosine of each query with each leaf's unit-normed sample; samples of other
    sizes and an empty one answered apart. In the scan's dtype (bfloat16: rounded, < 0.01)."""
    from latentlens.search import Searcher

    rng = np.random.default_rng(3)
    samples = {layer: (rng.normal(size=(n, 16)) * rng.uniform(0.1, 50, size=(n, 1))).astype(np.float32)
               for layer, n in ((0, 300), (1, 300), (2, 120), (3, 0))}
    store = SimpleNamespace(sample_layer=lambda info, layer, rows: samples[layer].reshape(-1, 16))
    info = SimpleNamespace(id=1, layer=lambda x: SimpleNamespace(row_count=300, version=1))
    q = rng.normal(size=(9, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    searcher = Searcher(store)
    searcher._scan = SimpleNamespace(dtype=scan_dtype)
    tol = 1e-5 if scan_dtype == torch.float32 else 1e-2
    for _ in range(2):  # the second time from the kept stack
        got = searcher._sample_max_many(info, [0, 1, 2, 3], q)
        assert sorted(got) == [0, 1, 2, 3]
        for layer in (0, 1, 2):
            s = samples[layer]
            want = (q.astype(np.float64) @ (s / np.linalg.norm(s, axis=1, keepdims=True)).T).max(axis=1)
            assert got[layer].shape == (9,) and got[layer].dtype == np.float32
            np.testing.assert_allclose(got[layer], want, atol=tol)
        assert (got[3] == -1).all()


def test_aligned_writer_writes_whole_aligned_pieces(tmp_path, monkeypatch):
    """A leaf's files go out in whole WRITE_ALIGN pieces at aligned offsets (the page cache then
    holds them in large folios), the tail last, and the bytes are those written."""
    from latentlens import scan as scan_mod

    monkeypatch.setattr(scan_mod, "WRITE_ALIGN", 64)
    calls = []

    class Recorder(io.BytesIO):
        def write(self, b):
            calls.append((self.tell(), len(memoryview(b))))
            return super().write(b)

    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 255, size=n, dtype=np.uint8) for n in (10, 100, 3, 64, 128, 1, 200, 7)]
    pieces.append(rng.standard_normal((5, 3)).astype(np.float16))  # a 2-D array, not bytes
    pieces.append(np.zeros((0, 3), dtype=np.int16))  # an empty 2-D chunk
    out = Recorder()
    w = scan_mod._AlignedWriter(out)
    for p in pieces:
        w.write(p.data if p.ndim == 1 else p)
    w.close()
    assert out.getvalue() == b"".join(p.tobytes() for p in pieces)
    *body, tail = calls
    assert all(at % 64 == 0 and n % 64 == 0 and n > 0 for at, n in body)
    assert tail[0] % 64 == 0 and 0 < tail[1] < 64


def test_aligned_writer_completes_short_writes(monkeypatch):
    """A raw file's write may take fewer bytes than given (Linux: 2 GiB - 4 KiB a call at most):
    the writer writes the rest, and refuses a file that takes nothing."""
    from latentlens import scan as scan_mod

    monkeypatch.setattr(scan_mod, "WRITE_ALIGN", 64)

    class Short(io.BytesIO):
        def write(self, b):
            return super().write(bytes(memoryview(b)[:10]))  # at most 10 bytes a call

    data = np.arange(300, dtype=np.uint8)
    out = Short()
    w = scan_mod._AlignedWriter(out)
    w.write(data[:100])
    w.write(data[100:])
    w.close()
    assert out.getvalue() == data.tobytes()

    class Full(io.BytesIO):
        def write(self, b):
            return 0

    with pytest.raises(OSError, match="wrote nothing"):
        scan_mod._AlignedWriter(Full()).write(data)


def test_bf16_copy_is_written_in_aligned_pieces(tmp_path, monkeypatch):
    """ensure_bf16 writes its copy through the aligned writer, pieces smaller than the rows'
    blocks included: the file holds every row rounded to bfloat16, in order."""
    from latentlens import scan as scan_mod

    monkeypatch.setattr(scan_mod, "WRITE_ALIGN", 96)  # not a multiple of a row (16 x 2 bytes)
    seen = []
    real = scan_mod._aligned

    def spy(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(scan_mod, "_aligned", spy)
    rows = np.random.default_rng(1).standard_normal((301, 16)).astype(np.float32)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    leaf.ensure_bf16()
    assert any(name.startswith(".bf16-") for name in seen)
    want = torch.from_numpy(v16.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(np.fromfile(leaf.bf16_path, dtype=np.int16).reshape(want.shape), want)
