"""Distinct contexts: the same (sentence, position) found in two text layers is shown once, with
both layers and its best cosine, and the list still holds k of them; --json keeps the raw list."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from _query_data import WORDS, sentences, spans
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.query import Lens, Neighbour, distinct_contexts
from latentlens.store import EmbeddingBatch, Store


@pytest.fixture(scope="module")
def dup(db_url):
    """Model 'dup': layers 1 and 2 hold (nearly) the same vector for every context."""
    rng = np.random.default_rng(7)
    with Store.open(db_url) as s:
        info = s.ensure_layers(s.register_model("dup", hidden_size=16, num_layers=2, architecture="synthetic"),
                               [1, 2])
        s.set_vocabulary(info, WORDS)
        texts = sentences(30, 3)
        c = s.register_corpus("corpus-dup", content_hash=hashlib.sha256("\n".join(texts).encode()).hexdigest())
        ids = s.add_sentences(c, texts)
        sid, pos, tok, cs, ce = [], [], [], [], []
        for s_id, t in zip(ids, texts, strict=True):
            for p, (w, (a, b)) in enumerate(zip(t.split(" "), spans(t), strict=True)):
                sid.append(int(s_id))
                pos.append(p + 1)
                tok.append(WORDS.index(w))
                cs.append(a)
                ce.append(b)
        n = len(sid)
        base = rng.normal(size=(n, 16)).astype(np.float32)
        vectors = {1: base, 2: (base + 0.01 * rng.normal(size=(n, 16))).astype(np.float32)}
        s.write_embeddings(info, EmbeddingBatch(
            sentence_id=np.array(sid, dtype=np.int64), position=np.array(pos, dtype=np.int32),
            token_id=np.array(tok, dtype=np.int32), char_start=np.array(cs, dtype=np.int32),
            char_end=np.array(ce, dtype=np.int32), prefix_hash=np.arange(n, dtype=np.int64) + 5_000_000,
            vectors=vectors))
        return {"vectors": vectors, "sentence_id": sid, "position": pos}


def test_distinct_contexts_merge_layers_keep_best_cosine():
    def nb(sim, layer, sid, pos):
        return Neighbour("water", 1, sim, layer, sid, "the water here", pos, 4, 9)

    raw = [nb(0.9, 2, 10, 1), nb(0.8, 1, 10, 1), nb(0.7, 1, 11, 3), nb(0.6, 2, 11, 3), nb(0.5, 1, 12, 2)]
    got = distinct_contexts(raw)
    assert [(n.sentence_id, n.similarity, n.found_in) for n in got] == [(10, 0.9, [1, 2]), (11, 0.7, [1, 2]),
                                                                         (12, 0.5, [1])]
    assert distinct_contexts(raw, 2)[-1].sentence_id == 11
    assert "found_in" not in raw[0].to_dict() and got[0].to_dict()["found_in"] == [1, 2]


def test_lens_returns_k_distinct_contexts_and_keeps_the_raw_list(dup, db_url, tmp_path):
    q = dup["vectors"][1][:4]
    with Lens.connect(db_url, cache_dir=tmp_path / "scan") as lens:
        results = lens.neighbors(q, "dup", k=5, exact=True)
    for i, r in enumerate(results):
        raw = [(n.sentence_id, n.position) for n in r.neighbours]
        assert len(raw) == 5 and len(set(raw)) < 5  # each context comes twice in the raw merge
        keys = [(n.sentence_id, n.position) for n in r.contexts]
        assert len(keys) == 5 and len(set(keys)) == 5  # k distinct ones, not fewer
        assert keys[0] == (dup["sentence_id"][i], dup["position"][i]) and r.contexts[0].found_in == [1, 2]
        sims = [n.similarity for n in r.contexts]
        assert sims == sorted(sims, reverse=True)
        assert sims[0] == max(n.similarity for n in r.neighbours)
        d = r.to_dict()
        assert len(d["neighbours"]) == 5 and "found_in" not in d["neighbours"][0]
        assert d["contexts"][0]["found_in"] == [1, 2]


def test_cli_text_table_shows_each_context_once_with_its_layers(dup, db_url, tmp_path):
    path = tmp_path / "q.npy"
    np.save(path, dup["vectors"][1][:1])
    r = CliRunner().invoke(cli, ["query", "dup", "--vectors", str(path), "--exact"])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if x[:1].isdigit()]
    assert len(lines) == 5 and lines[0].split()[4] == "1,2"
    assert " layers " in r.output and "«" in r.output
    sentences_shown = [x.split("  ")[-1] for x in lines]
    assert len(set(sentences_shown)) == 5
    r = CliRunner().invoke(cli, ["query", "dup", "--vectors", str(path), "--exact", "--json"])
    out = json.loads(r.stdout)[0]
    assert len(out["neighbours"]) == 5 and len(out["contexts"]) == 5


def test_image_table_reads_like_the_text_table():
    from latentlens.cli.query import SENTENCE_WIDTH, render_image
    from test_report import make_result

    res = make_result(size=(240, 160), grid=(2, 3), layers=(0, 8), k=3, methods=("latentlens", "logitlens"))
    p = res.layer(8).patches[0]
    long = "word " * 60 + "the grass " + "word " * 60
    at = long.index("grass")
    p.neighbours = [Neighbour("grass", 1, 0.3, 4, 9, long, 61, at, at + 5),
                    Neighbour("grass", 1, 0.2, 8, 9, long, 61, at, at + 5),
                    Neighbour("sky", 2, 0.1, 8, 10, "blue sky", 2, 5, 8)]
    text = render_image(res)
    lines = text.splitlines()
    assert max(len(x) for x in lines) <= SENTENCE_WIDTH + 60  # was up to 393 characters
    assert "[[" not in text and "«grass»" in text
    block = text.split("visual layer 8, patch 0 (row 0, col 0)\n")[1].split("\n\n")[0].splitlines()
    assert block[0].split() == ["#", "neighbour", "word", "similarity", "layers", "sentence"]
    assert len(block) == 2 + 2 and block[2].split()[4] == "4,8"  # one context, found in two layers
    assert "visual layer 8, patch 0 (row 0, col 0) -- logitlens" in text
