"""The baselines (LogitLens, EmbeddingLens) checked against independent computations, and
through every query path: text, vectors and images, table / JSON / CSV, with and without a store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.errors import InputError
from latentlens.lenses import VocabularyLens, expand_word, parse_methods
from latentlens.models import load_language_model
from latentlens.models.tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "the dog runs in the park"
NO_DB = "postgresql://llens@127.0.0.1:1/nowhere"  # nothing listens: a baseline must not need it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("lenses")
    return {
        "llama": make_tiny_model(base / "llama", "llama"),
        "untied": make_tiny_model(base / "untied", "llama", tie=False, seed=3),
        "gemma": make_tiny_model(base / "gemma", "gemma3_text", bos=True, padding_side="left"),
    }


@pytest.mark.parametrize("which", ["llama", "untied", "gemma"])
def test_logitlens_at_the_last_layer_is_the_models_own_next_token_distribution(tiny, which):
    import transformers as tf

    lm = load_language_model(str(tiny[which]))
    assert lm.heads.tied == (which != "untied")
    st = lm.hidden_states([TEXT], [lm.num_layers])[0]
    full = tf.AutoModelForCausalLM.from_pretrained(tiny[which]).eval()
    with torch.inference_mode():
        probs = torch.softmax(full(input_ids=torch.from_numpy(st.token_ids)[None]).logits[0].float(), -1)
    hits = VocabularyLens.of(lm).logit_lens(st.vectors[lm.num_layers], lm.num_layers, k=5)
    top = torch.topk(probs, 5)
    for t, row in enumerate(hits):
        assert [h.token_id for h in row] == top.indices[t].tolist()
        np.testing.assert_allclose([h.score for h in row], top.values[t].numpy(), rtol=1e-4, atol=1e-7)
    # below the last layer the final norm is applied first: not the raw state through the head
    mid = lm.hidden_states([TEXT], [2])[0].vectors[2]
    raw = torch.from_numpy(mid) @ lm.heads.unembedding.float().T
    normed = lm.heads.norm(torch.from_numpy(mid)) @ lm.heads.unembedding.float().T
    got = [row[0].token_id for row in VocabularyLens.of(lm).logit_lens(mid, 2, k=1)]
    assert got == normed.argmax(-1).tolist()
    assert not torch.equal(raw.argmax(-1), normed.argmax(-1)) or not torch.allclose(raw, normed)


@pytest.mark.parametrize("which", ["llama", "untied", "gemma"])
def test_embeddinglens_of_a_layer0_state_is_its_own_token(tiny, which):
    lm = load_language_model(str(tiny[which]))
    st = lm.hidden_states([TEXT], [0])[0]
    hits = VocabularyLens.of(lm).embedding_lens(st.vectors[0], k=3)
    assert [row[0].token_id for row in hits] == st.token_ids.tolist()
    assert all(row[0].score == pytest.approx(1.0, abs=1e-5) for row in hits)
    assert all(row[0].score >= row[1].score >= row[2].score for row in hits)


def test_untied_head_is_the_lm_heads_own_matrix(tiny):
    lm = load_language_model(str(tiny["untied"]))
    assert not torch.equal(lm.heads.unembedding, lm.heads.embedding)
    lean = load_language_model(str(tiny["untied"]), lens_heads=False)
    assert lean.heads is None
    with pytest.raises(InputError, match="without its LM head"):
        VocabularyLens.of(lean)


def test_vlm_logitlens_matches_the_vlms_own_logits_at_image_tokens(tmp_path):
    from vlm_checks import assert_logitlens_matches_own_logits
    from vlm_tiny import build_llava

    from latentlens.vlm.extract import load_vlm

    assert_logitlens_matches_own_logits(load_vlm(str(build_llava(tmp_path / "llava"))), (64, 64))


def test_expand_word_and_parse_methods():
    assert expand_word("a hiker walks", 3, 7) == "hiker"  # h«iker»
    assert expand_word("a hiker walks", 1, 4) == "hiker"  # « hi»ker: leading space kept out
    assert expand_word("the dog's bone", 4, 7) == "dog"  # apostrophes end a word
    assert expand_word("well-known", 5, 10) == "known"
    assert expand_word("two words", 0, 9) == "two words"  # a span with spaces stays as is
    assert expand_word("x", None, None) is None
    assert expand_word("我喜欢狗和猫", 3, 4) == "狗"  # no spaces between words: never a whole clause
    assert parse_methods("all") == ["latentlens", "logitlens", "embeddinglens"]
    assert parse_methods("embeddinglens, LogitLens") == ["logitlens", "embeddinglens"]
    with pytest.raises(InputError, match="unknown method 'tuned'"):
        parse_methods("latentlens,tuned")


def test_cli_baselines_need_no_database(tiny, monkeypatch):
    monkeypatch.setenv("LLENS_DATABASE_URL", NO_DB)
    r = CliRunner().invoke(cli, ["query", str(tiny["llama"]), "--text", TEXT, "--token", "dog",
                                 "--query-layer", "0,4", "--method", "logitlens,embeddinglens", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [(x["query_token"], x["query_layer"]) for x in out] == [("dog", 0), ("dog", 4)]
    assert out[0]["neighbours"] == [] and set(out[0]["lenses"]) == {"logitlens", "embeddinglens"}
    assert out[0]["lenses"]["embeddinglens"][0]["word"] == "dog"
    probs = [h["score"] for h in out[1]["lenses"]["logitlens"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    r = CliRunner().invoke(cli, ["query", str(tiny["llama"]), "--text", TEXT, "--method", "logitlens"])
    assert r.exit_code == 2 and "--query-layer" in r.output


def test_cli_all_methods_through_text_vectors_csv(tiny, db_url, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the dog runs in the park\na cat sits on the mat\nthe hiker walks up the hill\n")
    r = CliRunner().invoke(cli, ["ingest", str(tiny["llama"]), str(corpus), "--name", "lensy", "--layers", "2,4", "--skip-positions", "0",
                                 "--no-index", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["query", "lensy", "--text", "the dog", "--token", "dog", "--query-layer", "4",
                                 "--method", "all", "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    (res,) = json.loads(r.stdout)
    assert len(res["neighbours"]) == 3 and all("word" in n for n in res["neighbours"])
    assert res["neighbours"][0]["token"].strip() == "dog"
    assert [len(res["lenses"][m]) for m in ("logitlens", "embeddinglens")] == [3, 3]
    r = CliRunner().invoke(cli, ["query", "lensy", "--text", "the dog", "--token", "dog", "--query-layer", "4",
                                 "--method", "all", "-k", "2", "--csv"])
    lines = r.stdout.strip().splitlines()
    assert [x.split(",")[0] for x in lines[1:]] == ["latentlens"] * 2 + ["logitlens"] * 2 + ["embeddinglens"] * 2
    r = CliRunner().invoke(cli, ["query", "lensy", "--text", "the dog", "--token", "dog", "--query-layer", "4",
                                 "--method", "all", "-k", "2"])
    assert r.exit_code == 0 and "-- logitlens" in r.stdout and "probability" in r.stdout and "cosine" in r.stdout
    lm = load_language_model(str(tiny["llama"]))
    vec = lm.hidden_states(["the dog"], [4])[0].vectors[4][1:2]
    np.save(tmp_path / "v.npy", vec)
    r = CliRunner().invoke(cli, ["query", "lensy", "--vectors", str(tmp_path / "v.npy"), "--method", "all",
                                 "--query-layer", "4", "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    (vres,) = json.loads(r.stdout)
    assert vres["neighbours"][0]["token"].strip() == "dog"
    assert [h["token_id"] for h in vres["lenses"]["logitlens"]] == [h["token_id"] for h in res["lenses"]["logitlens"][:2]]
    r = CliRunner().invoke(cli, ["query", "lensy", "--vectors", str(tmp_path / "v.npy"), "--method", "logitlens"])
    assert r.exit_code == 2 and "--query-layer" in r.output and "Traceback" not in r.output


def test_image_query_all_methods_and_baselines_without_store(tmp_path, db_url, monkeypatch):
    from vlm_tiny import CORPUS, build_llava, sample_image

    model_dir = build_llava(tmp_path / "tiny-llava")
    image = tmp_path / "img.png"
    sample_image((64, 64)).save(image)
    corpus = tmp_path / "vlm-corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    r = CliRunner().invoke(cli, ["ingest", str(model_dir), str(corpus), "--layers", "1,2", "--no-index",
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["query", "tiny-llava", "--image", str(image), "--visual-layers", "1",
                                 "--patches", "center", "--method", "all", "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["methods"] == ["latentlens", "logitlens", "embeddinglens"]
    for p in d["layers"][0]["patches"]:
        assert len(p["neighbours"]) == 2 and [len(p["lenses"][m]) for m in ("logitlens", "embeddinglens")] == [2, 2]
    monkeypatch.setenv("LLENS_DATABASE_URL", NO_DB)
    r = CliRunner().invoke(cli, ["query", str(model_dir), "--image", str(image), "--visual-layers", "1",
                                 "--patches", "center", "--method", "embeddinglens", "-k", "2", "--csv"])
    assert r.exit_code == 0, r.output
    rows = r.stdout.strip().splitlines()
    assert rows[0].startswith("visual_layer,patch,row,col,method") and len(rows) == 1 + 4 * 2
    baseline = [x.split(",")[5] for x in rows[1:]]
    assert set(baseline) == {"1", "2"}  # ranks


def test_loads_in_threads_leave_later_loads_whole(tiny):
    """from_pretrained flips process-wide state while it builds a model: concurrent loads
    (two ingest shards in one process, the web app) must not leave a later LM head on 'meta'."""
    import threading

    errors: list[BaseException] = []

    def load() -> None:
        try:
            for _ in range(3):
                load_language_model(str(tiny["llama"]), lens_heads=False)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lm = load_language_model(str(tiny["llama"]))
    assert lm.heads.tied and not lm.heads.unembedding.is_meta
