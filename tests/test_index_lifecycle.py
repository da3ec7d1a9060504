"""The ANN index life cycle: statistics after loads, plans that use the index (generic ones
too), rebuilds that never block readers, no per-row HNSW inserts on append, exactly one
shard building at the end of a sharded run."""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg
import pytest
from _query_data import fill
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.corpus import read_corpus
from latentlens.ingest import IngestOptions, ingest
from latentlens.models import load_language_model
from latentlens.models.tiny import make_tiny_model, sample_corpus_path
from latentlens.store import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_lifecycle") / "llama", "llama", bos=False,
                           padding_side="right")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    lines = sample_corpus_path().read_text(encoding="utf-8").splitlines()[:300]
    path = tmp_path_factory.mktemp("corpus") / "lifecycle.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ann_scans(url: str, index: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s", (index,)).fetchone()
    assert row is not None, f"no index {index}"
    return int(row[0])


def flush_stats(conn: psycopg.Connection) -> None:
    """Make this backend's pending statistics visible to others now."""
    conn.commit()
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.commit()
    conn.execute("SELECT 1")
    conn.commit()


@pytest.fixture(scope="module")
def ingested(db_url, tiny, corpus_file):
    r = CliRunner().invoke(cli, ["ingest", str(tiny), str(corpus_file), "--name", "life", "--layers", "1,2",
                                 "--no-progress", "--max-contexts-per-token", "1000"])
    assert r.exit_code == 0, r.output
    assert "Built ANN indexes for layers 1,2" in r.output
    with Store.open(db_url) as s:
        info = s.get_model("life")
        v = np.concatenate([vec for _, vec in s.iter_layer(info, 2)]).astype(np.float32)
    return {"info": info, "leaf": f"token_embedding_m{info.id}_l2", "rows": v}


def test_leaves_are_analyzed_after_ingest(db_url, ingested):
    with psycopg.connect(db_url) as conn:
        n, last = conn.execute("SELECT reltuples, (SELECT last_analyze FROM pg_stat_user_tables WHERE relname = %s) "
                               "FROM pg_class WHERE relname = %s", (ingested["leaf"], ingested["leaf"])).fetchone()
    assert last is not None and n == ingested["info"].layer(2).row_count


@pytest.mark.parametrize("plan_cache_mode", ["auto", "force_generic_plan"])
def test_llens_neighbors_uses_the_index_right_after_ingest(db_url, ingested, plan_cache_mode):
    idx = ingested["leaf"] + "_ann"
    before = ann_scans(db_url, idx)
    q = ingested["rows"][5]
    with psycopg.connect(db_url) as conn:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
        conn.execute("PREPARE nb(text, int, halfvec, int) AS SELECT * FROM llens_neighbors($1, $2, $3, $4)")
        for _ in range(7):  # past the point where PostgreSQL may switch to a generic plan
            vec = "[" + ",".join(map(str, q.tolist())) + "]"
            rows = conn.execute(f"EXECUTE nb('life', 2, '{vec}', 5)").fetchall()  # no bind params in EXECUTE
        assert rows[0][1] > 0.99  # the stored row itself
        flush_stats(conn)
    assert ann_scans(db_url, idx) >= before + 7


@pytest.mark.parametrize("plan_cache_mode", ["auto", "force_generic_plan"])
def test_store_knn_uses_the_index_right_after_ingest(db_url, ingested, plan_cache_mode):
    idx = ingested["leaf"] + "_ann"
    before = ann_scans(db_url, idx)
    with Store.open(db_url) as s:
        s.conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
        for _ in range(6):
            res = s.knn("life", 2, ingested["rows"][:4], k=3)
        assert (res.similarity[:, 0] > 0.99).all()
        flush_stats(s.conn)
    assert ann_scans(db_url, idx) >= before + 6 * 4


def test_llens_neighbors_restores_the_callers_ef_search(db_url, ingested):
    q = "[" + ",".join(map(str, ingested["rows"][0].tolist())) + "]"
    with psycopg.connect(db_url) as conn:
        conn.execute("SET LOCAL hnsw.ef_search = 7")
        n = len(conn.execute("SELECT * FROM llens_neighbors('life', 2, %s::halfvec, 50)", (q,)).fetchall())
        assert n == 50  # served with ef_search >= k ...
        assert conn.execute("SHOW hnsw.ef_search").fetchone()[0] == "7"  # ... and the caller's value is back


def test_reader_keeps_answering_while_the_index_is_rebuilt(db_url):
    with Store.open(db_url) as s:
        d = fill(s, "rebuild", dim=48, layers=(1,), n_sentences=2500)
        s.build_index("rebuild")
        info = s.get_model("rebuild")
    q = "[" + ",".join(map(str, d["vectors"][1][0].tolist())) + "]"
    done = threading.Event()
    errors: list[BaseException] = []

    def build() -> None:
        try:
            with Store.open(db_url) as s2:
                s2.build_index("rebuild", m=24, ef_construction=200)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()

    answered = 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '2s'")  # a blocked reader fails instead of waiting out the build
        t = threading.Thread(target=build)
        t.start()
        time.sleep(0.3)  # the build is under way
        while not done.is_set():
            rows = conn.execute("SELECT similarity FROM llens_neighbors('rebuild', 1, %s::halfvec, 3)", (q,)).fetchall()
            assert len(rows) == 3
            answered += 1
        t.join()
    assert not errors, errors
    assert answered >= 3, f"only {answered} queries answered during the rebuild"
    with psycopg.connect(db_url) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = %s ORDER BY 1", (f"token_embedding_m{info.id}_l1",))]
    assert names == [f"token_embedding_m{info.id}_l1_ann", f"token_embedding_m{info.id}_l1_pkey"]


def test_index_build_shows_progress(db_url):
    with Store.open(db_url) as s:
        fill(s, "progress", dim=64, layers=(1,), n_sentences=2500)
        events = []
        s.build_index("progress", progress=events.append)
    assert events[-1].finished and events[-1].layer == 1
    phases = {e.phase for e in events[:-1]}
    assert phases, "pg_stat_progress_create_index was never seen during the build"


def test_appending_to_an_indexed_layer_drops_then_rebuilds(db_url, tiny, corpus_file, tmp_path):
    lm = load_language_model(str(tiny), name="append")
    corpus = read_corpus(str(corpus_file))
    said: list[str] = []
    opts = dict(layers=[1], progress=False, max_contexts_per_token=1000)
    ingest(lm, corpus, database_url=db_url, options=IngestOptions(limit=100, **opts), echo=said.append)
    assert any("Built ANN" in m for m in said)
    said.clear()
    ingest(lm, corpus, database_url=db_url, options=IngestOptions(**opts), echo=said.append)
    assert any("Dropped the ANN indexes of layers 1 while loading" in m for m in said)
    assert any("Built ANN" in m for m in said)
    with Store.open(db_url) as s:
        assert s.get_model("append").layer(1).index_kind == "hnsw_halfvec"


def test_exactly_one_shard_builds_the_indexes(db_url, tiny, corpus_file):
    corpus = read_corpus(str(corpus_file))
    said: dict[int, list[str]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def shard(i: int) -> None:
        try:
            lm = load_language_model(str(tiny), name="sharded")
            ingest(lm, corpus, database_url=db_url, echo=said[i].append,
                   options=IngestOptions(layers=[1], progress=False, shard=(i, 2)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=shard, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    built = [i for i in (0, 1) if any("Built ANN" in m for m in said[i])]
    deferred = [i for i in (0, 1) if any("deferred" in m for m in said[i])]
    assert len(built) == 1 and len(deferred) == 1 and built != deferred, said


def test_a_failed_shard_says_the_index_waits_for_it(db_url, tiny, corpus_file, monkeypatch):
    corpus = read_corpus(str(corpus_file))
    lm = load_language_model(str(tiny), name="failing-shard")

    def broken(self, *a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Store, "write_embeddings", broken)
    said: list[str] = []
    with pytest.raises(RuntimeError, match="disk full"):
        ingest(lm, corpus, database_url=db_url, echo=said.append,
               options=IngestOptions(layers=[1], progress=False, shard=(1, 3)))
    assert any("Shard 1/3" in m and "failed" in m and "llens ingest --resume" in m for m in said), said


def test_a_failed_load_says_its_dropped_indexes_wait_for_it(db_url, tiny, corpus_file, monkeypatch):
    corpus = read_corpus(str(corpus_file))
    lm = load_language_model(str(tiny), name="failing-append")
    opts = dict(layers=[1], progress=False)
    ingest(lm, corpus, database_url=db_url, options=IngestOptions(limit=50, **opts), echo=lambda m: None)

    def broken(self, *a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Store, "write_embeddings", broken)
    said: list[str] = []
    with pytest.raises(RuntimeError, match="disk full"):
        ingest(lm, corpus, database_url=db_url, echo=said.append, options=IngestOptions(**opts))
    assert any("dropped for loading" in m and "llens ingest --resume" in m for m in said), said
