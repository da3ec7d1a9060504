"""Store.iter_layer's block-range path: the server packs each range of a leaf's heap blocks
into one bytea, instead of binary COPY's one message per row (the cold query's copy)."""

from __future__ import annotations

import numpy as np
import pytest
from _query_data import fill

from latentlens.scan import LeafCache
from latentlens.store import EmbeddingBatch, Store


@pytest.fixture(scope="module")
def data(db_url):
    with Store.open(db_url) as s:
        return {
            "small": fill(s, "ranges-model", n_sentences=120, dim=48, layers=(0, 3)),
            # 2,000-d halfvecs (4 KB) are TOASTed: a heap block holds many more rows
            "wide": fill(s, "ranges-wide", n_sentences=30, dim=2000, layers=(1,)),
        }


def _read(it, most: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    chunks = list(it)
    if most is not None:  # the scan's blocks have a fixed capacity (topk_blocks' block_rows)
        assert all(0 < len(k) == len(v) <= most for k, v in chunks)
    if not chunks:
        return np.zeros(0), np.zeros((0, 0), np.float16), 0
    return np.concatenate([k for k, _ in chunks]), np.concatenate([v for _, v in chunks]), len(chunks)


def _by_key(keys: np.ndarray, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((keys["position"], keys["sentence_id"]))
    return keys[order], vecs[order]


@pytest.mark.parametrize("which,layer,chunk", [("small", 3, 100), ("small", 0, 65536), ("wide", 1, 40)])
def test_ranges_return_the_copys_rows_bit_for_bit(store, data, which, layer, chunk):
    info = data[which]["info"]
    k_copy, v_copy, _ = _read(store._iter_layer_copy(info, layer, chunk))
    k_rng, v_rng, n_chunks = _read(store._iter_layer_ranges(info, layer, chunk), chunk)
    assert len(k_rng) == info.layer(layer).row_count == len(k_copy)
    assert v_rng.dtype == np.float16 and v_rng.shape == v_copy.shape
    k_copy, v_copy = _by_key(k_copy, v_copy)
    k_rng, v_rng = _by_key(k_rng, v_rng)
    assert np.array_equal(k_rng, k_copy)
    assert np.array_equal(v_rng.view(np.uint16), v_copy.view(np.uint16))  # the same bytes, -0.0 included
    # about chunk rows a message, not one a row
    rows = len(k_rng)
    assert n_chunks <= 4 * max(1, rows // chunk) + 2
    if chunk < rows:
        assert n_chunks >= 2  # memory bounded by the chunk, not the leaf


def test_plain_postgres_takes_the_ranges_not_the_copy(store, data, monkeypatch):
    def no_copy(*a, **k):
        raise AssertionError("binary COPY used on plain PostgreSQL")

    monkeypatch.setattr(Store, "_iter_layer_copy", no_copy)
    info = data["small"]["info"]
    keys, _v, _n = _read(store.iter_layer(info, 0))
    assert len(keys) == info.layer(0).row_count


def test_citus_keeps_the_copy(store, data, monkeypatch):
    """A distributed leaf has no ctid to range over: Citus reads by binary COPY."""
    def no_ranges(*a, **k):
        raise AssertionError("block ranges used on Citus")

    monkeypatch.setattr(Store, "_iter_layer_ranges", no_ranges)
    monkeypatch.setattr(store, "_citus", True, raising=False)
    info = data["small"]["info"]
    keys, _v, _n = _read(store.iter_layer(info, 0))
    assert len(keys) == info.layer(0).row_count


def test_an_empty_leaf_yields_nothing_and_caches_empty(store, tmp_path):
    info = store.register_model("ranges-empty", hidden_size=16, num_layers=2, architecture="synthetic")
    info = store.ensure_layers(info, [1])
    assert list(store._iter_layer_ranges(info, 1, 100)) == []
    leaf = LeafCache(store, tmp_path / "c").get(info, 1, bf16=True)
    assert leaf.rows == 0


def test_the_packed_columns_cannot_be_null(store):
    """A NULL field makes its row's concatenation NULL, which string_agg skips: the path
    relies on these columns being NOT NULL (a lost row would also fail _fill's row count)."""
    rows = store.conn.execute(
        "SELECT column_name, is_nullable FROM information_schema.columns WHERE table_name = 'token_embedding' "
        "AND column_name IN ('sentence_id', 'position', 'token_id', 'embedding')").fetchall()
    store.conn.rollback()
    assert sorted(rows) == [("embedding", "NO"), ("position", "NO"), ("sentence_id", "NO"), ("token_id", "NO")]


def _more_rows(store: Store, data: dict, layer: int, first_position: int, n: int) -> None:
    """n rows more in ``layer`` (existing sentences, new positions): bumps the leaf's version."""
    info = data["info"]
    sid = np.asarray(data["sentence_id"][:n], dtype=np.int64)
    rng = np.random.default_rng(first_position)
    store.write_embeddings(info, EmbeddingBatch(
        sentence_id=sid, position=np.arange(first_position, first_position + n, dtype=np.int32),
        token_id=np.zeros(n, np.int32), char_start=np.full(n, -1, np.int32), char_end=np.full(n, -1, np.int32),
        prefix_hash=np.arange(n, dtype=np.int64) + 10_000_000 + first_position,
        vectors={layer: rng.normal(size=(n, info.hidden_size)).astype(np.float32)}))


def test_a_write_during_the_stream_is_not_seen(store, data, db_url):
    """One statement, one snapshot: rows committed while the chunks stream are never half seen."""
    d = data["small"]
    info = store.get_model("ranges-model")
    before = info.layer(0).row_count
    it = store._iter_layer_ranges(info, 0, 50)
    first = next(it)
    with Store.open(db_url) as writer:
        _more_rows(writer, d, 0, 5000, 40)
    rest = list(it)
    assert len(first[0]) + sum(len(k) for k, _ in rest) == before
    assert store.get_model("ranges-model").layer(0).row_count == before + 40


def test_a_leaf_written_during_its_fill_is_redone(store, data, db_url, tmp_path, monkeypatch):
    """_fill's version check: a leaf written to while it was being copied is copied again."""
    d = data["small"]
    real = Store._iter_layer_ranges
    calls = []

    def racing(self, info, layer, chunk_rows):
        calls.append(layer)
        it = real(self, info, layer, chunk_rows)
        yield next(it)
        if len(calls) == 1:
            with Store.open(db_url) as writer:
                _more_rows(writer, d, 3, 6000, 25)
        yield from it

    monkeypatch.setattr(Store, "_iter_layer_ranges", racing)
    info = store.get_model("ranges-model")
    leaf = LeafCache(store, tmp_path / "c").get(info, 3, bf16=True)
    monkeypatch.setattr(Store, "_iter_layer_ranges", real)
    assert len(calls) == 2  # the first copy was thrown away
    now = store.get_model("ranges-model").layer(3)
    assert (leaf.rows, leaf.row_count, leaf.version) == (now.row_count, now.row_count, now.version)
    keys, vecs, _n = _read(store._iter_layer_copy(info, 3, 1000))
    k_leaf, v_leaf = _by_key(np.array(leaf.keys()), np.fromfile(leaf.vectors_path, np.float16).reshape(leaf.rows, -1))
    keys, vecs = _by_key(keys, vecs)
    assert np.array_equal(k_leaf, keys) and np.array_equal(v_leaf.view(np.uint16), vecs.view(np.uint16))


def test_an_abandoned_stream_leaves_the_connection_usable(store, data):
    info = data["small"]["info"]
    it = store.iter_layer(info, 3, chunk_rows=20)
    next(it)
    it.close()
    assert store.leaf_version(info, 3)[0] > 0


def test_a_range_denser_than_the_mean_is_split_to_the_chunk(store, data, monkeypatch):
    """The blocks per range come from the leaf's mean density; a denser range (here: a
    mean made 8x too low) must still come in chunks of at most chunk_rows (the streamed
    scan's buffers hold that many)."""
    info = store.get_model("ranges-model")
    real = store.conn.execute

    def sparse(query, params=None, **kw):
        cur = real(query, params, **kw)
        if isinstance(query, str) and "pg_relation_size" in query and "row_count" in query:
            blocks, rows = cur.fetchone()
            return real("SELECT %s::int8, %s::int8", (blocks * 8, rows))
        return cur

    monkeypatch.setattr(store.conn, "execute", sparse)
    keys, _v, n_chunks = _read(store._iter_layer_ranges(info, 3, 30), 30)
    assert len(keys) == info.layer(3).row_count and n_chunks >= len(keys) // 30


@pytest.mark.parametrize("path", ["ranges", "copy"])
def test_keys_carry_each_rows_char_span(store, db_url, path):
    """Both read paths give every row's char span with its key (-1 where the column is NULL),
    as the table holds it: an answer scanned from the cache then needs no lookup of them."""
    from _query_data import fill as fill_model

    info = fill_model(store, f"ranges-spans-{path}", n_sentences=20, dim=16, layers=(2,))["info"]
    n = 5  # rows with NULL spans beside the filled ones
    store.write_embeddings(info, EmbeddingBatch(
        sentence_id=np.full(n, int(store._fetch("SELECT min(sentence_id) FROM token_embedding "
                                                "WHERE model_id = %s", (info.id,))[0][0]), np.int64),
        position=np.arange(500, 500 + n, dtype=np.int32), token_id=np.zeros(n, np.int32),
        char_start=np.full(n, -1, np.int32), char_end=np.full(n, -1, np.int32),
        prefix_hash=np.arange(n, dtype=np.int64) + 20_000_000,
        vectors={2: np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)}))
    info = store.get_model(info.name)
    read = store._iter_layer_ranges if path == "ranges" else store._iter_layer_copy
    keys, _v, _n = _read(read(info, 2, 64))
    want = {(int(s), int(p)): (a, b) for s, p, a, b in store._fetch(
        "SELECT sentence_id, position, coalesce(char_start, -1), coalesce(char_end, -1) FROM token_embedding "
        "WHERE model_id = %s AND layer = 2", (info.id,))}
    got = {(int(k["sentence_id"]), int(k["position"])): (int(k["char_start"]), int(k["char_end"])) for k in keys}
    assert got == want
    assert sum(1 for a, b in got.values() if a == -1 and b == -1) == n
    assert any(a >= 0 for a, _ in got.values())
