"""Layers wider than 4000 dimensions: binary-quantized HNSW by default, pgvectorscale's DiskANN
by choice where the server has it (the embedded server does), refused where it does not, and
exact search when the index is gone; both answer through llens_knn with an exact re-rank
(sql/0008_wide_index.sql)."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from latentlens.errors import IndexUnsupported, InputError
from latentlens.query import Lens
from latentlens.store import EmbeddingBatch, Store
from latentlens.store.search import RECALL_TARGET, WIDE_BINARY_MAX_EF

D = 4096


def rows(n: int, seed: int = 0) -> np.ndarray:
    """Clustered rows with a shared offset, as hidden states have (what defeats sign bits)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(25, D))
    offset = 2.0 * rng.normal(size=D)
    return (centres[rng.integers(0, 25, n)] + 0.7 * rng.normal(size=(n, D)) + offset).astype(np.float32)


def fill(store: Store, name: str, data: np.ndarray):
    info = store.register_model(name, hidden_size=D, num_layers=1, architecture="synthetic")
    info = store.ensure_layers(info, [1])
    store.set_vocabulary(info, ["a", "b"])
    corpus = store.register_corpus(f"{name}-corpus", content_hash=name)
    n = len(data)
    ids = store.add_sentences(corpus, [f"{name} sentence {i}" for i in range(n)])
    store.write_embeddings(info, EmbeddingBatch(
        sentence_id=ids, position=np.ones(n, np.int32), token_id=np.zeros(n, np.int32),
        char_start=np.zeros(n, np.int32), char_end=np.ones(n, np.int32),
        prefix_hash=np.arange(n, dtype=np.int64), vectors={1: data}))
    return store.get_model(name), ids


def offset_rows(n: int, seed: int = 4) -> np.ndarray:
    """Clustered rows on a large positive offset: their sign bits are (nearly) all ones."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(25, D))
    return (8.0 + centres[rng.integers(0, 25, n)] + 0.7 * rng.normal(size=(n, D))).astype(np.float32)


def exact_kth(data: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    v = data.astype(np.float16).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    s = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ v.T
    return -np.sort(-s, axis=1)[:, k - 1]


def recall(res, kth: np.ndarray, k: int = 10) -> float:
    """Tie-aware recall@k: a hit is any row as similar as the true k-th."""
    return float(np.mean((res.similarity >= kth[:, None] - 1e-4).sum(axis=1) / k))


def near(data: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    """In-distribution queries: stored rows moved by noise to cosine ~0.9 (as calibration's)."""
    rng = np.random.default_rng(seed)
    q = data[rng.choice(len(data), n, replace=False)]
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    noise = rng.normal(size=q.shape)
    return (q + 0.5 * noise / np.linalg.norm(noise, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module", params=["hnsw_binary", "diskann"])
def wide(db_url, request):
    """A 4096-d leaf indexed by each kind (hnsw_binary: the default, built without asking)."""
    kind = request.param
    data = rows(1500)
    with Store.open(db_url) as s:
        if kind == "diskann" and not s.conn.execute(
                "SELECT count(*) FROM pg_available_extensions WHERE name = 'vectorscale'").fetchone()[0]:
            pytest.skip("this server does not ship pgvectorscale (the embedded server does)")
        s.conn.rollback()
        info, ids = fill(s, f"wide-{kind}", data)
        s.build_index(info, [1], kind=None if kind == "hnsw_binary" else kind)
        return {"data": data, "ids": ids, "info": s.get_model(info.name), "kind": kind}


def test_wide_index_built_with_its_recall_recorded(wide):
    li = wide["info"].layer(1)
    assert li.index_kind == wide["kind"]
    # build_index measured it: the default policy uses the index only where this holds
    assert li.index_recall_ok
    assert li.index_params["recall_at_10"] >= RECALL_TARGET


def test_wide_index_search_uses_the_index_and_reaches_the_recall_target(wide, db_url):
    with Store.open(db_url) as s:
        info = wide["info"]
        q = near(wide["data"], 40)
        res = s.knn(info, 1, q, 10)  # at the ef_search the build recorded
        assert recall(res, exact_kth(wide["data"], q)) >= RECALL_TARGET
        # exact cosines come back (the re-rank), best first
        assert np.all(np.diff(res.similarity, axis=1) <= 1e-6)
        v = wide["data"][np.searchsorted(wide["ids"], res.sentence_id[:, 0])].astype(np.float16).astype(np.float32)
        cos = np.sum(v * q, axis=1) / np.linalg.norm(v, axis=1) / np.linalg.norm(q, axis=1)
        np.testing.assert_allclose(res.similarity[:, 0], cos, atol=2e-3)
        # llens_knn's candidate query matches the leaf's index (on a leaf this small the planner
        # may prefer a sequential scan, so that is ruled out here)
        qs = "[" + ",".join(map(str, q[0].tolist())) + "]"
        order = (f"e.embedding::vector({D}) <=> %s::halfvec::vector({D})" if wide["kind"] == "diskann"
                 else f"binary_quantize(e.embedding)::bit({D}) <~> binary_quantize(%s::halfvec({D}))")
        with s.transaction() as conn:
            conn.execute("SET LOCAL diskann.query_rescore = 0")
            conn.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in conn.execute(
                f"EXPLAIN SELECT sentence_id FROM token_embedding_m{info.id}_l1 e ORDER BY {order} LIMIT 200", (qs,)))
        assert f"token_embedding_m{info.id}_l1_ann" in plan and "Index Scan" in plan


def test_default_search_sends_in_distribution_queries_to_the_wide_index(wide, db_url, tmp_path, monkeypatch):
    with Lens.connect(db_url, cache_dir=tmp_path / "scan") as lens:
        # a cost model under which the index is the cheaper path (as on a big leaf)
        monkeypatch.setattr(lens.searcher.costs, "scan", lambda rows, dim, nq, cached: 5.0 + 0.5 * nq)
        monkeypatch.setattr(lens.searcher.costs, "ann", lambda key, rows, nq, ef: 1e-3 * nq)
        q = near(wide["data"], 12, seed=3)
        got = lens.neighbors(q, wide["info"].name, k=10, layers=[1])
        assert {p for r in got for p in r.search.values()} == {"ann"}
        kth = exact_kth(wide["data"], q)
        sims = np.array([[n.similarity for n in r.neighbours] for r in got])
        assert np.mean((sims >= kth[:, None] - 1e-3).sum(axis=1) / 10) >= RECALL_TARGET


def test_kinds_checked_against_the_width(wide, db_url):
    with Store.open(db_url) as s:
        with pytest.raises(InputError, match="hnsw_halfvec indexes are for layers of at most 4000"):
            s.build_index(wide["info"], [1], kind="hnsw_halfvec")
        with pytest.raises(InputError, match="unknown index kind"):
            s.build_index(wide["info"], [1], kind="ivfflat")
        narrow = s.register_model(f"narrow-{wide['kind']}", hidden_size=8, num_layers=1, architecture="synthetic")
        s.ensure_layers(narrow, [1])
        with pytest.raises(InputError, match="diskann indexes are for layers wider than 4000"):
            s.build_index(narrow.name, [1], kind="diskann")
        assert s.get_model(wide["info"].name).layer(1).index_kind == wide["kind"]  # untouched


def test_a_diskann_scan_leaves_the_session_settings_as_they_were(wide, db_url):
    if wide["kind"] != "diskann":
        pytest.skip("DiskANN's settings")
    with psycopg.connect(db_url) as conn:
        conn.execute("SET diskann.query_search_list_size = 77")
        conn.execute("SET diskann.query_rescore = 12")
        q = "[" + ",".join(map(str, near(wide["data"], 1)[0].tolist())) + "]"
        for exact in (False, True):
            n = conn.execute("SELECT count(*) FROM llens_knn(%s, 1, %s::halfvec, 10, %s)",
                             (wide["info"].id, q, exact)).fetchone()
            assert n[0] == 10
            assert conn.execute("SHOW diskann.query_search_list_size").fetchone()[0] == "77"
            assert conn.execute("SHOW diskann.query_rescore").fetchone()[0] == "12"


def test_without_vectorscale_diskann_is_refused_and_a_lost_index_scanned_exactly(empty_db_url):
    """A server without pgvectorscale: diskann is refused in one line, a leaf whose DiskANN
    index went with the extension is searched exactly, and the default is binary HNSW."""
    from latentlens import migrate

    migrate.upgrade(empty_db_url)  # a database of its own: it drops the extension
    data = rows(600, seed=7)
    q = near(data, 10, seed=8)
    kth = exact_kth(data, q)
    with Store.open(empty_db_url) as s:
        info, _ = fill(s, "wide-noext", data)
        s.build_index(info, [1], kind="diskann")
        s.conn.execute("DROP EXTENSION vectorscale CASCADE")  # takes the index with it
        s.conn.commit()
        try:
            info = s.get_model("wide-noext")
            assert info.layer(1).index_kind == "diskann"  # recorded, but the index is gone
            assert recall(s.knn(info, 1, q, 10), kth) == 1.0  # exact scan, no error
            with pytest.raises(IndexUnsupported, match="vectorscale extension"):
                s.build_index(info, [1], kind="diskann")
            s.build_index(info, [1])
            info = s.get_model("wide-noext")
            assert info.layer(1).index_kind == "hnsw_binary"
            assert recall(s.knn(info, 1, q, 10, ef_search=1000), kth) >= 0.8
            # where binary HNSW falls short there is no DiskANN to turn to: it stays, with what
            # its calibration measured (on 600 rows it re-ranks nearly all of them), no error
            offset, _ = fill(s, "wide-noext-offset", offset_rows(600))
            s.build_index(offset, [1])
            li = s.get_model("wide-noext-offset").layer(1)
            assert li.index_kind == "hnsw_binary"
            assert not li.index_recall_ok or li.index_params["ef_search"] > WIDE_BINARY_MAX_EF
        finally:
            s.conn.rollback()
            s.conn.execute("CREATE EXTENSION IF NOT EXISTS vectorscale")
            s.conn.commit()


def test_downgrade_drops_diskann_indexes_and_restores_the_old_functions(empty_db_url):
    from latentlens import migrate

    migrate.upgrade(empty_db_url)
    data = rows(300, seed=9)
    with Store.open(empty_db_url) as s:
        info, _ = fill(s, "wide-down", data)
        s.build_index(info, [1], kind="diskann")
    migrate.downgrade(empty_db_url, "0005")
    with psycopg.connect(empty_db_url) as conn:
        layer = "SELECT index_kind FROM model_layer WHERE model_id = %s"
        assert conn.execute(layer, (info.id,)).fetchone()[0] is None
        assert conn.execute("SELECT to_regclass(llens_leaf_name(%s, 1) || '_ann')", (info.id,)).fetchone()[0] is None
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE model_layer SET index_kind = 'diskann' WHERE model_id = %s", (info.id,))
        conn.rollback()
        # revision 0002's build: binary HNSW for a wide layer, and still SECURITY DEFINER
        conn.execute("SELECT llens_build_index(%s, 1)", (info.id,))
        assert conn.execute(layer, (info.id,)).fetchone()[0] == "hnsw_binary"
        assert conn.execute("SELECT bool_and(prosecdef) FROM pg_proc WHERE proname = 'llens_build_index'"
                            ).fetchone()[0]
        conn.commit()
    migrate.upgrade(empty_db_url)
    assert migrate.current_revision_url(empty_db_url) == migrate.head_revision()


def test_binary_hnsw_that_misses_the_recall_target_is_replaced_by_diskann(db_url):
    """Rows whose sign bits barely differ (a large positive offset on every dimension): binary
    HNSW's candidates are chance, its calibration fails, and the default build keeps DiskANN,
    whose quantization thresholds each dimension at its mean."""
    data = offset_rows(1500)
    with Store.open(db_url) as s:
        if not s.vectorscale_installed():
            pytest.skip("this server has no pgvectorscale")
        info, _ = fill(s, "wide-offset", data)
        events = []
        s.build_index(info, [1], progress=events.append)
        li = s.get_model("wide-offset").layer(1)
        assert li.index_kind == "diskann"
        assert li.index_recall_ok and li.index_params["recall_at_10"] >= RECALL_TARGET
        assert any("short of its recall target" in e.phase for e in events)
        # and binary HNSW alone, asked for, keeps its failed calibration: the policy will not use it
        s.build_index(info, [1], kind="hnsw_binary")
        li = s.get_model("wide-offset").layer(1)
        assert li.index_kind == "hnsw_binary" and not li.index_recall_ok


def test_cli_index_build_kind(wide, db_url):
    from click.testing import CliRunner
    from latentlens.cli.main import cli

    res = CliRunner().invoke(cli, ["index", "build", wide["info"].name, "--kind", "hnsw_halfvec", "--no-progress"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "at most 4000" in res.output
    res = CliRunner().invoke(cli, ["index", "build", wide["info"].name, "--kind", wide["kind"], "--no-progress"])
    assert res.exit_code == 0, res.output
