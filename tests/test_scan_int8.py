"""The int8 first pass for a few queries (latentlens.scan_int8): its bound holds for every row,
and the search it feeds returns the float32 top k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_scan import _assert_float32_answer, _near_ties, _write_leaf

from latentlens import scan_int8
from latentlens.errors import InputError
from latentlens.scan import ScanEngine

needs_kernel = pytest.mark.skipif(not scan_int8.kernel_exact(), reason="no exact dynamic int8 linear here")


def _dominant(n=6000, dim=96, nq=8, seed=0):
    """Rows like mid layers' hidden states: a few dimensions hundreds of times the others."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, dim))
    rows[:, [3, 40, 77]] += rng.choice([-1, 1], size=(n, 3)) * rng.uniform(50, 300, size=(n, 3))
    q = rows[rng.choice(n, nq, replace=False)] + rng.normal(size=(nq, dim))
    return rows.astype(np.float32), (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _ood(n=6000, dim=96, nq=8, seed=1):
    """Clustered rows, random queries: best cosines ~0.15-0.3, everything crowded near them."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(40, dim))[rng.integers(0, 40, n)] + 0.8 * rng.normal(size=(n, dim)) + 1.5
    q = rng.normal(size=(nq, dim))
    return rows.astype(np.float32), (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _adversarial(dim=96, seed=2):
    """Rows that maximise the codes' rounding (every coded value half a step off the grid) and
    their L1 (every value at the dimension's maximum), and one-hot rows, against queries
    along a single dimension, the all-equal diagonal and random ones."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(3000, dim))
    top = np.abs(base).max(0)
    half = (np.round(base / top * 127) + 0.5) / 127 * top * 0.999
    full = np.sign(rng.normal(size=(200, dim))) * top
    onehot = np.eye(dim) * 3.0
    rows = np.concatenate([base, half, full, onehot])
    q = np.concatenate([np.eye(dim)[[0, 5]], np.ones((1, dim)), rng.normal(size=(5, dim))])
    return rows.astype(np.float32), (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


CASES = {
    "random": lambda: _near_ties(n_far=6000, n_tied=0, dim=96, nq=8, seed=3),
    "near-ties": lambda: _near_ties(n_far=6000, n_tied=2400, dim=96, nq=8, seed=4),
    "near-ties-ood": lambda: _near_ties(n_far=6000, n_tied=2400, dim=96, nq=8, seed=5, level=0.15),
    "dominant": _dominant,
    "ood": _ood,
    "adversarial": _adversarial,
}


@needs_kernel
@pytest.mark.parametrize("case", sorted(CASES))
def test_bound_holds_for_every_row(tmp_path, case, monkeypatch):
    monkeypatch.setattr(scan_int8, "PACK_ROWS", 4096)  # several packed pieces
    rows, q = CASES[case]()
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    lower, upper = scan_int8.Int8Codes(leaf).interval(torch.from_numpy(q))
    v = v16.astype(np.float64)
    inv = leaf.inv_norms().astype(np.float64)
    exact64 = torch.from_numpy((q.astype(np.float64) @ v.T) * inv)
    exact32 = (torch.from_numpy(q) @ torch.from_numpy(v16).float().T) * torch.from_numpy(leaf.inv_norms())
    for exact in (exact64, exact32.double()):
        assert bool((exact >= lower.double()).all()) and bool((exact <= upper.double()).all())
    # and it is a bound worth having (not the whole leaf): well under 0.05 wide on average
    assert float((upper - lower).mean()) < 0.05


@needs_kernel
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [1, 10, 50])
def test_int8_search_equals_float32(tmp_path, case, k):
    rows, q = CASES[case]()
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    eng = ScanEngine(None, dtype="bfloat16", int8="1")
    sims, got = eng.search_leaf(leaf, torch.from_numpy(q), k)
    _assert_float32_answer(sims, got, v16, q, k)
    assert eng.int8_queries == len(q)  # the int8 pass answered every query
    assert eng.widened == 0


def test_disabled_or_big_batch_takes_the_other_paths(tmp_path):
    assert scan_int8.MAX_QUERIES < 40
    rows, q = _near_ties(n_far=6000, n_tied=2400, dim=96, nq=40, seed=6)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    for int8, qs in (("0", q[:8]), ("1", q)):  # off; on but more than MAX_QUERIES queries
        eng = ScanEngine(None, dtype="bfloat16", int8=int8)
        sims, got = eng.search_leaf(leaf, torch.from_numpy(qs), 10)
        _assert_float32_answer(sims, got, v16, qs, 10)
        assert eng.int8_queries == 0
        assert "int8" not in leaf._opened


@needs_kernel
def test_queries_over_the_cap_fall_back_exactly(tmp_path, monkeypatch):
    """All rows tied: every row is a candidate, over the cap; the bf16 paths answer, exactly."""
    monkeypatch.setattr("latentlens.scan.MAX_CANDIDATES", 100)
    rng = np.random.default_rng(7)
    rows = np.repeat(rng.normal(size=(1, 64)), 3000, axis=0) + rng.normal(size=(3000, 64)) * 1e-3
    q = rows[:4] / np.linalg.norm(rows[:4], axis=1, keepdims=True)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows.astype(np.float32))
    eng = ScanEngine(None, dtype="bfloat16", int8="1")
    sims, got = eng.search_leaf(leaf, torch.from_numpy(q.astype(np.float32)), 10)
    _assert_float32_answer(sims, got, v16, q.astype(np.float32), 10)
    assert eng.int8_queries == 0


def test_without_an_exact_kernel_the_path_is_off(tmp_path, monkeypatch):
    rows, q = _near_ties(n_far=3000, n_tied=600, dim=64, nq=4, seed=8)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    monkeypatch.setattr(scan_int8, "kernel_exact", lambda: False)
    eng = ScanEngine(None, dtype="bfloat16", int8="1")
    sims, got = eng.search_leaf(leaf, torch.from_numpy(q), 10)
    _assert_float32_answer(sims, got, v16, q, 10)
    assert eng.int8_queries == 0


def test_kernel_check_refuses_a_wrong_kernel(monkeypatch):
    """kernel_exact compares the kernel with exact integer products: one off by a step fails it."""
    real = scan_int8._linear
    scan_int8.kernel_exact.cache_clear()
    monkeypatch.setattr(scan_int8, "_linear", lambda b, p: real(b, p) + 1 / 64)
    try:
        assert scan_int8.kernel_exact() is False
    finally:
        monkeypatch.setattr(scan_int8, "_linear", real)
        scan_int8.kernel_exact.cache_clear()


def test_switch_spellings(monkeypatch):
    monkeypatch.delenv(scan_int8.ENV_SCAN_INT8, raising=False)
    assert scan_int8.enabled() is False
    monkeypatch.setenv(scan_int8.ENV_SCAN_INT8, "1")
    assert scan_int8.enabled() is True
    assert scan_int8.enabled("off") is False
    with pytest.raises(InputError, match="LLENS_SCAN_INT8"):
        scan_int8.enabled("maybe")
