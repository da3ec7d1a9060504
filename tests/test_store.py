"""The store: partitions, bulk load, exact and ANN k-NN, SQL API, bad input."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from latentlens.errors import (
    DatabaseUnavailable,
    DimensionMismatch,
    EmptyResult,
    ModelMismatch,
    UnknownLayer,
    UnknownModel,
)
from latentlens.store import EmbeddingBatch, Store


def clustered(n: int, d: int, *, clusters: int = 20, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, d))
    return (x * scale).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(store: Store, name: str, d: int, layers: dict[int, np.ndarray], *, sentences: list[str] | None = None):
    """Register a model and write one context per row (sentence i, position 2)."""
    n = len(next(iter(layers.values())))
    info = store.register_model(name, hidden_size=d, num_layers=max(layers) + 1)
    info = store.ensure_layers(info, list(layers))
    store.set_vocabulary(info, [f"tok{i}" for i in range(n)])
    corpus = store.register_corpus(f"corpus-{name}", content_hash=f"h-{name}")
    texts = sentences or [f"sentence number {i} of {name}" for i in range(n)]
    ids = store.add_sentences(corpus, texts)
    batch = EmbeddingBatch(
        sentence_id=ids,
        position=np.full(n, 2, np.int32),
        token_id=np.arange(n, dtype=np.int32),
        char_start=np.full(n, -1, np.int32),
        char_end=np.full(n, -1, np.int32),
        prefix_hash=np.arange(n, dtype=np.int64),
        vectors=layers,
    )
    store.write_embeddings(info, batch)
    return store.get_model(name), ids


def brute_force(rows: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = unit(queries) @ unit(rows).T
    return np.argsort(-sims, axis=1)[:, :k]


def test_partitions_per_model_and_layer(store):
    info, _ = fill(store, "part-model", 16, {1: clustered(10, 16), 3: clustered(10, 16, seed=1)})
    rows = store.conn.execute(
        """
        SELECT c.relname, p.relname FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
         WHERE c.relname LIKE %s AND c.relkind IN ('r', 'p') ORDER BY 1
        """,
        (f"token_embedding_m{info.id}%",),
    ).fetchall()
    store.conn.rollback()
    assert rows == [  # one leaf per (model, layer), straight under token_embedding (docs/scaling.md)
        (f"token_embedding_m{info.id}_l1", "token_embedding"),
        (f"token_embedding_m{info.id}_l3", "token_embedding"),
    ]
    assert [li.row_count for li in info.layers] == [10, 10]


def test_exact_knn_equals_brute_force(store):
    d, n = 48, 2000
    data = clustered(n, d, scale=1500.0)  # mid-layer-like norms: normalised in float32
    info, ids = fill(store, "exact-model", d, {4: data})
    queries = clustered(25, d, seed=7)
    res = store.knn(info, 4, queries, k=10, exact=True)
    # the store keeps unit halfvecs and compares them with a halfvec query
    f16 = lambda x: unit(x).astype(np.float16).astype(np.float32)  # noqa: E731
    truth = brute_force(f16(data), f16(queries), 10)
    got = np.searchsorted(ids, res.sentence_id)
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)])
    assert recall == 1.0
    expected = np.sort(unit(queries) @ unit(data).T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(res.similarity, expected, atol=2e-3)
    assert np.all(np.diff(res.similarity, axis=1) <= 1e-6)  # best first


def test_stored_vectors_are_unit_halfvecs(store):
    info, _ = fill(store, "norm-model", 32, {2: clustered(50, 32, scale=3000.0)})
    (keys, vecs), = list(store.iter_layer(info, 2))
    assert vecs.dtype == np.float16 and vecs.shape == (50, 32)
    np.testing.assert_allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert set(keys["position"]) == {2}


def test_wide_model_exact_path(store):
    d = 4100  # beyond halfvec HNSW's 4000-dimension limit
    data = clustered(60, d)
    info, ids = fill(store, "wide-model", d, {1: data})
    res = store.knn(info, 1, data[:3], k=3, exact=True)
    assert list(res.sentence_id[:, 0]) == list(ids[:3])
    assert np.all(res.similarity[:, 0] > 0.999)


def test_query_prunes_to_one_leaf(store):
    info, _ = fill(store, "explain-model", 8, {1: clustered(30, 8), 2: clustered(30, 8, seed=2)})
    fill(store, "explain-other", 8, {1: clustered(30, 8)})
    q = "[" + ",".join(["0.5"] * 8) + "]"
    plan = "\n".join(
        r[0] for r in store.conn.execute(
            "EXPLAIN SELECT sentence_id FROM token_embedding WHERE model_id = %s AND layer = %s "
            "ORDER BY embedding <=> %s::halfvec LIMIT 5",
            (info.id, 2, q),
        )
    )
    store.conn.rollback()
    assert f"token_embedding_m{info.id}_l2" in plan
    assert f"token_embedding_m{info.id}_l1" not in plan
    import re

    touched = set(re.findall(r"token_embedding_m\d+_l\d+(?![_\w])", plan))
    assert touched == {f"token_embedding_m{info.id}_l2"}


def test_quota_caps_contexts_per_token(store):
    d = 8
    info = store.ensure_layers(store.register_model("quota-model", hidden_size=d, num_layers=2), [1, 2])
    corpus = store.register_corpus("quota-corpus", content_hash="q")
    ids = store.add_sentences(corpus, [f"s{i}" for i in range(10)])
    for start in (0, 5):  # two batches: the cap holds across them
        sl = slice(start, start + 5)
        n = 5
        batch = EmbeddingBatch(
            ids[sl], np.full(n, 3, np.int32), np.array([7, 7, 7, 8, 7], np.int32)[:n],
            np.full(n, -1, np.int32), np.full(n, -1, np.int32), np.arange(start, start + n, dtype=np.int64),
            {1: clustered(n, d), 2: clustered(n, d, seed=3)},
        )
        store.write_embeddings(info, batch, max_contexts_per_token=3)
    counts = dict(store.conn.execute(
        "SELECT token_id, count(*) FROM token_embedding WHERE model_id = %s AND layer = 1 GROUP BY 1",
        (info.id,),
    ).fetchall())
    store.conn.rollback()
    assert counts == {7: 3, 8: 2}
    layer_counts = [li.row_count for li in store.get_model("quota-model").layers]
    assert layer_counts == [5, 5]  # the same decision for every layer


def test_sql_function_and_view_show_the_sentence_and_span(store):
    d = 8
    info = store.ensure_layers(store.register_model("sql-model", hidden_size=d, num_layers=3), [2])
    store.set_vocabulary(info, ["a", "b", " dog", "d"])
    corpus = store.register_corpus("sql-corpus", content_hash="s")
    ids = store.add_sentences(corpus, ["a brown dog runs", "cats sleep"])
    vec = np.eye(d, dtype=np.float32)[:2]
    store.write_embeddings(info, EmbeddingBatch(
        ids, np.array([3, 1], np.int32), np.array([2, 3], np.int32),
        np.array([8, -1], np.int32), np.array([11, -1], np.int32), np.array([1, 2], np.int64),
        {2: vec},
    ))
    q = "[" + ",".join(["1"] + ["0"] * (d - 1)) + "]"
    rows = store.conn.execute(
        "SELECT rank, similarity, token, token_id, layer, sentence, position, char_start, char_end "
        "FROM llens_neighbors('sql-model', 2, %s::halfvec, 2)", (q,)
    ).fetchall()
    marked = store.conn.execute(
        "SELECT marked_sentence FROM token_context WHERE model = 'sql-model' ORDER BY sentence_id"
    ).fetchall()
    store.conn.rollback()
    assert rows[0][:1] == (1,) and rows[0][1] == pytest.approx(1.0, abs=1e-3)
    assert rows[0][2:] == (" dog", 2, 2, "a brown dog runs", 3, 8, 11)
    assert rows[1][0] == 2 and rows[1][1] == pytest.approx(0.0, abs=1e-3)
    assert marked == [("a brown [[dog]] runs",), ("cats sleep",)]


def test_sql_function_errors(store):
    fill(store, "sql-err", 8, {1: clustered(5, 8)})
    with pytest.raises(psycopg.errors.NoDataFound, match="unknown model"):
        store.conn.execute("SELECT * FROM llens_neighbors('nope', 1, '[1,2]'::halfvec, 2)")
    store.conn.rollback()
    with pytest.raises(psycopg.errors.DataException, match="dimensions"):
        store.conn.execute("SELECT * FROM llens_neighbors('sql-err', 1, '[1,2]'::halfvec, 2)")
    store.conn.rollback()


def test_bad_input_errors(store):
    info, _ = fill(store, "bad-model", 8, {1: clustered(5, 8)})
    with pytest.raises(DimensionMismatch, match="hidden size 8|has 8"):
        store.knn(info, 1, np.ones((2, 9), np.float32))
    with pytest.raises(UnknownLayer, match="stored layers: 1"):
        store.knn(info, 5, np.ones((1, 8), np.float32))
    with pytest.raises(UnknownModel, match="bad-model"):
        store.get_model("no-such-model")
    with pytest.raises(ModelMismatch, match="hidden size 8"):
        store.register_model("bad-model", hidden_size=16, num_layers=2)
    with pytest.raises(UnknownLayer, match="out of range"):
        store.ensure_layers(info, [99])
    empty = store.ensure_layers(store.register_model("empty-model", hidden_size=8, num_layers=2), [1])
    with pytest.raises(EmptyResult, match="no rows"):
        store.knn(empty, 1, np.ones((1, 8), np.float32))


def test_unreachable_database_is_one_clear_error(tmp_path):
    with pytest.raises(DatabaseUnavailable, match="cannot connect to postgresql://nobody:\\*\\*\\*@"):
        Store.open(f"postgresql://nobody:secret@/x?host={tmp_path}&connect_timeout=2")


def test_names_never_become_identifiers(store):
    evil = 'x"; DROP TABLE model; --'
    info, _ = fill(store, evil, 8, {1: clustered(4, 8)})
    assert store.get_model(evil).id == info.id
    leaves = store.conn.execute(
        "SELECT relname FROM pg_class WHERE relname LIKE %s AND relkind = 'r'",
        (f"token_embedding_m{info.id}_l%",),
    ).fetchall()
    store.conn.rollback()
    assert leaves == [(f"token_embedding_m{info.id}_l1",)]


def test_delete_model_and_corpus(store):
    info, _ = fill(store, "doomed", 8, {1: clustered(6, 8), 2: clustered(6, 8)})
    store.delete_model("doomed")
    left = store.conn.execute(
        "SELECT count(*) FROM pg_class WHERE relname LIKE %s", (f"token_embedding_m{info.id}%",)
    ).fetchone()[0]
    store.conn.rollback()
    assert left == 0
    with pytest.raises(UnknownModel):
        store.get_model("doomed")

    info2, _ = fill(store, "keeps-model", 8, {1: clustered(6, 8)})
    store.delete_corpus("corpus-keeps-model")
    assert store.get_model("keeps-model").layers[0].row_count == 0


def test_sentences_deduplicated_within_a_corpus(store):
    corpus = store.register_corpus("dups", content_hash="d")
    ids = store.add_sentences(corpus, ["same", "other", "same"])
    assert ids[0] == ids[2] != ids[1]
    again = store.add_sentences(corpus, ["other"])
    assert again[0] == ids[1]
    assert store.get_corpus("dups").sentence_count == 2


def test_hnsw_recall_and_plan(store):
    d, n = 64, 5000
    data = clustered(n, d)
    info, ids = fill(store, "hnsw-model", d, {1: data})
    store.build_index(info, [1])
    info = store.get_model("hnsw-model")
    assert info.layers[0].index_kind == "hnsw_halfvec"
    # in-distribution queries (stored rows plus noise): HNSW's recall is high there
    rng = np.random.default_rng(11)
    queries = data[rng.choice(n, 50, replace=False)] + 0.2 * rng.normal(size=(50, d)).astype(np.float32)
    res = store.knn(info, 1, queries, k=10, ef_search=100)
    truth = brute_force(data, queries, 10)
    got = np.searchsorted(ids, res.sentence_id)
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)])
    assert recall >= 0.95
    q = "[" + ",".join(["0.5"] * d) + "]"
    plan = "\n".join(r[0] for r in store.conn.execute(
        f"EXPLAIN SELECT sentence_id FROM token_embedding WHERE model_id = %s AND layer = 1 "
        f"ORDER BY embedding::halfvec({d}) <=> %s::halfvec({d}) LIMIT 5", (info.id, q)))
    store.conn.rollback()
    assert f"token_embedding_m{info.id}_l1_ann" in plan and "Index Scan" in plan


def test_binary_index_for_wide_models(store):
    d = 4096
    data = clustered(400, d)
    info, ids = fill(store, "hnsw-wide", d, {1: data})
    store.build_index(info, [1])
    info = store.get_model("hnsw-wide")
    assert info.layers[0].index_kind == "hnsw_binary"
    res = store.knn(info, 1, data[:20], k=10)
    truth = brute_force(data, data[:20], 10)
    got = np.searchsorted(ids, res.sentence_id)
    assert np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)]) >= 0.95


def test_index_build_refused_where_pgvector_cannot(store):
    """A server recorded as unable (llens.ann_index = off) refuses builds in Python and in SQL;
    searches there scan exactly even on a leaf that has an index."""
    from latentlens.errors import IndexUnsupported

    data = clustered(300, 8)
    info, _ = fill(store, "no-ann", 8, {1: data})
    store.build_index(info)
    store.conn.execute("SET llens.ann_index = 'off'")  # what the server's config says after a failed probe
    store.conn.commit()
    try:
        assert not store.ann_supported()
        with pytest.raises(IndexUnsupported, match="ANN probe"):
            store.build_index(info)
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            store.conn.execute("SELECT llens_build_index(%s, 1)", (info.id,))
        store.conn.rollback()
        res = store.knn(info, 1, data[:5], k=3)  # exact, so each row finds itself first
        assert (res.similarity[:, 0] > 0.999).all()
    finally:
        store.conn.execute("RESET llens.ann_index")
        store.conn.commit()


def test_delete_corpus_gives_the_quota_back(store):
    info = store.register_model("quota-back", hidden_size=8, num_layers=2)
    info = store.ensure_layers(info, [1, 2])
    corpora = [store.register_corpus(f"qb-{i}", content_hash=f"qb{i}") for i in range(2)]
    for i, c in enumerate(corpora):
        ids = store.add_sentences(c, [f"corpus {i} sentence {j}" for j in range(3)])
        batch = EmbeddingBatch(ids, np.full(3, 2, np.int32), np.full(3, 7, np.int32), np.full(3, -1, np.int32),
                               np.full(3, -1, np.int32), np.arange(3, dtype=np.int64) + 10 * i,
                               {1: clustered(3, 8, seed=i), 2: clustered(3, 8, seed=i + 5)})
        store.write_embeddings(info, batch, max_contexts_per_token=4)
    used = "SELECT used FROM token_quota WHERE model_id = %s AND token_id = 7"
    assert store._fetch(used, (info.id,))[0][0] == 4  # 3 + 1 granted, 2 dropped
    store.delete_corpus("qb-0")
    # three contexts (stored at two layers each) are gone: their quota is free again
    assert store._fetch(used, (info.id,))[0][0] == 1
    assert [li.row_count for li in store.get_model("quota-back").layers] == [1, 1]


def test_add_sentences_counts_what_each_chunk_adds(store):
    c = store.register_corpus("chunks", content_hash="chunks")
    store.add_sentences(c, ["a", "b", "a"])
    store.add_sentences(c, ["b", "c"], ordinals=[3, 4])
    assert store.get_corpus("chunks").sentence_count == 3


def test_contexts_by_model_name_prune_partitions(store):
    a, _ = fill(store, "prune-a", 8, {1: clustered(5, 8), 2: clustered(5, 8)})
    b, _ = fill(store, "prune-b", 8, {1: clustered(5, 8)})
    plan = "\n".join(r[0] for r in store.conn.execute(
        "EXPLAIN SELECT * FROM llens_contexts('prune-b') WHERE layer = 1"))
    store.conn.rollback()
    assert f"token_embedding_m{b.id}_l1" in plan
    assert f"token_embedding_m{a.id}_" not in plan or "Subplans Removed" in plan
    n = store._fetch("SELECT count(*) FROM llens_contexts('prune-a')")[0][0]
    assert n == 10
    with pytest.raises(psycopg.errors.NoDataFound, match="unknown model"):
        store.conn.execute("SELECT * FROM llens_contexts('nope')")
    store.conn.rollback()


def test_connections_leave_maintenance_work_mem_to_the_server(store):
    source = store._fetch("SELECT source FROM pg_settings WHERE name = 'maintenance_work_mem'")[0][0]
    assert source != "session"
