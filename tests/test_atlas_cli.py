"""`llens atlas build|find|list|drop` through click's runner on a tiny LLaVA ingested by the CLI;
the --html gallery opened in headless Chromium."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli
from vlm_checks import cli_ingest
from vlm_tiny import build_llava, sample_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MODEL = "tiny-llava-atlas-cli"


@pytest.fixture(scope="module")
def built(db_url, tmp_path_factory, one_torch_thread):
    base = tmp_path_factory.mktemp("atlas-cli")
    model_dir = build_llava(base / MODEL)
    cli_ingest(model_dir, base)
    runner = CliRunner()
    images = base / "photos"
    images.mkdir()
    for i, size in enumerate([(96, 64), (64, 96), (80, 80)]):
        sample_image(size).rotate(90 * i).save(images / f"img{i}.png")
    r = runner.invoke(cli, ["atlas", "build", MODEL, "--images", str(images), "--layers", "0,2", "-k", "3",
                            "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    return {"summary": json.loads(r.stdout), "images": images, "base": base}


def test_build_summary_and_list(built):
    s = built["summary"]
    assert s["atlas"] == "photos" and s["model"] == MODEL and s["layers"] == [0, 2] and s["k"] == 3
    assert s["status"] == "done" and s["images_done"] == 3 and s["patches_done"] == 3 * 16
    r = CliRunner().invoke(cli, ["atlas", "build", MODEL, "--images", str(built["images"]), "--layers", "0,2",
                                 "-k", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "already holds every image of this collection (shard 0/1: 3 images, stored by run 1)" in r.output
    r = CliRunner().invoke(cli, ["atlas", "list", "--json"])
    assert r.exit_code == 0, r.output
    (a,) = [x for x in json.loads(r.stdout) if x["atlas"] == "photos"]
    assert a["images"] == 3 and a["patches"] == {"0": 48, "2": 48}


def _top_word(db_url: str) -> str:
    import psycopg

    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT lower(word) FROM atlas_patch_word WHERE atlas = 'photos' AND layer = 2 "
                            "AND rank = 1 GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1").fetchone()[0]


def test_find_word_table_json_csv(built, db_url):
    word = _top_word(db_url)
    runner = CliRunner()
    r = runner.invoke(cli, ["atlas", "find", "photos", "--word", word, "--layer", "2", "-k", "5", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    hits = d["hits"]
    assert 1 <= len(hits) <= 5 and all(h["layer"] == 2 for h in hits)
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)
    assert all(h["path"].endswith(".png") and len(h["box"]) == 4 for h in hits)
    r = runner.invoke(cli, ["atlas", "find", "photos", "--word", word.upper(), "--layer", "2", "-k", "5"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].split() == ["path", "patch", "row", "col", "box", "layer", "similarity", "rank"]
    assert len(r.output.splitlines()) == 2 + len(hits)
    r = runner.invoke(cli, ["atlas", "find", "photos", "--word", word, "--layer", "2", "-k", "5", "--csv"])
    assert r.exit_code == 0 and r.output.startswith("path,patch,row,col,box,layer,similarity,rank")


def test_find_text_and_gallery(built, tmp_path):
    out = tmp_path / "dogs.html"
    r = CliRunner().invoke(cli, ["atlas", "find", "photos", "--text", "a small dog runs on the grass",
                                 "--token", "dog", "--layer", "2", "-k", "4", "--json", "--html", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["token"] == "dog" and d["search"] == {"2": "exact"} and len(d["hits"]) == 4
    page = out.read_text(encoding="utf-8")
    assert page.count('<figure class="card"') == 4 and page.count("data:image/jpeg;base64,") == 8
    built["gallery"] = out


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_gallery_renders_in_chromium(built, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    out = tmp_path / "g.html"
    r = CliRunner().invoke(cli, ["atlas", "find", "photos", "--word", "the", "--html", str(out), "-k", "6"])
    assert r.exit_code == 0, r.output
    n = out.read_text(encoding="utf-8").count('<figure class="card"')
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(out.as_uri())
            assert page.locator("figure.card").count() == n
            # every crop and thumbnail decoded (a broken data URI has naturalWidth 0)
            widths = page.eval_on_selector_all("figure.card img", "els => els.map(e => e.naturalWidth)")
            assert len(widths) == 2 * n and all(w > 0 for w in widths)
        finally:
            browser.close()


def test_gallery_marks_a_moved_image(built, tmp_path, db_url):
    from latentlens import atlas as atl
    from latentlens.store import Store

    with Store.open(db_url) as store:
        hits = atl.find_word(store, "photos", _top_word(db_url), layer=2, k=1)
    real = hits[0].path
    hits[0].path = str(tmp_path / "gone.png")
    page = atl.write_gallery(hits, tmp_path / "m.html", title="moved").read_text(encoding="utf-8")
    assert "image not found" in page and "gone.png" in page
    # a file at the stored path that is not the analysed content is not shown as if it were
    other = tmp_path / "other.png"
    sample_image((50, 50)).save(other)
    hits[0].path = str(other)
    page = atl.write_gallery(hits, tmp_path / "c.html", title="changed").read_text(encoding="utf-8")
    assert "image changed since the atlas was built" in page and "data:image" not in page
    hits[0].path = real
    page = atl.write_gallery(hits, tmp_path / "ok.html", title="ok").read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 2


@pytest.mark.parametrize("args, code, message", [
    (["find", "nope", "--word", "dog"], 2, "no atlas named 'nope'"),
    (["find", "photos"], 2, "give --word or --text"),
    (["find", "photos", "--word", "dog", "--text", "a dog"], 2, "give --word or --text"),
    (["find", "photos", "--word", "dog", "--token", "dog"], 2, "--token needs --text"),
    (["find", "photos", "--word", "dog", "--layer", "1"], 2, "has no layer 1"),
    (["find", "photos", "--text", "a dog", "--token", "zebra", "--layer", "2"], 2, "token 'zebra' is not one of"),
    (["build", MODEL, "--images", "/nonexistent/dir"], 2, "no such directory or list file"),
    (["build", "no-such-model", "--images", "."], 2, "no-such-model"),
])
def test_errors_are_one_line(built, args, code, message):
    r = CliRunner().invoke(cli, ["atlas", *args])
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output


def test_runs(built):
    r = CliRunner().invoke(cli, ["atlas", "runs", "photos", "--json"])
    assert r.exit_code == 0, r.output
    runs = json.loads(r.stdout)
    assert runs[0]["status"] == "done" and runs[0]["images_done"] == 3 and runs[0]["patches"] == 48
    assert runs[0]["counters"]["unreadable"] == 0
    r = CliRunner().invoke(cli, ["atlas", "runs", "photos"])
    assert r.exit_code == 0 and r.output.split()[:7] == ["id", "shard", "status", "images", "patches",
                                                          "duration_s", "error"]


def test_drop(built, db_url):
    runner = CliRunner()
    r = runner.invoke(cli, ["atlas", "build", MODEL, "--images", str(built["images"] / "img0.png"),
                            "--layers", "2", "--name", "one", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["atlas", "drop", "one", "--yes"])
    assert r.exit_code == 0 and "Dropped atlas 'one'" in r.output
    import psycopg

    with psycopg.connect(db_url) as conn:
        leaves = conn.execute("SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relname LIKE 'atlas_token_a%%'").fetchone()[0]
        atlases = conn.execute("SELECT count(*) FROM atlas").fetchone()[0]
    assert atlases == 1 and leaves == 2  # photos' two layers remain
