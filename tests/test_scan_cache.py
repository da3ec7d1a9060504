"""The leaf cache's cold path: one-pass fills, parallel copies, interrupted and racing fills."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _query_data import fill

from latentlens import scan
from latentlens.scan import LeafCache, ScanEngine, bf16_bits
from latentlens.store import Store


@pytest.fixture(scope="module")
def data(db_url):
    with Store.open(db_url) as s:
        return fill(s, "cache-model", n_sentences=80, dim=48, layers=(0, 2, 4, 6))


def _leaf_bytes(leaf) -> dict[str, bytes]:
    names = ["vectors.f16", "keys.npy", "inv_norm.npy"] + (["vectors.bf16"] if leaf.bf16_path.exists() else [])
    return {n: (leaf.path / n).read_bytes() for n in names}


def _stored(store, info, layer) -> tuple[np.ndarray, np.ndarray]:
    chunks = list(store.iter_layer(info, layer))
    return np.concatenate([k for k, _ in chunks]), np.concatenate([v for _, v in chunks])


def test_bf16_bits_round_to_nearest_even_as_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=5000) * 10.0 ** rng.integers(-6, 5, 5000),
                        [0.0, -0.0, 1.0, 65504.0, -65504.0, 6e-8]]).astype(np.float32)
    # exact halfway cases (lower 16 bits 0x8000), both parities of the kept bit
    halfway = ((rng.integers(0, 2**15, 200, dtype=np.uint32) << 16) | 0x8000).view(np.float32)
    x = np.concatenate([x, halfway[np.isfinite(halfway)]])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16_bits(x), want)


def test_fill_writes_the_bf16_copy_in_the_same_pass(store, data, tmp_path, monkeypatch):
    info = data["info"]
    leaf = LeafCache(store, tmp_path / "c").get(info, 2, bf16=True)
    _keys, v16 = _stored(store, info, 2)
    got = np.fromfile(leaf.bf16_path, dtype=np.uint16).reshape(v16.shape)
    assert np.array_equal(got, torch.from_numpy(v16).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    rho = json.loads((leaf.path / "bf16.json").read_text())["rho"]
    # the same rho as ensure_bf16's own pass over a leaf copied without it
    plain = LeafCache(store, tmp_path / "plain").get(info, 2)
    assert not plain.bf16_path.exists()
    assert rho == pytest.approx(plain.ensure_bf16(), rel=1e-5)
    assert 0 < rho <= 2.0 ** -8

    def no_second_read(*a, **k):
        raise AssertionError("ensure_bf16 read the leaf again")

    monkeypatch.setattr(type(leaf), "blocks", no_second_read)
    assert leaf.ensure_bf16() == rho


def test_fill_streams_small_chunks(store, data, tmp_path, monkeypatch):
    """A leaf is copied a few MiB at a time, whatever its size (64k-row chunks were ~1 GiB of
    float32 at 4096-d: the cold query's peak RSS was above the reference's)."""
    asked = []
    real = Store.iter_layer

    def spy(self, info, layer, *, chunk_rows=65536):
        asked.append(chunk_rows)
        return real(self, info, layer, chunk_rows=chunk_rows)

    monkeypatch.setattr(Store, "iter_layer", spy)
    monkeypatch.setattr(scan, "COPY_CHUNK_BYTES", 48 * 2 * 300)  # 300 rows of 48 float16
    leaf = LeafCache(store, tmp_path / "c").get(data["info"], 4, bf16=True)
    assert asked == [300]
    keys, v16 = _stored(store, data["info"], 4)
    assert leaf.rows == len(v16) > 300  # several chunks
    assert np.array_equal(np.fromfile(leaf.vectors_path, dtype=np.float16).reshape(v16.shape), v16)
    assert np.array_equal(leaf.keys(), keys)
    want = 1 / np.linalg.norm(v16.astype(np.float32), axis=1)
    np.testing.assert_allclose(leaf.inv_norms(), want, rtol=1e-6)


def test_interrupted_fill_leaves_no_half_leaf(store, data, tmp_path, monkeypatch):
    info = data["info"]
    cache = LeafCache(store, tmp_path / "c")
    real = Store.iter_layer

    def broken(self, info, layer, *, chunk_rows=65536):
        it = real(self, info, layer, chunk_rows=50)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "iter_layer", broken)
    with pytest.raises(KeyboardInterrupt):
        cache.get(info, 0, bf16=True)
    base = cache.leaf_dir(info, 0)
    assert list(base.iterdir()) == []  # neither a leaf nor its temp folder
    monkeypatch.setattr(Store, "iter_layer", real)
    leaf = cache.get(info, 0, bf16=True)
    assert leaf.rows == info.layer(0).row_count
    assert np.array_equal(np.fromfile(leaf.vectors_path, dtype=np.float16).reshape(leaf.rows, -1),
                          _stored(store, info, 0)[1])


def test_a_killed_fills_temp_folder_is_removed(store, data, tmp_path):
    """kill -9 mid-copy runs no ``finally``: the next fill of the leaf removes what it left."""
    info = data["info"]
    cache = LeafCache(store, tmp_path / "c")
    base = cache.leaf_dir(info, 6)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = base / f".tmp-{dead}-deadbeef"
    stale.mkdir(parents=True)
    (stale / "vectors.f16").write_bytes(b"\0" * 1000)  # half written
    mine = base / f".tmp-{os.getpid()}-cafecafe"  # a live process's fill in progress: kept
    mine.mkdir()
    leaf = cache.get(info, 6)
    assert leaf.rows == info.layer(6).row_count
    assert not stale.exists()
    assert mine.exists()


def test_get_many_copies_in_parallel_and_equals_one_by_one(store, data, tmp_path, monkeypatch):
    info = data["info"]
    readers = []
    real = Store.sibling

    def spy(self):
        r = real(self)
        readers.append(r)
        return r

    monkeypatch.setattr(Store, "sibling", spy)
    leaves = LeafCache(store, tmp_path / "par").get_many(info, info.layer_numbers, bf16=True, workers=4)
    assert len(readers) == len(info.layer_numbers)  # a connection per missing leaf
    assert all(r.conn.closed for r in readers)
    one = LeafCache(store, tmp_path / "seq")
    for layer, leaf in zip(info.layer_numbers, leaves, strict=True):
        assert _leaf_bytes(leaf) == _leaf_bytes(one.get(info, layer, bf16=True))
    # all cached now: no copy, no connection
    readers.clear()
    LeafCache(store, tmp_path / "par").get_many(info, info.layer_numbers, bf16=True, workers=4)
    assert readers == []


def test_a_multi_layer_query_copies_its_leaves_at_once(store, data, tmp_path, monkeypatch):
    from latentlens.query import Lens

    calls = []
    real = LeafCache.get_many

    def spy(self, info, layers, **kw):
        calls.append(list(layers))
        return real(self, info, layers, **kw)

    monkeypatch.setattr(LeafCache, "get_many", spy)
    lens = Lens(store, cache_dir=tmp_path / "c", scan_dtype="bfloat16")
    q = np.random.default_rng(1).normal(size=(3, 48)).astype(np.float32)
    first = lens.neighbors(q, "cache-model", k=5, mode="exact")
    assert calls == [data["info"].layer_numbers]
    leaf = lens.scan.cache.cached(data["info"], 4, (data["info"].layer(4).row_count, data["info"].layer(4).version))
    assert leaf is not None and leaf.bf16_path.exists()  # written by the fill, for the bf16 scan
    again = lens.neighbors(q, "cache-model", k=5, mode="exact")
    assert calls == [data["info"].layer_numbers]  # cached: nothing to prefetch
    assert [[(n.sentence_id, n.position, n.layer) for n in r.neighbours] for r in first] == \
        [[(n.sentence_id, n.position, n.layer) for n in r.neighbours] for r in again]


_RACE = """
import sys
from latentlens.scan import LeafCache
from latentlens.store import Store
with Store.open(sys.argv[1]) as s:
    info = s.get_model("cache-model")
    leaves = LeafCache(s, sys.argv[2]).get_many(info, info.layer_numbers, bf16=True, workers=2)
    print(",".join(leaf.path.name for leaf in leaves))
"""


def test_two_processes_filling_the_same_leaves_agree(store, data, db_url, tmp_path):
    root = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, db_url, str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    assert outs[0][0] == outs[1][0]
    info = data["info"]
    cache = LeafCache(store, root)
    for layer in info.layer_numbers:
        li = info.layer(layer)
        leaf = cache.cached(info, layer, (li.row_count, li.version))
        assert leaf is not None
        keys, v16 = _stored(store, info, layer)
        assert np.array_equal(np.fromfile(leaf.vectors_path, dtype=np.float16).reshape(v16.shape), v16)
        assert np.array_equal(leaf.keys(), keys)
        assert [p.name for p in leaf.path.parent.iterdir()] == [leaf.path.name]  # no temp folder left


@pytest.mark.parametrize("pread_rows", [0, 1024])
def test_gather_in_pieces_equals_fancy_indexing(tmp_path, monkeypatch, pread_rows):
    """Through the map in pieces (many rows) or a pread per row (a few): the same rows."""
    from test_scan import _write_leaf

    rows = np.random.default_rng(3).normal(size=(1000, 16)).astype(np.float32)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    monkeypatch.setattr(scan, "GATHER_ROWS", 7)
    monkeypatch.setattr(scan, "PREAD_ROWS", pread_rows)
    want = np.random.default_rng(4).integers(0, 1000, 300)  # unsorted, with repeats
    assert np.array_equal(leaf.gather(want), v16[want])
    assert leaf.gather(np.zeros(0, np.int64)).shape == (0, 16)
    assert np.array_equal(leaf.gather(np.array([999, 0])), v16[[999, 0]])  # first and last rows
    with pytest.raises(IndexError):
        leaf.gather(np.array([1000]))


def test_gather_rows_of_a_page_or_more_read_each_row(tmp_path, monkeypatch):
    """Rows of a page or more (2048-d float16: 4 KiB) go by a pread each, whatever their
    count: the same rows as the map's."""
    from test_scan import _write_leaf

    rows = np.random.default_rng(5).normal(size=(300, 2048)).astype(np.float32)
    leaf, v16 = _write_leaf(tmp_path / "leaf", rows)
    monkeypatch.setattr(scan, "PREAD_ROWS", 0)
    reads = []
    real = scan.Leaf._pread
    monkeypatch.setattr(scan.Leaf, "_pread", lambda self, r, out: reads.append(len(r)) or real(self, r, out))
    want = np.random.default_rng(6).integers(0, 300, 200)
    assert np.array_equal(leaf.gather(want), v16[want])
    assert reads == [200]


def test_scan_engine_warm_fills_every_layer(store, data, tmp_path):
    eng = ScanEngine(store, cache_root=tmp_path / "c", dtype="float32")
    leaves = eng.warm(data["info"])
    assert [leaf.rows for leaf in leaves] == [data["info"].layer(x).row_count for x in data["info"].layer_numbers]
    assert not any(leaf.bf16_path.exists() for leaf in leaves)  # a float32 scan needs no bf16 copy


def test_get_many_without_a_second_connection_copies_one_by_one(store, data, tmp_path, monkeypatch):
    from latentlens.errors import DatabaseUnavailable

    def refuse(self):
        raise DatabaseUnavailable("too many connections")

    monkeypatch.setattr(Store, "sibling", refuse)
    leaves = LeafCache(store, tmp_path / "c").get_many(data["info"], data["info"].layer_numbers, workers=4)
    assert [leaf.rows for leaf in leaves] == [data["info"].layer(x).row_count for x in data["info"].layer_numbers]


def test_get_many_hands_the_copys_freed_heap_back(store, data, tmp_path, monkeypatch):
    """After copying, the threads' freed chunk buffers go back to the OS before the search
    allocates its own (the very first query's peak); a cache hit copies and trims nothing."""
    trims = []
    monkeypatch.setattr(scan, "release_heap", lambda: trims.append(1))
    info = data["info"]
    LeafCache(store, tmp_path / "c").get_many(info, info.layer_numbers, bf16=True, workers=2)
    assert trims == [1]
    LeafCache(store, tmp_path / "c").get_many(info, info.layer_numbers, bf16=True, workers=2)
    assert trims == [1]


def test_release_heap_runs_where_there_is_no_malloc_trim(monkeypatch):
    scan.release_heap()  # glibc here: malloc_trim(0)
    monkeypatch.setattr(scan, "_malloc_trim", lambda: None)
    scan.release_heap()  # musl, macOS: nothing to do, no error


def test_measure_scan_draws_its_rows_in_their_own_dtype(monkeypatch):
    """The one-time scan measurement drew float32 rows and converted them (~300 MiB at once at
    65536 x 576): the peak of a fresh machine's first default query."""
    monkeypatch.setattr(scan, "scan_dtype", lambda: torch.bfloat16)
    drawn = []
    real = torch.randn

    def spy(*a, **kw):
        drawn.append(kw.get("dtype"))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "randn", spy)
    got = scan.measure_scan(dim=16, rows=8192, repeats=1)
    assert drawn[0] == torch.bfloat16 and got["read"] > 0 and got["mul"] > 0


def test_fill_arithmetic_reuses_its_buffers_across_chunk_sizes():
    """The copy's chunks vary in size (block ranges): each chunk's norms, bf16 bits and rho
    equal a fresh computation, whether the buffers grow, shrink or stay."""
    rng = np.random.default_rng(3)
    work: dict = {}
    for n in (5, 300, 7, 300, 1000, 0, 2):
        v = (rng.normal(size=(n, 24)) * 10.0 ** rng.integers(-3, 2, (n, 1))).astype(np.float16)
        if n > 1:
            v[1] = 0  # a zero row: norm 0, no rounding
        norms, bits, rho = scan._fill_arithmetic(v, True, work)
        x = v.astype(np.float32)
        np.testing.assert_allclose(norms, np.linalg.norm(x, axis=1), rtol=1e-6)
        assert np.array_equal(bits.view(np.uint16), bf16_bits(x))
        if n:
            res = np.linalg.norm(x - (bf16_bits(x).astype(np.uint32) << 16).view(np.float32), axis=1)
            assert rho == pytest.approx(float((res / np.maximum(np.linalg.norm(x, axis=1), 1e-30)).max()), rel=1e-5)
            assert 0 < rho <= 2.0 ** -8
        else:
            assert rho == 0.0 and norms.shape == (0,)
        plain, _bits, no_rho = scan._fill_arithmetic(v, False, {})
        assert np.array_equal(plain, norms) and no_rho == 0.0


@pytest.mark.parametrize("capability,flags,want,measures", [
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16, False),  # AMX: known without measuring
    ("AVX512", {"avx512f", "avx512_bf16"}, torch.bfloat16, True),  # BF16 dot products: measured
    ("AVX2", {"avx2"}, torch.float32, False),  # emulated bfloat16
])
def test_scan_dtype_auto_measures_only_where_the_answer_is_unknown(monkeypatch, capability, flags, want, measures):
    from latentlens import config

    monkeypatch.delenv(scan.ENV_SCAN_DTYPE, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(config, "cpu_flags", lambda: flags)
    measured = []

    def fake_measured_once(path, measure):
        measured.append(path)
        return {"choice": "bfloat16"}

    monkeypatch.setattr(scan, "measured_once", fake_measured_once)
    assert scan.scan_dtype() == want
    assert bool(measured) == measures


def test_a_cache_of_an_older_format_is_copied_again_and_removed(store, data, tmp_path):
    """A leaf folder an older latentlens wrote (format 1, keys without char spans, at the same
    version) is never read as this format, nor in the new copy's way; the next fill prunes it."""
    info = data["info"]
    cache = LeafCache(store, tmp_path / "c")
    li = info.layer(4)
    old = cache.leaf_dir(info, 4) / f"v{li.row_count}-{li.version}"  # format 1's name
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"format": 1, "rows": li.row_count, "dim": info.hidden_size,
                                               "row_count": li.row_count, "version": li.version}))
    (old / "vectors.f16").write_bytes(b"\0" * (li.row_count * info.hidden_size * 2))
    leaf = cache.get(info, 4)
    assert leaf.path.name == scan.version_dir(li.row_count, li.version) != old.name
    assert json.loads((leaf.path / "meta.json").read_text())["format"] == scan.CACHE_FORMAT
    assert not old.exists()
    keys, _v = _stored(store, info, 4)
    assert np.array_equal(np.sort(leaf.keys(), order=["sentence_id", "position"]),
                          np.sort(keys, order=["sentence_id", "position"]))
    assert (leaf.keys()["char_start"] >= 0).any()  # spans copied with the keys
