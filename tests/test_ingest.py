"""llens ingest with tiny random models: exact rows vs an independent computation,
BOS / padding, prefix dedup, cap, incremental runs, CLI errors, runs listing."""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest
from _ingest_ref import compare, expected_rows, stored_rows
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.corpus import read_corpus
from latentlens.errors import ModelMismatch
from latentlens.ingest import IngestOptions, ingest
from latentlens.models import load_language_model
from latentlens.models.tiny import make_tiny_model, sample_corpus_path
from latentlens.store import Store

N = 120  # sentences of the demo corpus used here


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny_ingest")
    return {
        # SmolLM2's convention: no BOS, right padding
        "llama": make_tiny_model(base / "llama", "llama", bos=False, padding_side="right"),
        # Gemma-3's convention: BOS, left padding
        "gemma": make_tiny_model(base / "gemma", "gemma3_text", bos=True, padding_side="left"),
        "wide": make_tiny_model(base / "wide", "llama", hidden=32, layers=2),
    }


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    lines = sample_corpus_path().read_text(encoding="utf-8").splitlines()[:N]
    # a blank line, an exact duplicate and a shared prefix, on purpose
    lines = lines[:10] + ["", lines[3], "The aa lava flowed slowly and then stopped."] + lines[10:]
    path = tmp_path_factory.mktemp("corpus") / "demo.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _opts(**kw):
    return IngestOptions(progress=False, build_index=False, **kw)


def _count(url, sql, *args):
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchone()[0]


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_rows_match_independent_computation(db_url, tiny, corpus_file, which):
    lm = load_language_model(str(tiny[which]), name=f"exact_{which}")
    corpus = read_corpus(str(corpus_file))
    assert (corpus.blank, corpus.duplicates) == (1, 1)
    layers = [0, 1, 3]
    res = ingest(lm, corpus, database_url=db_url, options=_opts(layers=layers, max_contexts_per_token=4,
                                                                 batch_size=7))
    assert res.run.status == "done" and res.run.sentences_done == len(corpus)
    exp = expected_rows(lm, corpus.texts, layers, skip=2, cap=4)
    compare(db_url, lm.name, exp, layers)
    assert res.run.rows_written == len(exp)
    c = res.run.counters
    assert c["blank_lines"] == 1 and c["duplicate_lines"] == 1
    assert c["prefix_duplicates"] > 0 and c["over_cap"] > 0  # both rules did something
    if which == "gemma":
        assert lm.bos_token_id is not None and lm.padding_side == "left"
        # the BOS is position 0 and never stored; the first stored position is 2
        assert min(p for _, p in exp) == 2
    else:
        assert lm.bos_token_id is None and lm.padding_side == "right"


def _fed_tokens(lm, monkeypatch) -> list[int]:
    """Record the length of every sequence the forward is given."""
    fed: list[int] = []
    real = lm.forward

    def forward(seqs, layers):
        fed.extend(len(s) for s in seqs)
        return real(seqs, layers)

    monkeypatch.setattr(lm, "forward", forward)
    return fed


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_rows_over_the_cap_are_never_computed(db_url, tiny, corpus_file, monkeypatch, which):
    """A row the cap refuses for sure (its token full in token_quota, counting the rows planned
    before it) is not computed: each sentence runs up to its last kept row, one with none not
    at all; a second run plans with the quota the first one left. The stored rows and the
    counters are what the store's own refusal gave."""
    corpus = read_corpus(str(corpus_file))
    lm = load_language_model(str(tiny[which]), name=f"capplan_{which}")
    fed = _fed_tokens(lm, monkeypatch)
    opts = {"layers": [1, 2], "max_contexts_per_token": 3, "batch_size": 8}
    first = ingest(lm, corpus, database_url=db_url, options=_opts(limit=60, **opts))
    res = ingest(lm, corpus, database_url=db_url, options=_opts(**opts))
    assert res.run.id != first.run.id and res.run.status == "done"
    exp = expected_rows(lm, corpus.texts, [1, 2], cap=3)
    compare(db_url, lm.name, exp, [1, 2])
    # each run feeds every sentence up to its last stored position, nothing more
    last: dict[int, int] = {}
    for o, p in exp:
        last[o] = max(last.get(o, -1), p)
    assert sum(fed) == sum(p + 1 for p in last.values())
    assert sum(fed) < sum(len(e.token_ids) for e in lm.encode(corpus.texts))
    for run in (first.run, res.run):
        c = run.counters
        assert c["over_cap"] > 0 and run.rows_written + c["over_cap"] + c["prefix_duplicates"] == c["candidates"]
    assert first.run.rows_written + res.run.rows_written == len(exp)


def test_padding_side_does_not_change_rows(db_url, tiny, corpus_file):
    corpus = read_corpus(str(corpus_file))
    names = {}
    for side in ("left", "right"):
        lm = load_language_model(str(tiny["gemma"]), name=f"pad_{side}")
        lm.padding_side = side
        ingest(lm, corpus, database_url=db_url, options=_opts(layers=[2], batch_size=16))
        names[side] = stored_rows(db_url, lm.name, 2)
    left, right = names["left"], names["right"]
    assert set(left) == set(right) and len(left) > 100
    cos = [float(np.dot(left[k][3], right[k][3]) / np.linalg.norm(left[k][3]) / np.linalg.norm(right[k][3]))
           for k in left]
    assert min(cos) > 0.999


def test_rerun_is_done_and_limit_then_full_equals_full(db_url, tiny, corpus_file):
    corpus = read_corpus(str(corpus_file))
    lm = load_language_model(str(tiny["llama"]), name="incremental")
    first = ingest(lm, corpus, database_url=db_url, options=_opts(layers=[1], limit=30))
    assert first.run.sentences_done == 30
    again = ingest(lm, corpus, database_url=db_url, options=_opts(layers=[1], limit=30))
    assert again.already_done and again.run.id == first.run.id
    ingest(lm, corpus, database_url=db_url, options=_opts(layers=[1]))
    exp = expected_rows(lm, corpus.texts, [1])
    compare(db_url, "incremental", exp, [1])
    assert _count(db_url, "SELECT count(DISTINCT prefix_hash) = count(*) FROM token_embedding e "
                  "JOIN model m ON m.id = e.model_id WHERE m.name = 'incremental'")


def test_vocabulary_and_model_registration(db_url, tiny, corpus_file):
    lm = load_language_model(str(tiny["llama"]), name="vocab")
    ingest(lm, read_corpus(str(corpus_file)), database_url=db_url, options=_opts(layers=[1], limit=5))
    with psycopg.connect(db_url) as conn:
        n, t = conn.execute(
            "SELECT count(*), max(token) FILTER (WHERE token_id = 11) FROM token t JOIN model m "
            "ON m.id = t.model_id WHERE m.name = 'vocab'").fetchone()
        params = conn.execute("SELECT params FROM model WHERE name = 'vocab'").fetchone()[0]
    assert n == len(lm.tokenizer) and t == lm.tokenizer.decode([11])
    assert params["source"] == str(tiny["llama"]) and params["dtype"] == "float32"


def test_hidden_size_mismatch_is_refused(db_url, tiny, corpus_file):
    corpus = read_corpus(str(corpus_file))
    ingest(load_language_model(str(tiny["llama"]), name="clash"), corpus, database_url=db_url,
           options=_opts(layers=[1], limit=3))
    with pytest.raises(ModelMismatch):
        ingest(load_language_model(str(tiny["wide"]), name="clash"), corpus, database_url=db_url,
               options=_opts(layers=[1], limit=3))
    runs = _count(db_url, "SELECT count(*) FROM ingest_run r JOIN model m ON m.id = r.model_id "
                  "WHERE m.name = 'clash'")
    assert runs == 1


# ---------------------------------------------------------------------------
# CLI


def _one_line_error(result):
    assert result.exit_code != 0
    out = result.output.strip()
    assert "Traceback" not in out and out.startswith("Error:") and len(out.splitlines()) == 1, out
    return out


def test_cli_ingest_runs_and_index(db_url, tiny, corpus_file):
    runner = CliRunner()
    r = runner.invoke(cli, ["ingest", str(tiny["llama"]), str(corpus_file), "--name", "cli_model",
                            "--layers", "0,2", "--limit", "20", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["status"] == "done" and summary["sentences_done"] == 20 and summary["layers"] == [0, 2]
    assert "Built ANN indexes for layers 0,2" in r.stderr
    r = runner.invoke(cli, ["runs", "--json", "--model", "cli_model"])
    runs = json.loads(r.stdout)
    assert [x["status"] for x in runs] == ["done"] and runs[0]["rows"] == summary["rows_written"]
    r = runner.invoke(cli, ["runs"])
    assert "cli_model" in r.output and "done" in r.output
    r = runner.invoke(cli, ["index", "drop", "cli_model"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["index", "build", "cli_model", "--layers", "2", "--no-progress"])
    assert r.exit_code == 0 and "Built ANN indexes of 'cli_model' layers 2" in r.output, r.output
    r = runner.invoke(cli, ["index", "drop", "cli_model"])
    assert r.exit_code == 0, r.output
    # two leaves at once, each on its own connection: both indexed, with their recall measured
    r = runner.invoke(cli, ["index", "build", "cli_model", "--jobs", "2", "--no-progress"])
    assert r.exit_code == 0 and "Built ANN indexes of 'cli_model' layers 0,2" in r.output, r.output
    with Store.open(db_url) as store:
        layers = store.get_model("cli_model").layers
    assert all(li.index_kind == "hnsw_halfvec" for li in layers), layers
    r = runner.invoke(cli, ["index", "build", "cli_model", "--jobs", "0"])
    assert r.exit_code == 2 and "--jobs" in r.output
    # every layer checked before any build: an unknown one leaves the others untouched
    r = runner.invoke(cli, ["index", "drop", "cli_model"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["index", "build", "cli_model", "--layers", "0,99", "--jobs", "2", "--no-progress"])
    assert r.exit_code == 2 and "no stored layer 99" in r.output and "Traceback" not in r.output, r.output
    with Store.open(db_url) as store:
        assert all(li.index_kind is None for li in store.get_model("cli_model").layers)


def test_build_leaves_without_a_second_connection_builds_one_by_one(db_url, tiny, corpus_file, monkeypatch):
    """A full server (no sibling connection opens): the leaves are built on the caller's, all of them."""
    from latentlens.errors import LatentLensError
    from latentlens.ingest import build_leaves

    r = CliRunner().invoke(cli, ["ingest", str(tiny["llama"]), str(corpus_file), "--name", "one_conn",
                                 "--layers", "0,2", "--limit", "10", "--no-progress", "--no-index"])
    assert r.exit_code == 0, r.output

    def full(self):
        raise LatentLensError("too many clients already")

    monkeypatch.setattr(Store, "sibling", full)
    with Store.open(db_url) as store:
        info = store.get_model("one_conn")
        assert build_leaves(store, info, [0, 2], jobs=2) == [0, 2]
        assert all(li.index_kind == "hnsw_halfvec" for li in store.get_model("one_conn").layers)


def test_cli_stdin_corpus(db_url, tiny):
    r = CliRunner().invoke(cli, ["ingest", str(tiny["llama"]), "-", "--name", "stdin_model", "--no-progress",
                                 "--no-index", "--layers", "1", "--json"],
                           input="The dog runs in the park.\n\nThe dog runs in the park.\nA cat sleeps.\n")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["corpus"] == "stdin" and s["sentences_done"] == 2 and s["counters"]["blank_lines"] == 1


@pytest.mark.parametrize("args, needle", [
    (["{llama}", "/nonexistent/corpus.txt"], "corpus file not found"),
    (["/nonexistent/model", "{corpus}"], "model not found"),
    (["{llama}", "{corpus}", "--layers", "9"], "out of range"),
    (["{llama}", "{corpus}", "--layers", "x"], "--layers"),
    (["{llama}", "{corpus}", "--shard", "2/2"], "--shard"),
    (["{llama}", "{empty}"], "no sentences"),
    (["--resume", "999"], "no ingest run 999"),
    (["{bert}", "{corpus}"], "unsupported architecture 'bert'"),
])
def test_cli_errors_are_one_line(db_url, tiny, corpus_file, tmp_path, args, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    bert = tmp_path / "bert"
    if "{bert}" in args:
        import transformers as tf

        tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)).save_pretrained(bert)
    fill = {"{llama}": str(tiny["llama"]), "{corpus}": str(corpus_file), "{empty}": str(empty),
            "{bert}": str(bert)}
    r = CliRunner().invoke(cli, ["ingest", *[fill.get(a, a) for a in args], "--no-progress"])
    assert needle in _one_line_error(r)


def test_cli_model_mismatch_leaves_no_done_run(db_url, tiny, corpus_file):
    runner = CliRunner()
    ok = runner.invoke(cli, ["ingest", str(tiny["llama"]), str(corpus_file), "--name", "mm", "--limit", "3",
                             "--layers", "1", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    r = runner.invoke(cli, ["ingest", str(tiny["wide"]), str(corpus_file), "--name", "mm", "--limit", "5",
                            "--layers", "1", "--no-progress"])
    assert "hidden size" in _one_line_error(r)
    r = runner.invoke(cli, ["ingest", str(tiny["llama"]), str(corpus_file), "--name", "mm", "--limit", "5",
                            "--layers", "2", "--no-progress"])
    assert "already stores layers 1" in _one_line_error(r)
    assert _count(db_url, "SELECT count(*) FROM ingest_run r JOIN model m ON m.id = r.model_id "
                  "WHERE m.name = 'mm'") == 1


def test_failure_marks_run_failed_then_rerun_completes_exactly(db_url, tiny, corpus_file, monkeypatch):
    corpus = read_corpus(str(corpus_file))
    lm = load_language_model(str(tiny["gemma"]), name="flaky")
    real = Store.write_embeddings
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk full")
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "write_embeddings", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        ingest(lm, corpus, database_url=db_url, options=_opts(layers=[1, 2], batch_size=8))
    with psycopg.connect(db_url) as conn:
        status, error, done = conn.execute(
            "SELECT status, error, sentences_done FROM ingest_run r JOIN model m ON m.id = r.model_id "
            "WHERE m.name = 'flaky'").fetchone()
    assert (status, error, done) == ("failed", "disk full", 24)  # three chunks of 8 committed
    monkeypatch.setattr(Store, "write_embeddings", real)
    res = ingest(lm, corpus, database_url=db_url, options=_opts(layers=[1, 2], batch_size=5))
    assert res.resumed and res.run.status == "done" and res.run.sentences_done == len(corpus)
    compare(db_url, "flaky", expected_rows(lm, corpus.texts, [1, 2]), [1, 2])


def test_rerun_does_not_pull_the_corpus_texts_back(db_url, tiny, corpus_file, monkeypatch):
    from latentlens.store import Store

    corpus = read_corpus(str(corpus_file))
    lm = load_language_model(str(tiny["llama"]), name="no_pull")
    ingest(lm, corpus, database_url=db_url, options=_opts(layers=[1], limit=10))

    def refuse(self, *a, **kw):
        raise AssertionError("a rerun with the corpus file at hand read every sentence text back")

    monkeypatch.setattr(Store, "corpus_sentences", refuse)
    res = ingest(lm, corpus, database_url=db_url, options=_opts(layers=[1], limit=20))
    assert res.run.status == "done"


def test_forward_streams_default_and_bounds():
    from types import SimpleNamespace

    from latentlens.ingest import forward_streams

    cpu, cuda = SimpleNamespace(type="cpu"), SimpleNamespace(type="cuda")
    assert forward_streams(None, cpu, 2) == (2, 1)  # two windows at once, one thread each
    assert forward_streams(None, cpu, 16) == (2, 8)
    assert forward_streams(None, cpu, 1) == (1, 1)
    assert forward_streams(None, cuda, 8) == (1, 8)  # a GPU runs one stream
    assert forward_streams(3, cpu, 2) == (3, 1) and forward_streams(0, cpu, 2) == (1, 2)


def _forward_threads(lm, monkeypatch, fail_at=None):
    """Record which thread ran each forward batch; raise at the fail_at-th batch."""
    import threading

    seen: list[str] = []
    real = lm.forward

    def forward(seqs, layers):
        seen.append(threading.current_thread().name)
        if fail_at is not None and len(seen) == fail_at:
            raise RuntimeError("out of memory")
        return real(seqs, layers)

    monkeypatch.setattr(lm, "forward", forward)
    return seen


def test_two_forward_streams_store_exactly_the_rows_of_one(db_url, tiny, corpus_file, monkeypatch):
    """Windows computed two at a time on their own threads are written in corpus order and
    are bitwise the rows of one stream (the same one-thread kernels run)."""
    corpus = read_corpus(str(corpus_file))
    rows = {}
    for streams in (1, 2):
        lm = load_language_model(str(tiny["llama"]), name=f"streams{streams}")
        seen = _forward_threads(lm, monkeypatch)
        res = ingest(lm, corpus, database_url=db_url, options=_opts(
            layers=[1, 3], batch_size=5, window_batches=2, forward_streams=streams))
        assert res.run.status == "done" and res.run.sentences_done == len(corpus)
        assert any(n.startswith("llens-forward") for n in seen) == (streams == 2)
        rows[streams] = {layer: stored_rows(db_url, lm.name, layer) for layer in (1, 3)}
    for layer in (1, 3):
        one, two = rows[1][layer], rows[2][layer]
        assert set(one) == set(two) and len(one) > 100
        for key in one:
            assert one[key][:3] == two[key][:3] and np.array_equal(one[key][3], two[key][3]), key
    compare(db_url, "streams2", expected_rows(lm, corpus.texts, [1, 3]), [1, 3])


def test_a_failing_forward_stream_fails_the_run_and_a_rerun_completes_exactly(db_url, tiny, corpus_file,
                                                                              monkeypatch):
    corpus = read_corpus(str(corpus_file))
    lm = load_language_model(str(tiny["gemma"]), name="stream_fail")
    _forward_threads(lm, monkeypatch, fail_at=7)
    opts = _opts(layers=[1, 2], batch_size=4, window_batches=2, forward_streams=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        ingest(lm, corpus, database_url=db_url, options=opts)
    with psycopg.connect(db_url) as conn:
        status, error, done = conn.execute(
            "SELECT status, error, sentences_done FROM ingest_run r JOIN model m ON m.id = r.model_id "
            "WHERE m.name = 'stream_fail'").fetchone()
    # batch 7 is in the 4th window: at most the first 3 windows (24 sentences) were written, in order
    assert (status, error) == ("failed", "out of memory") and 0 <= done <= 24 and done % 4 == 0
    monkeypatch.undo()
    res = ingest(lm, corpus, database_url=db_url, options=opts)
    assert res.resumed and res.run.status == "done" and res.run.sentences_done == len(corpus)
    compare(db_url, "stream_fail", expected_rows(lm, corpus.texts, [1, 2]), [1, 2])


def test_cli_ingest_ef_construction_reaches_every_index_build(db_url, tiny, corpus_file):
    """--ef-construction (default unchanged: 64) goes to each of the parallel builds; the
    recall each index then reaches is measured and recorded as always."""
    from latentlens.store import Store

    runner = CliRunner()
    for name, extra, want in (("efc_default", [], 64), ("efc_32", ["--ef-construction", "32"], 32)):
        r = runner.invoke(cli, ["ingest", str(tiny["llama"]), str(corpus_file), "--name", name, "--layers",
                                "0,1,2", "--limit", "30", "--index-jobs", "2", "--no-progress", *extra])
        assert r.exit_code == 0, r.output
        with Store.open(db_url) as store:
            for li in store.get_model(name).layers:
                assert li.index_params["ef_construction"] == want, (name, li.layer, li.index_params)
                assert li.index_params.get("recall_at_10") is not None
    r = runner.invoke(cli, ["ingest", str(tiny["llama"]), str(corpus_file), "--ef-construction", "2"])
    assert r.exit_code == 2 and "ef-construction" in r.output
