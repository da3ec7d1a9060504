"""latentlens on a real Citus cluster: a coordinator and two workers on this machine.

The cluster comes from bench/citus_cluster.py: Citus built once from ``shared/citus/``
(cached under .cache/citus/ by its source hash) into a copy of the embedded server's
install tree, three data dirs on local ports. Each test here failed on a cluster before
revision 0009 and the store's Citus paths (docs/scaling.md, "Verified on a cluster").
Marked ``citus``: ``-m 'not citus'`` leaves them out; without ``shared/citus/`` they skip.
The refusal of ``llens db distribute`` on a single server needs no cluster and always runs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.store import EmbeddingBatch, Store

REPO = Path(__file__).resolve().parents[1]
SHARDS = 4


def _bench():
    spec = importlib.util.spec_from_file_location("citus_cluster", REPO / "bench" / "citus_cluster.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["citus_cluster"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def cluster():
    """Coordinator + 2 workers, migrated and distributed (a reader role granted before)."""
    cc = _bench()
    try:
        cc.citus_source()
    except SystemExit as e:
        pytest.skip(f"no Citus source: {e}")
    with cc.cluster(workers=2) as c:
        url = c.coordinator.url
        r = CliRunner().invoke(cli, ["db", "upgrade", "--database-url", url])
        assert r.exit_code == 0, r.output
        r = CliRunner(env={"LLENS_TEST_PW": "pw"}).invoke(
            cli, ["db", "grant-reader", "citus_reader", "--password-env", "LLENS_TEST_PW", "--database-url", url])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(cli, ["db", "distribute", "--shards", str(SHARDS), "--database-url", url])
        assert r.exit_code == 0, r.output
        yield c


def _workers(cluster):
    return cluster.nodes[1:]


def _synthetic_model(store: Store, name: str, dim: int = 64, sentences: int = 400):
    info = store.register_model(name, hidden_size=dim, num_layers=3)
    info = store.ensure_layers(info, [1, 2, 3])
    store.set_vocabulary(info, [f"t{i}" for i in range(300)])
    corpus = store.register_corpus(f"{name}-corpus", content_hash=name)
    sids = store.add_sentences(corpus, [f"{name} sentence {i}" for i in range(sentences)])
    return store.get_model(name), sids


WRITER = """
import sys, numpy as np
from latentlens.store import Store, EmbeddingBatch
store = Store.open(sys.argv[1], upgrade=False)
info = store.get_model(sys.argv[2])
# both writers register the corpus and its sentences, as two shards of one ingest do
corpus = store.register_corpus(sys.argv[2] + "-corpus", content_hash=sys.argv[2])
store.add_sentences(corpus, [f"{sys.argv[2]} sentence {i}" for i in range(400)])
sids = np.array(store._fetch("SELECT s.id FROM sentence s JOIN corpus c ON c.id = s.corpus_id "
                             "WHERE c.name = %s ORDER BY s.id", (sys.argv[2] + "-corpus",))).ravel()
who = int(sys.argv[3])
rng = np.random.default_rng(who)
for b in range(12):
    m = 100
    idx = np.arange(m) + (b * 2 + who) * m
    store.write_embeddings(info, EmbeddingBatch(
        sentence_id=sids[idx // 8], position=(idx % 8 + 1).astype(np.int32),
        token_id=rng.integers(0, 300, m).astype(np.int32), char_start=np.full(m, -1, np.int32),
        char_end=np.full(m, -1, np.int32), prefix_hash=idx.astype(np.int64),
        vectors={layer: rng.standard_normal((m, 64)).astype(np.float32) for layer in (1, 2, 3)}),
        max_contexts_per_token=1000000)
"""


@pytest.fixture(scope="session")
def written(cluster):
    """Two writer processes at once into one model (as two `llens ingest --shard` do)."""
    url = cluster.coordinator.url
    with Store.open(url, upgrade=False) as store:
        _synthetic_model(store, "syn")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, "syn", str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    return {"url": url, "exit": [p.returncode for p in procs], "errors": errors}


@pytest.mark.citus
def test_distribute_made_the_planned_tables(cluster):
    rows = dict(cluster.coordinator.sql(
        "SELECT table_name::text, citus_table_type FROM citus_tables"))
    for t in ("model", "model_layer", "token", "token_quota", "corpus", "sentence"):
        assert rows.get(t) == "reference", (t, rows)
    assert rows.get("token_embedding") == "distributed"
    # the view and llens_contexts came back, and the grant the reader had on the view
    assert cluster.coordinator.sql("SELECT has_table_privilege('citus_reader', 'token_context', 'SELECT')")[0][0]
    r = CliRunner().invoke(cli, ["db", "distribute", "--database-url", cluster.coordinator.url])
    assert r.exit_code == 0 and "Already distributed" in r.output, r.output


@pytest.mark.citus
def test_two_writers_of_one_model_do_not_deadlock(written):
    # before: "canceling the transaction since it was involved in a distributed deadlock"
    # (token_quota) and "deadlock detected" (sentences inserted by both)
    assert written["exit"] == [0, 0], written["errors"]
    with Store.open(written["url"], upgrade=False) as store:
        info = store.get_model("syn")
        assert [li.row_count for li in info.layers] == [2400, 2400, 2400]
        assert store._fetch("SELECT sum(used) FROM token_quota WHERE model_id = %s", (info.id,))[0][0] == 2400


@pytest.mark.citus
def test_leaves_are_distributed_with_their_storage(cluster, written):
    # before: "alter table command is currently unsupported" (SET STORAGE on a distributed leaf)
    coord = cluster.coordinator
    leaf = coord.sql("SELECT llens_leaf_name((SELECT llens_model_id('syn')), 2)")[0][0]
    assert coord.sql("SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = %s::regclass", (leaf,))[0][0] == SHARDS
    # shards are hidden from a worker's catalog queries: ask each shard through the coordinator
    storages = [r[0] for r in coord.sql(
        "SELECT result FROM run_command_on_shards(%s, $$SELECT attstorage FROM pg_attribute "
        "WHERE attrelid = '%%s'::regclass AND attname = 'embedding'$$)", (leaf,))]
    assert storages == ["p"] * SHARDS  # PLAIN on every shard, as on one server


@pytest.mark.citus
def test_a_finished_run_is_recorded(written):
    # before: "non-IMMUTABLE functions are not allowed in CASE or COALESCE statements"
    with Store.open(written["url"], upgrade=False) as store:
        info = store.get_model("syn")
        run = store.create_run(info, store.get_corpus("syn-corpus"), layers=[1, 2, 3], params={"t": 1})
        assert store.finish_run(run.id, "done")
        assert store.get_run(run.id).status == "done"
        assert store._fetch("SELECT finished_at IS NOT NULL FROM ingest_run WHERE id = %s", (run.id,))[0][0]


@pytest.mark.citus
def test_contexts_and_knn_on_the_cluster(written):
    # before: "cannot push down this subquery" (the LATERAL ... OFFSET 0 lookup)
    with Store.open(written["url"], upgrade=False) as store:
        info = store.get_model("syn")
        keys = [(1, int(s), int(p)) for s, p in store._fetch(
            "SELECT sentence_id, position FROM token_embedding WHERE model_id = %s AND layer = 1 "
            "ORDER BY sentence_id, position LIMIT 25", (info.id,))]
        found = store.contexts(info, keys + [(2, keys[0][1], 99)])  # one key that is not stored
        assert sorted(found) == sorted(keys)
        assert all(c.sentence.startswith("syn sentence ") for c in found.values())
        q = np.array(store._fetch("SELECT embedding::real[] FROM token_embedding WHERE model_id = %s "
                                  "AND layer = 1 ORDER BY sentence_id, position LIMIT 3", (info.id,)),
                     dtype=np.float32)[:, 0, :]
        res = store.knn(info, 1, q, k=5, exact=True)
        assert np.allclose(res.similarity[:, 0], 1.0, atol=2e-3)
        assert [(int(s), int(p)) for s, p in zip(res.sentence_id[:, 0], res.position[:, 0])] == \
            [k[1:] for k in keys[:3]]


@pytest.mark.citus
def test_ef_search_reaches_the_workers(cluster, written):
    # Workers searching at hnsw.ef_search = 1 return one row a shard: llens_knn's own
    # ef_search must reach them. Before: SHARDS rows instead of 10.
    coord = cluster.coordinator
    with Store.open(written["url"], upgrade=False) as store:
        info = store.get_model("syn")
        store.build_index(info, [3])
    workers = _workers(cluster)
    try:
        for w in workers:
            w.sql("ALTER SYSTEM SET hnsw.ef_search = 1")
            w.sql("ALTER SYSTEM SET enable_seqscan = off")
            w.sql("SELECT pg_reload_conf()")
        probe = ("(SELECT embedding FROM token_embedding WHERE model_id = (SELECT llens_model_id('syn')) AND layer = 3 "
                 "ORDER BY sentence_id, position LIMIT 1)")
        for _ in range(50):  # the reload is a signal: wait until new backends see it
            if all(w.sql("SHOW hnsw.ef_search")[0][0] == "1" for w in workers):
                break
        n = coord.sql(f"SELECT count(*) FROM llens_knn((SELECT llens_model_id('syn')), 3, {probe}, 10, false, 100)")[0][0]
        assert n == 10
        rows = coord.sql(f"SELECT count(*) FROM llens_neighbors('syn', 3, {probe}, 10)")[0][0]
        assert rows == 10
    finally:
        for w in workers:
            w.sql("ALTER SYSTEM RESET hnsw.ef_search")
            w.sql("ALTER SYSTEM RESET enable_seqscan")
            w.sql("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from vlm_tiny import CORPUS, build_llava, sample_image

    base = tmp_path_factory.mktemp("citus-llava")
    corpus = base / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    image = base / "photo.png"
    sample_image((96, 64)).save(image)
    return {"dir": build_llava(base / "tiny-llava"), "corpus": corpus, "image": image}


def _ingest_and_query(url: str, m: dict) -> tuple[dict, list]:
    r = CliRunner().invoke(cli, ["ingest", str(m["dir"]), str(m["corpus"]), "--layers", "0,1,2,3",
                                 "--skip-positions", "0", "--no-progress", "--database-url", url])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["query", "tiny-llava", "--image", str(m["image"]), "--visual-layers", "0,2",
                                 "-k", "5", "--json", "--database-url", url])
    assert r.exit_code == 0, r.output
    with psycopg.connect(url) as conn:
        ctx = conn.execute("SELECT layer, marked_sentence, position, token FROM llens_contexts('tiny-llava') "
                           "ORDER BY 1, 2, 3").fetchall()
    return json.loads(r.stdout), ctx


@pytest.mark.citus
@pytest.mark.slow
def test_cli_ingest_and_image_query_equal_one_server(cluster, db_url, tiny_llava, one_torch_thread):
    cc = sys.modules.get("citus_cluster") or _bench()
    on_cluster, ctx_cluster = _ingest_and_query(cluster.coordinator.url, tiny_llava)
    on_one, ctx_one = _ingest_and_query(db_url, tiny_llava)
    assert ctx_cluster == ctx_one
    assert cc.same(on_cluster, on_one), cc.first_difference(on_cluster, on_one)


@pytest.mark.citus
def test_a_reader_queries_the_cluster(cluster, written):
    host = cluster.coordinator.url.split("@", 1)[1]
    reader = f"postgresql://citus_reader:pw@{host}"
    with psycopg.connect(reader) as conn:
        n = conn.execute("SELECT count(*) FROM llens_contexts('syn') WHERE layer = 1").fetchone()[0]
        assert n == 2400
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO model (name, hidden_size, num_layers) VALUES ('x', 8, 1)")


@pytest.mark.citus
def test_a_writer_appends_on_the_cluster(cluster):
    """Writers have INSERT, not UPDATE, on the reference tables (migration 0006); Citus locks a
    reference table's shards for INSERT ... ON CONFLICT only for roles that may UPDATE it, so a
    writer's registration and sentences must not use it there (they failed: permission denied)."""
    url = cluster.coordinator.url
    r = CliRunner(env={"LLENS_TEST_PW": "pw"}).invoke(
        cli, ["db", "grant-writer", "citus_writer", "--password-env", "LLENS_TEST_PW", "--database-url", url])
    assert r.exit_code == 0, r.output
    writer = f"postgresql://citus_writer:pw@{url.split('@', 1)[1]}"
    with Store.open(writer, upgrade=False) as store:
        info, sids = _synthetic_model(store, "wsyn", sentences=40)
        assert store.register_model("wsyn", hidden_size=64, num_layers=3).id == info.id  # registered once
        corpus = store.register_corpus("wsyn-corpus", content_hash="wsyn")
        again = store.add_sentences(corpus, [f"wsyn sentence {i}" for i in range(45)])
        assert list(again[:40]) == list(sids) and len(set(again)) == 45  # stored once, 5 new
        rng = np.random.default_rng(0)
        m = 40
        store.write_embeddings(info, EmbeddingBatch(
            sentence_id=np.asarray(sids), position=np.ones(m, np.int32),
            token_id=rng.integers(0, 300, m).astype(np.int32), char_start=np.full(m, -1, np.int32),
            char_end=np.full(m, -1, np.int32), prefix_hash=np.arange(m, dtype=np.int64),
            vectors={layer: rng.standard_normal((m, 64)).astype(np.float32) for layer in (1, 2, 3)}),
            max_contexts_per_token=1000000)
        assert store.get_model("wsyn").layer(1).row_count == m
    with psycopg.connect(writer) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("UPDATE sentence SET text = '' WHERE corpus_id = %s", (corpus.id,))


def test_distribute_is_refused_without_citus(db_url):
    r = CliRunner().invoke(cli, ["db", "distribute"])
    assert r.exit_code == 2
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "no Citus extension" in lines[0], r.output
    with psycopg.connect(db_url) as conn:  # nothing changed: still a plain server
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'citus'").fetchone()[0] == 0


def test_distribute_help_has_examples():
    r = CliRunner().invoke(cli, ["db", "distribute", "--help"])
    assert r.exit_code == 0 and "llens db distribute --shards" in r.output


def test_writes_check_citus_once(store):
    # the single-server path: no advisory lock, and llens_citus() is asked once per store
    assert store.citus() is False
    info, sids = _synthetic_model(store, "one-server", sentences=4)
    m = 4
    batch = EmbeddingBatch(sentence_id=sids, position=np.ones(m, np.int32), token_id=np.arange(m, dtype=np.int32),
                           char_start=np.full(m, -1, np.int32), char_end=np.full(m, -1, np.int32),
                           prefix_hash=np.arange(m, dtype=np.int64),
                           vectors={1: np.eye(m, 64, dtype=np.float32)})
    assert store.write_embeddings(info, batch, max_contexts_per_token=10) == 4
    assert store._citus is False
