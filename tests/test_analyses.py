"""Saved analyses: --save on query and report, provenance on every result, `llens analyses`,
and `llens report --analysis` rendering a saved image analysis without loading the model."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli
from vlm_tiny import CORPUS, build_llava, sample_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(*args):
    r = CliRunner().invoke(cli, list(args))
    return r


@pytest.fixture(scope="module")
def setup(db_url, tmp_path_factory):
    base = tmp_path_factory.mktemp("analyses")
    model_dir = build_llava(base / "tiny-llava")
    corpus = base / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    r = run("ingest", str(model_dir), str(corpus), "--layers", "0,1,2,3", "--skip-positions", "0",
            "--no-index", "--no-progress")
    assert r.exit_code == 0, r.output
    image = base / "photo.png"
    sample_image((64, 64)).save(image)
    return {"name": "tiny-llava", "dir": model_dir, "image": image, "base": base}


def _saved_id(output: str) -> int:
    line = next(x for x in output.splitlines() if "saved as analysis" in x)
    return int(line.split("saved as analysis ")[1].split()[0])


def test_every_result_carries_provenance(setup):
    r = run("query", setup["name"], "--text", "a red car", "--token", "car", "--query-layer", "2", "-k", "2",
            "--json")
    assert r.exit_code == 0, r.output
    (res,) = json.loads(r.stdout)
    p = res["provenance"]
    assert p["model"]["name"] == "tiny-llava" and p["latentlens_version"]
    (corpus,) = p["corpora"]
    assert len(corpus["content_hash"]) == 64 and corpus["ingest_runs"] and corpus["complete"]
    assert set(p["layers"]) == {"0", "1", "2", "3"} and p["layers"]["2"]["rows"] > 0
    assert p["search"] and all(paths for paths in p["search"].values())
    assert p["by"] and p["at"] and p["database"]


def test_text_and_vector_queries_saved_listed_shown_removed(setup, tmp_path):
    r = run("query", setup["name"], "--text", "a red car", "--token", "car", "--query-layer", "2", "-k", "2",
            "--method", "all", "--save", "--title", "red car; 'quoted' ünïcode")
    assert r.exit_code == 0, r.output
    text_id = _saved_id(r.output)
    vec = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
    np.save(tmp_path / "v.npy", vec)
    r = run("query", setup["name"], "--vectors", str(tmp_path / "v.npy"), "-k", "2", "--save", "--json")
    assert r.exit_code == 0, r.output
    vec_id = _saved_id(r.output)
    r = run("analyses", "--json")
    listed = {a["id"]: a for a in json.loads(r.stdout)}
    assert {text_id, vec_id} <= set(listed)
    assert listed[text_id]["title"] == "red car; 'quoted' ünïcode" and listed[text_id]["kind"] == "text"
    r = run("analyses", "--title", "RED CAR", "--json")
    assert [a["id"] for a in json.loads(r.stdout)] == [text_id]
    r = run("analyses", "--model", "nope", "--json")
    assert json.loads(r.stdout) == []
    r = run("analyses", "show", str(text_id), "--json")
    a = json.loads(r.stdout)
    assert a["input"] == {"text": "a red car"} and a["params"]["methods"] == ["latentlens", "logitlens",
                                                                                "embeddinglens"]
    assert a["result"][0]["lenses"]["logitlens"] and a["provenance"]["corpora"]
    r = run("analyses", "show", str(text_id))
    assert r.exit_code == 0 and "saved by" in r.output and "corpora" in r.output
    from latentlens.store import Store

    with Store.open() as store:
        v = store.get_analysis(vec_id, with_data=True)
    assert v.input["sha256"] == hashlib.sha256(v.input_data).hexdigest()
    np.testing.assert_array_equal(np.load(io.BytesIO(v.input_data)), vec)
    r = run("analyses", "rm", str(vec_id))
    assert r.exit_code == 0
    r = run("analyses", "rm", str(vec_id))
    assert r.exit_code == 2 and f"no analysis {vec_id}" in r.output
    r = run("query", setup["name"], "--text", "a car", "--title", "x")
    assert r.exit_code == 2 and "--title needs --save" in r.output


def test_saved_image_analysis_renders_without_the_model(setup, tmp_path, monkeypatch):
    r = run("query", setup["name"], "--image", str(setup["image"]), "--visual-layers", "0,2", "-k", "3",
            "--method", "all", "--patches", "center", "--save", "--json")
    assert r.exit_code == 0, r.output
    aid = _saved_id(r.output)
    printed = json.loads(r.stdout)
    r = run("report", setup["name"], "--image", str(setup["image"]), "--out", str(tmp_path / "live"),
            "--visual-layers", "1", "--save", "--title", "live report")
    assert r.exit_code == 0, r.output
    report_id = _saved_id(r.output)

    def no_model(*a, **k):
        raise AssertionError("a saved analysis must render without loading the model")

    monkeypatch.setattr("latentlens.vlm.extract.load_vlm", no_model)
    monkeypatch.setattr("latentlens.vlm.query.load_vlm_for", no_model)
    out = tmp_path / "saved"
    r = run("report", "--analysis", str(aid), "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["methods"] == ["latentlens", "logitlens", "embeddinglens"] and summary["visual_layers"] == [0, 2]
    html = (out / "report.html").read_text()
    assert printed["layers"][1]["patches"][0]["neighbours"][0]["sentence"] in html
    assert (out / "report.png").stat().st_size > 1000
    r = run("report", "--analysis", str(report_id), "--out", str(tmp_path / "again"))
    assert r.exit_code == 0, r.output
    r = run("analyses", "--kind", "image", "--json")
    assert {aid, report_id} <= {a["id"] for a in json.loads(r.stdout)}
    r = run("report", "--analysis", "999999", "--out", str(tmp_path / "x"))
    assert r.exit_code == 2 and "no analysis 999999" in r.output


def test_an_evaluation_is_an_analysis(setup):
    from latentlens.store import Store

    with Store.open() as store:
        run_ = store.create_eval_run("eval-as-analysis", model="tiny-llava", model_id=None, methods=["logitlens"],
                                     visual_layers=[1], judge="labels", judge_settings={}, settings={"seed": 0},
                                     fingerprint="f" * 64, items_planned=4)
        (a,) = [x for x in store.list_analyses(kind="eval") if x.eval_run_id == run_.id]
    assert a.title == "eval run eval-as-analysis" and a.params["judge"] == "labels"
    r = run("report", "--analysis", str(a.id), "--out", "/tmp/never")
    assert r.exit_code == 2 and "llens eval --summary" in r.output
