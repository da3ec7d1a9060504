"""The query API (Lens) and `llens query` / `llens models` on synthetic stored rows."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _query_data import WORDS, brute_force, fill, spans
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.errors import DimensionMismatch, EmptyResult, UnknownLayer, UnknownModel
from latentlens.query import Lens, QueryResult, load_vectors


@pytest.fixture(scope="module")
def data(db_url):
    from latentlens.store import Store

    with Store.open(db_url) as s:
        d = fill(s, "qm", n_sentences=50)
        s.register_model("qm-empty", hidden_size=32, num_layers=4)
        s.ensure_layers("qm-empty", [0, 2])
        return d


@pytest.fixture
def lens(db_url, tmp_path):
    with Lens.connect(db_url, cache_dir=tmp_path / "scan") as lens:
        yield lens


def test_neighbors_merge_layers_like_reference(lens, data):
    rng = np.random.default_rng(4)
    queries = rng.normal(size=(6, 32)).astype(np.float32)
    results = lens.neighbors(queries, "qm", k=7)
    want = brute_force(data["vectors"], queries, 7)
    assert [r.index for r in results] == list(range(6))
    for r, w in zip(results, want, strict=True):
        got = [(n.layer, n.sentence_id, n.position) for n in r.neighbours]
        exp = [(layer, int(data["sentence_id"][row]), int(data["position"][row])) for _, layer, row in w]
        assert got == exp
        sims = [n.similarity for n in r.neighbours]
        assert sims == sorted(sims, reverse=True)
        np.testing.assert_allclose(sims, [s for s, _, _ in w], atol=2e-3)
        assert r.per_layer is None


def test_neighbour_context_and_layers_subset(lens, data):
    row = 5
    v = data["vectors"][4][row]
    [r] = lens.neighbors(torch.from_numpy(v), "qm", layers=[4], k=3, exact=True)
    top = r.neighbours[0]
    assert top.layer == 4 and top.similarity > 0.999
    assert top.sentence_id == data["sentence_id"][row] and top.position == data["position"][row]
    assert top.token == WORDS[data["token_id"][row]] and top.token_id == data["token_id"][row]
    assert top.sentence[top.char_start: top.char_end] == top.token
    assert "[[" + top.token + "]]" in top.marked_sentence()
    assert all(n.layer == 4 for n in r.neighbours)


def test_provenance_in_one_round_trip(lens, data, monkeypatch):
    """What every answer carries costs one query (it took three, each its own transaction)."""
    s = lens.store
    s.register_model("qm-prov", hidden_size=32, num_layers=4)
    s.ensure_layers("qm-prov", [0, 2])
    info, corpus = s.get_model("qm-prov"), s.get_corpus("corpus-qm")
    runs = [s.create_run(info, corpus, layers=[0, 2], params={}).id for _ in range(2)]
    s.finish_run(runs[0], "done")
    calls = []
    fetch = type(s)._fetch
    monkeypatch.setattr(type(s), "_fetch", lambda self, *a: calls.append(a[0]) or fetch(self, *a))
    p = s.provenance(info, [0], {0: ["scan"]})
    assert len(calls) == 1
    monkeypatch.undo()
    assert p["database"] == s.instance_id() and p["by"] == s.current_user() and p["at"]
    assert p["corpora"] == [{"id": corpus.id, "name": "corpus-qm", "content_hash": corpus.content_hash,
                             "sentences": 50, "ingest_runs": runs, "complete": False}]
    assert set(p["layers"]) == {"0"} and p["search"] == {"0": ["scan"]}
    empty = s.provenance(s.get_model("qm-empty"))
    assert empty["corpora"] == [] and empty["database"] == p["database"] and set(empty["layers"]) == {"0", "2"}


def test_contexts_probe_sentences_and_tokens_by_key(lens, data):
    """A few keys read a few sentences: the lookup is primary-key probes whatever the corpus's
    size (a plain join hashed the sentence table whole, its keys estimated once per leaf of
    the model: 20 ms of a 590-key lookup at 97k sentences; the token table here is one page)."""
    from latentlens.store.search import CONTEXTS

    s = lens.store
    c = s.register_corpus("corpus-big", content_hash="big" * 16)
    s.add_sentences(c, [f"filler sentence number {i}" for i in range(5000)])
    with s.transaction() as conn:
        conn.execute("ANALYZE sentence")
        conn.execute("ANALYZE token")
    info = s.get_model("qm")
    # every row of every layer: enough keys that a hash of the sentence table looks cheaper
    keys = [(layer, int(sid), int(pos)) for layer in (0, 4, 8)
            for sid, pos in zip(data["sentence_id"], data["position"], strict=True)]
    params = {"m": info.id, "l": [k[0] for k in keys], "s": [k[1] for k in keys], "p": [k[2] for k in keys]}
    plan = "\n".join(r[0] for r in s._fetch("EXPLAIN " + CONTEXTS, params))
    assert "Seq Scan on sentence" not in plan and "Index Scan using sentence_pkey" in plan, plan
    got = s.contexts(info, keys)
    assert set(got) == set(keys)
    for layer, sid, pos in keys[::50]:
        ctx = got[(layer, sid, pos)]
        assert ctx.sentence[ctx.char_start:ctx.char_end] == ctx.token


def test_per_layer_keeps_each_layers_topk(lens, data):
    q = np.random.default_rng(5).normal(size=(2, 32))
    rs = lens.neighbors(q, "qm", k=4, per_layer=True)
    for r in rs:
        assert sorted(r.per_layer) == [0, 4, 8]
        for layer, ns in r.per_layer.items():
            assert len(ns) == 4 and all(n.layer == layer for n in ns)
        merged = sorted((n for ns in r.per_layer.values() for n in ns), key=lambda n: -n.similarity)[:4]
        assert [n.similarity for n in merged] == [n.similarity for n in r.neighbours]
        d = r.to_dict()
        assert set(d["per_layer"]) == {"0", "4", "8"}
        json.dumps(d)


def test_errors_name_what_exists(lens, data):
    with pytest.raises(UnknownModel, match="'qm'"):
        lens.neighbors(np.ones(32), "nope")
    with pytest.raises(UnknownLayer, match="stored layers: 0, 4, 8"):
        lens.neighbors(np.ones(32), "qm", layers=[3])
    with pytest.raises(DimensionMismatch, match="hidden size 32"):
        lens.neighbors(np.ones((2, 16)), "qm")
    with pytest.raises(EmptyResult, match="no rows"):
        lens.neighbors(np.ones(32), "qm-empty")


def test_to_dataframe(lens, data):
    rs = lens.neighbors(np.ones((2, 32)), "qm", k=3)
    df = Lens.to_dataframe(rs)
    assert len(df) == 6
    assert {"query_index", "token", "similarity", "layer", "sentence", "char_start"} <= set(df.columns)


def test_models_summary(lens, data):
    ms = {m["model"]: m for m in lens.models()}
    assert ms["qm"]["rows"] == data["info"].row_count
    assert [li["layer"] for li in ms["qm"]["layers"]] == [0, 4, 8]
    assert ms["qm-empty"]["rows"] == 0


class FakeLM:
    """Stands in for latentlens.models: 'hidden states' are the stored cluster rows of each word."""

    def __init__(self, data):
        self.data = data

    def hidden_states(self, texts, layers):
        out = []
        for t in texts:
            words = t.split(" ")
            rows = [int(np.flatnonzero(self.data["token_id"] == WORDS.index(w))[0]) for w in words]
            out.append(SimpleNamespace(
                text=t, tokens=words, spans=np.array(spans(t)), token_ids=np.array([WORDS.index(w) for w in words]),
                vectors={layer: self.data["vectors"][layer][rows] for layer in layers},
            ))
        return out


def test_query_text_with_token_and_layers(lens, data, monkeypatch):
    monkeypatch.setattr(Lens, "language_model", lambda self, m, **kw: FakeLM(data))
    rs = lens.query_text("qm", "a brown dog", token="dog", query_layers=[4, 8], k=3)
    assert [(r.query_token, r.query_layer, r.index) for r in rs] == [("dog", 4, 2), ("dog", 8, 2)]
    for r in rs:
        assert r.neighbours[0].token == "dog" and r.neighbours[0].similarity > 0.999
    allr = lens.query_text("qm", "a brown dog", k=2)
    assert len(allr) == 3 * 3  # every token at every stored layer


def _cli(db_url, *args):
    return CliRunner().invoke(cli, [*args, "--database-url", db_url], catch_exceptions=False)


def test_cli_query_vectors_json_csv_table(db_url, data, tmp_path):
    q = np.asarray(data["vectors"][8][:3])
    np.save(tmp_path / "q.npy", q)
    r = _cli(db_url, "query", "qm", "--vectors", str(tmp_path / "q.npy"), "-k", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out) == 3 and len(out[0]["neighbours"]) == 2
    n = out[0]["neighbours"][0]
    assert {"token", "token_id", "similarity", "layer", "sentence_id", "sentence", "position",
            "char_start", "char_end"} <= set(n)
    assert n["layer"] == 8 and n["similarity"] > 0.999
    r = _cli(db_url, "query", "qm", "--vectors", str(tmp_path / "q.npy"), "-k", "2", "--csv")
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("method,query_index,") and len(lines) == 1 + 3 * 2
    assert all(line.startswith("latentlens,") for line in lines[1:])
    torch.save(torch.from_numpy(q[0]), tmp_path / "q.pt")
    r = _cli(db_url, "query", "qm", "--vectors", str(tmp_path / "q.pt"), "--layers", "8")
    assert r.exit_code == 0, r.output
    assert "vector 0" in r.output and "«" in r.output and "similarity" in r.output


def test_cli_query_errors(db_url, data, tmp_path):
    np.save(tmp_path / "bad.npy", np.ones((2, 5), np.float32))
    r = _cli(db_url, "query", "qm", "--vectors", str(tmp_path / "bad.npy"))
    assert r.exit_code != 0 and "hidden size 32" in r.output and "Traceback" not in r.output
    r = _cli(db_url, "query", "nope", "--vectors", str(tmp_path / "bad.npy"))
    assert r.exit_code != 0 and "'qm'" in r.output
    r = _cli(db_url, "query", "qm")
    assert r.exit_code == 2 and "exactly one of" in r.output


def test_cli_bad_input_exits_2_as_documented(db_url, data, tmp_path):
    """README: 2 = bad input. Unknown model, unknown layer, wrong dimension, zero vector, huge k."""
    np.save(tmp_path / "q.npy", np.ones((2, 32), np.float32))
    np.save(tmp_path / "q5.npy", np.ones((2, 5), np.float32))
    np.save(tmp_path / "zero.npy", np.zeros((1, 32), np.float32))
    for args, needle in [
        (("query", "nope", "--vectors", str(tmp_path / "q.npy")), "unknown model"),
        (("query", "qm", "--vectors", str(tmp_path / "q.npy"), "--layers", "7"), "no stored layer 7"),
        (("query", "qm", "--vectors", str(tmp_path / "q5.npy")), "hidden size 32"),
        (("query", "qm", "--vectors", str(tmp_path / "zero.npy")), "all zeros"),
        (("query", "qm", "--vectors", str(tmp_path / "q.npy"), "-k", "100000"), "k must be between"),
    ]:
        r = _cli(db_url, *args)
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, (args, r.output)


def test_json_says_which_path_answered(db_url, data, tmp_path):
    np.save(tmp_path / "q.npy", data["vectors"][4][:2])
    r = _cli(db_url, "query", "qm", "--vectors", str(tmp_path / "q.npy"), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out[0]["search"] == {"0": "scan", "4": "scan", "8": "scan"}  # no index on these layers


def test_cli_models(db_url, data):
    r = _cli(db_url, "models", "--json")
    assert r.exit_code == 0, r.output
    names = {m["model"]: m for m in json.loads(r.output)}
    assert names["qm"]["corpora"] == [] or isinstance(names["qm"]["corpora"], list)
    r = _cli(db_url, "models")
    assert "qm" in r.output and "0,4,8" in r.output


def test_load_vectors_formats(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2, 4), "b": torch.zeros(4)}, str(tmp_path / "x.safetensors"))
    assert load_vectors(str(tmp_path / "x.safetensors"), "b").shape == (4,)
    from latentlens.errors import InputError

    with pytest.raises(InputError, match="a, b"):
        load_vectors(str(tmp_path / "x.safetensors"))
    torch.save({"v": SimpleNamespace()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="weights-only"):
        load_vectors(str(tmp_path / "evil.pt"))


def test_result_types_are_plain():
    r = QueryResult(index=0, neighbours=[], per_layer=None, query_token=None, query_layer=None)
    assert r.to_dict()["neighbours"] == []


def test_select_tokens_skips_special_tokens():
    from latentlens.errors import InputError
    from latentlens.query import select_tokens

    text = "a dog"
    tokens, sp = ["<s>", "a", " dog"], np.array([[-1, -1], [0, 1], [1, 5]])
    assert select_tokens(tokens, sp, text, None) == [1, 2]
    assert select_tokens(tokens, sp, text, "dog") == [2]
    with pytest.raises(InputError, match="' dog'"):
        select_tokens(tokens, sp, text, "cat")


def test_a_few_queries_scan_the_layers_side_by_side(lens, data, monkeypatch):
    """8 queries over 3 layers: the layers the scan answers are scanned together
    (ScanEngine.search_many, a leaf per worker thread), each equal to its own search."""
    import threading

    from latentlens import scan as scan_mod

    monkeypatch.setattr(scan_mod, "_cores", lambda: 2)  # side by side even on one core
    monkeypatch.setenv("LLENS_SCAN_SIDE_BY_SIDE", "1")
    q = np.random.default_rng(8).normal(size=(8, 32)).astype(np.float32)
    names = []
    search_leaf = lens.scan.search_leaf
    monkeypatch.setattr(lens.scan, "search_leaf", lambda *a, **kw: names.append(threading.current_thread().name)
                        or search_leaf(*a, **kw))
    for mode in ("exact", "auto"):
        names.clear()
        results = lens.neighbors(q, "qm", k=5, per_layer=True, mode=mode)
        assert len(names) == 3 and all(n.startswith("llens-leaf") for n in names)
        for layer in (0, 4, 8):
            one = lens.search_layer("qm", layer, q, k=5, mode="exact")
            assert [[n.sentence_id for n in r.per_layer[layer]] for r in results] == one.result.sentence_id.tolist()
            assert {r.search[layer] for r in results} == {"scan"}


def test_an_answer_reads_its_sentences_and_provenance_in_one_transaction(lens, data, monkeypatch):
    """contexts and provenance share one transaction (Store.reading): a BEGIN / COMMIT pair
    each was two more round trips per answer."""
    q = np.random.default_rng(9).normal(size=(3, 32)).astype(np.float32)
    lens.neighbors(q, "qm", k=3, mode="exact")  # the leaves cached, the model read once
    opened = []
    transaction = type(lens.store).transaction

    def counted(self):
        opened.append(1)
        return transaction(self)

    monkeypatch.setattr(type(lens.store), "transaction", counted)
    [r, *_] = lens.neighbors(q, "qm", k=3, mode="exact")
    assert r.provenance["model"]["name"] == "qm" and r.neighbours[0].sentence
    assert len(opened) == 2  # get_model, then contexts + provenance together


def test_reading_rolls_back_on_error_and_nests(lens, data):
    import psycopg

    store = lens.store
    with pytest.raises(psycopg.errors.UndefinedTable), store.reading():
        with store.reading():  # nested: the same transaction
            assert store._fetch("SELECT 1") == [(1,)]
        store._fetch("SELECT * FROM no_such_table")
    assert not store._reading
    assert store._fetch("SELECT 2") == [(2,)]  # the connection is usable again


def test_a_transaction_inside_reading_leaves_the_outer_one_open(lens, data):
    """context_columns opens a transaction() (a savepoint inside reading()): closing it must not
    roll back the outer transaction by hand (psycopg forbids it inside a Transaction context)."""
    store = lens.store
    with store.reading():
        with store.transaction() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert store._fetch("SELECT 2") == [(2,)]  # still inside, still usable
    assert store._depth == 0
    assert store._fetch("SELECT 3") == [(3,)]


def test_search_model_is_get_model_and_ann_supported(lens, data):
    """What a search reads first, in one query: the model (fresh) and the server's ANN support."""
    s = lens.store
    info, ann = s.search_model("qm")
    assert info == s.get_model("qm") and ann is s.ann_supported()
    assert s.search_model(info)[0] == info
    with pytest.raises(UnknownModel, match="unknown model 'no-such-model' .*'qm'"):
        s.search_model("no-such-model")


def test_scanned_answers_take_spans_from_the_cache(lens, data, monkeypatch):
    """An answer scanned from cached leaves reads each row's token and char span with the row
    (no key probe in the database), and they are those Store.contexts gives for its keys."""
    from latentlens.store import Store
    from latentlens.store.types import SPAN_UNKNOWN

    asked = []
    real = Store._columns

    def spy(conn, info, layer, sentence_id, position, token_id, spans=None):
        asked.append(spans)
        return real(conn, info, layer, sentence_id, position, token_id, spans)

    monkeypatch.setattr(Store, "_columns", staticmethod(spy))
    queries = np.random.default_rng(8).normal(size=(5, 32)).astype(np.float32)
    results = lens.neighbors(queries, "qm", k=6, mode="exact", per_layer=True)
    assert asked and asked[-1] is not None and (asked[-1] != SPAN_UNKNOWN).all()
    shown = [n for r in results for n in r.neighbours + (r.contexts or [])
             + [m for ns in (r.per_layer or {}).values() for m in ns]]
    want = lens.store.contexts("qm", [(n.layer, n.sentence_id, n.position) for n in shown])
    for n in shown:
        c = want[(n.layer, n.sentence_id, n.position)]
        assert (n.token, n.token_id, n.char_start, n.char_end, n.sentence) == (
            c.token, c.token_id, c.char_start, c.char_end, c.sentence)
    assert all(n.sentence[n.char_start:n.char_end] == n.token for n in shown)
