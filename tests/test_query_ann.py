"""The search policy with HNSW indexes: which path each query takes, and that auto is exact
where HNSW would miss (out-of-distribution queries), and bounds on k and ef_search."""

from __future__ import annotations

import numpy as np
import pytest
from _query_data import fill

from latentlens.errors import InputError
from latentlens.query import Lens
from latentlens.search import CostModel


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


@pytest.fixture
def ann_cheap(lens, monkeypatch):
    """A cost model under which HNSW is always the cheaper path (as on a big leaf)."""
    monkeypatch.setattr(lens.searcher.costs, "scan", lambda rows, dim, nq, cached: 5.0 + 0.5 * nq)
    monkeypatch.setattr(lens.searcher.costs, "ann", lambda key, rows, nq, ef: 1e-3 * nq)
    return lens


def keys(results):
    return [{(n.layer, n.sentence_id, n.position) for n in r.neighbours} for r in results]


def paths(results, layer):
    return [r.search[layer] for r in results]


def in_distribution(indexed, n=20):
    rng = np.random.default_rng(5)
    v = indexed["vectors"][4]
    return v[rng.choice(len(v), n, replace=False)] + 0.05 * rng.normal(size=(n, v.shape[1])).astype(np.float32)


def ood_queries(indexed, n: int = 20) -> np.ndarray:
    """Random directions with the stored clusters' subspace projected out: best cosine ~0.3."""
    stacked = np.concatenate([v - v.mean(0) for v in indexed["vectors"].values()] +
                             [v.mean(0, keepdims=True) for v in indexed["vectors"].values()])
    _, _, vt = np.linalg.svd(stacked, full_matrices=False)
    basis = vt[:28]
    q = np.random.default_rng(0).normal(size=(n, 32))
    return (q - (q @ basis.T) @ basis).astype(np.float32)


def test_index_built_and_analyzed(indexed, db_url):
    import psycopg

    assert all(li.index_kind for li in indexed["info"].layers)
    with psycopg.connect(db_url) as conn:
        analyzed = conn.execute(
            "SELECT count(*) FROM pg_stat_user_tables WHERE relname LIKE %s AND last_analyze IS NOT NULL",
            (f"token_embedding_m{indexed['info'].id}_l%",)).fetchone()[0]
    assert analyzed == 2


def test_in_distribution_takes_hnsw_where_it_is_cheaper(ann_cheap, indexed):
    q = in_distribution(indexed)
    got = ann_cheap.neighbors(q, "ann-model", layers=[4], k=5)
    assert paths(got, 4) == ["ann"] * len(q)
    exact = ann_cheap.neighbors(q, "ann-model", layers=[4], k=5, mode="exact")
    assert paths(exact, 4) == ["scan"] * len(q)
    rec = np.mean([len(a & b) / 5 for a, b in zip(keys(got), keys(exact), strict=True)])
    assert rec >= 0.95


def test_ood_queries_really_are(lens, indexed):
    top = lens.neighbors(ood_queries(indexed), "ann-model", k=1, mode="exact")
    assert max(r.neighbours[0].similarity for r in top) < 0.5


def test_out_of_distribution_is_answered_exactly(ann_cheap, indexed):
    q = ood_queries(indexed)
    auto = ann_cheap.neighbors(q, "ann-model", k=10)
    assert all(set(r.search.values()) == {"scan"} for r in auto)
    exact = ann_cheap.neighbors(q, "ann-model", k=10, mode="exact")
    assert keys(auto) == keys(exact)


def test_mixed_batch_splits_by_distribution(ann_cheap, indexed):
    q = np.concatenate([in_distribution(indexed, 6), ood_queries(indexed, 4)])
    got = ann_cheap.neighbors(q, "ann-model", layers=[4], k=5)
    assert paths(got, 4) == ["ann"] * 6 + ["scan"] * 4
    exact = ann_cheap.neighbors(q, "ann-model", layers=[4], k=5, mode="exact")
    assert keys(got)[6:] == keys(exact)[6:]


def test_visual_queries_go_straight_to_the_scan(ann_cheap, indexed):
    got = ann_cheap.neighbors(in_distribution(indexed, 4), "ann-model", layers=[4], k=5, query_kind="visual")
    assert paths(got, 4) == ["scan"] * 4


def test_auto_scans_when_the_scan_is_cheaper(lens, indexed):
    # 200 sentences: a scan of the leaf costs less than hundreds of HNSW round trips
    q = in_distribution(indexed, 200)
    got = lens.search_layer("ann-model", 4, q, k=10)
    assert got.paths == ["scan"] * 200 and "cheaper" in got.reason
    assert got.estimates["scan_s"] < got.estimates["ann_s"]


def test_mode_ann_never_scans(lens, indexed):
    q = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    res = lens.neighbors(q, "ann-model", k=5, mode="ann", ef_search=100)
    assert all(set(r.search.values()) == {"ann"} for r in res)
    assert all(len(r.neighbours) == 5 for r in res)
    assert lens.neighbors(q, "ann-model", k=5, exact=False)[0].search == {0: "ann", 4: "ann"}


def test_k_and_ef_search_bounds(lens, indexed):
    q = in_distribution(indexed, 2)
    # HNSW stops at ef_search 1000: a bigger ef is clamped, a bigger k is served exactly
    assert len(lens.neighbors(q, "ann-model", k=5, mode="ann", ef_search=5000)[0].neighbours) == 5
    big = lens.search_layer("ann-model", 4, q, k=1500)
    assert big.paths == ["scan", "scan"] and "k > 1000" in big.reason
    with pytest.raises(InputError, match="k must be between 1 and 10,000"):
        lens.neighbors(q, "ann-model", k=100_000)


def test_zero_query_vector_is_an_error(lens, indexed):
    q = in_distribution(indexed, 3)
    q[1] = 0
    with pytest.raises(InputError, match="query vector 1 is all zeros"):
        lens.neighbors(q, "ann-model", k=5)


def test_cost_model_prefers_hnsw_for_few_queries_on_big_leaves():
    costs = CostModel(scan=(1.5e-10, 2e-11))  # a typical measurement
    # one text token against 1M rows: HNSW; an image's 576 patches against 36k rows: the scan
    assert costs.ann((1, 1), 1_000_000, 1, 100) < costs.scan(1_000_000, 576, 1, cached=True)
    assert costs.scan(36_000, 576, 576, cached=True) < costs.ann((1, 1), 36_000, 576, 100)
    # a cold leaf costs its copy too
    assert costs.scan(36_000, 576, 1, cached=False) > costs.scan(36_000, 576, 1, cached=True)
    costs.observe_ann((1, 1), 100, 100, 0.01)  # measured: 0.1 ms a query
    assert costs.ann((1, 1), 36_000, 10, 100) == pytest.approx(1e-3)
    # a tiny leaf's scan is overhead, not the model's terms: it must not skew big leaves
    costs.observe_scan(500, 32, 1, 0.01)
    assert costs.scan_factor == 1.0
    costs.observe_scan(1_000_000, 576, 576, 2 * costs.scan(1_000_000, 576, 576, cached=True))
    assert costs.scan_factor == pytest.approx(1.75)  # moves most of the way to the measured 2x


def test_observing_a_scan_never_measures(monkeypatch, tmp_path):
    """An exact search observes its scans' times, but the one-time measurement of the scan
    constants (~1.5 s, ~300 MiB) is only for the policy: the very first exact query paid it."""
    import latentlens.scan as scan_mod
    import latentlens.search as search_mod

    costs_file = tmp_path / "costs.json"
    monkeypatch.setattr(search_mod, "_cost_path", lambda: costs_file)
    measured = []
    monkeypatch.setattr(scan_mod, "measure_scan", lambda: measured.append(1) or {"read": 1.5e-10, "mul": 2e-11})
    costs = CostModel()
    model = 1_000_000 * 576 * (1.5e-10 + 576 * 2e-11)
    costs.observe_scan(1_000_000, 576, 576, 2 * model)
    assert measured == [] and not costs_file.exists() and costs.scan_factor == 1.0
    # the policy's first estimate measures, then counts the scan seen before
    assert costs.scan(1_000_000, 576, 576, cached=True) == pytest.approx(1.75 * model)
    assert measured == [1] and costs_file.exists()
    # a later process reads the constants kept on disk: observing them needs no measurement
    again = CostModel()
    again.observe_scan(1_000_000, 576, 576, 2 * model)
    assert measured == [1] and again.scan_factor == pytest.approx(1.75)


def test_queries_without_torch_use_the_server(db_url, indexed, tmp_path):
    """A SQL-only install (no torch): HNSW as usual, exact search inside PostgreSQL."""
    import subprocess
    import sys

    q = in_distribution(indexed, 3)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "mixed.npy", np.concatenate([in_distribution(indexed, 40), ood_queries(indexed, 4)]))
    code = (
        "import sys, json, numpy as np\n"
        "sys.modules['torch'] = None  # import torch fails, as without the models extra\n"
        "from latentlens.query import Lens\n"
        f"lens = Lens.connect({db_url!r})\n"
        f"q = np.load({str(tmp_path / 'q.npy')!r})\n"
        "a = lens.neighbors(q, 'ann-model', layers=[4], k=3, mode='ann')\n"
        "e = lens.neighbors(q, 'ann-model', layers=[4], k=3, mode='exact')\n"
        "import latentlens.search; latentlens.search.SQL_EXACT_PRIOR = 1e-3  # as on a big leaf\n"
        f"m = Lens.connect({db_url!r}).neighbors(np.load({str(tmp_path / 'mixed.npy')!r}), 'ann-model',"
        " layers=[4], k=3)  # a fresh cost model: the first batch probes HNSW's cost\n"
        "print(json.dumps([[r.search for r in a], [r.search for r in e],"
        " [[n.sentence_id for n in r.neighbours] for r in e], [r.search['4'] if '4' in r.search"
        " else r.search[4] for r in m]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    ann, exact, ids, mixed = json.loads(out.stdout)
    assert ann == [{"4": "ann"}] * 3 and exact == [{"4": "sql"}] * 3
    # auto without torch: HNSW for the near queries, PostgreSQL's exact search for the far ones
    assert mixed[:40] == ["ann"] * 40 and mixed[40:] == ["sql"] * 4
    with Lens.connect(db_url, cache_dir=tmp_path / "s") as lens:
        scan = lens.neighbors(q, "ann-model", layers=[4], k=3, mode="exact")
    assert ids == [[n.sentence_id for n in r.neighbours] for r in scan]


def test_builds_record_the_ef_search_their_recall_needs(indexed):
    for li in indexed["info"].layers:
        p = li.index_params
        assert p["recall_ok"] is True and p["recall_at_10"] >= 0.97 and p["ef_search"] in (
            40, 64, 100, 160, 250, 400, 640, 1000), p
        assert li.index_ef_search == p["ef_search"]


def test_an_index_below_its_recall_target_is_not_used_by_auto(ann_cheap, indexed, db_url):
    import psycopg

    mid = indexed["info"].id
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE model_layer SET index_params = index_params || '{\"recall_ok\": false}' "
                     "WHERE model_id = %s AND layer = 4", (mid,))
    try:
        got = ann_cheap.search_layer("ann-model", 4, in_distribution(indexed, 4), k=5)
        assert got.paths == ["scan"] * 4 and "recall target" in got.reason
        assert ann_cheap.search_layer("ann-model", 4, in_distribution(indexed, 4), k=5, mode="ann").paths == ["ann"] * 4
    finally:
        with psycopg.connect(db_url) as conn:
            conn.execute("UPDATE model_layer SET index_params = index_params || '{\"recall_ok\": true}' "
                         "WHERE model_id = %s AND layer = 4", (mid,))


def test_cli_index_calibrate(db_url, indexed):
    import json

    from click.testing import CliRunner
    from latentlens.cli.main import cli

    r = CliRunner().invoke(cli, ["index", "calibrate", "ann-model", "--layers", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["4"]["recall_ok"] is True
