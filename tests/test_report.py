"""The visual report: report.html (offline, checked in headless Chromium) and report.png."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli
from PIL import Image
from vlm_tiny import CORPUS, build_llava, build_qwen, ingest_text, sample_image

from latentlens.errors import InputError
from latentlens.lenses import VocabHit
from latentlens.query import Neighbour
from latentlens.report import render_png, report_data, write_report
from latentlens.vlm.geometry import grid_patches, stretch
from latentlens.vlm.query import ImageQueryResult, PatchResult, VisualLayerResult

CHROMIUM = next((p for p in (os.environ.get("LLENS_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome"))
                 if p), None)
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)"
)


def make_result(size=(240, 160), grid=(4, 6), layers=(0, 8), k=3, queried=None, seed=0,
                methods=("latentlens",)):
    """A hand-made ImageQueryResult: neighbours drawn from CORPUS with known spans,
    and for the baselines among ``methods`` random vocabulary tokens."""
    rows, cols = grid
    w, h = size
    patches = grid_patches(rows, cols, (w / cols, h / rows), stretch(size, size), size)
    rng = random.Random(seed)

    def neighbour(layer: int) -> Neighbour:
        s = rng.choice(CORPUS)
        words = s.split()
        i = rng.randrange(len(words))
        a = sum(len(x) + 1 for x in words[:i])
        return Neighbour(token="Ġ" + words[i], token_id=i, similarity=rng.uniform(0.05, 0.3),
                         layer=layer, sentence_id=1, sentence=s, position=i, char_start=a,
                         char_end=a + len(words[i]))

    def hits(method: str) -> list[VocabHit]:
        words = rng.sample(sorted({w for s in CORPUS for w in s.split()}), k)
        scores = sorted((rng.uniform(0.001, 0.5) for _ in words), reverse=True)
        return [VocabHit(" " + w, i, sc) for i, (w, sc) in enumerate(zip(words, scores))]

    chosen = [p for p in patches if queried is None or p.idx in queried]
    latent = "latentlens" in methods
    vocab = [m for m in methods if m != "latentlens"]
    out = []
    for v in layers:
        ps = []
        for p in chosen:
            ns = sorted((neighbour(rng.choice([4, 8])) for _ in range(k)), key=lambda n: -n.similarity)
            ps.append(PatchResult(p.idx, p.row, p.col, p.box, ns if latent else [], None,
                                  {m: hits(m) for m in vocab} if vocab else None))
        out.append(VisualLayerResult(v, ps))
    return ImageQueryResult("tiny/model", size, grid, out, prompt="Describe this image in detail.",
                            searched_layers=[4, 8] if latent else [], k=k, patches=patches,
                            methods=list(methods))


ALL = ("latentlens", "logitlens", "embeddinglens")


def page_data(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="llens-data">(.*?)</script>',
                                html, re.S).group(1))


def test_report_files_and_self_contained_html(tmp_path):
    res = make_result()
    img = sample_image(res.image_size)
    paths = write_report(res, img, tmp_path / "out")
    assert paths["html"].is_file() and paths["png"].is_file()
    html = paths["html"].read_text(encoding="utf-8")
    # offline: the image is inline, nothing is fetched
    assert 'src="data:image/' in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html and "@import" not in html
    data = json.loads(re.search(r'<script type="application/json" id="llens-data">(.*?)</script>',
                                html, re.S).group(1))
    assert data["grid"] == [4, 6] and len(data["grid_patches"]) == 24
    assert [lay["visual_layer"] for lay in data["layers"]] == [0, 8]
    n0 = data["layers"][0]["patches"]["0"][0]
    assert data["sentences"][n0["s"]][n0["char_start"]:n0["char_end"]] == n0["word"]
    assert len(data["sentences"]) == len(set(data["sentences"])) <= len(CORPUS)


def test_report_escapes_corpus_text(tmp_path):
    res = make_result(grid=(1, 2), layers=(0,), k=1)
    evil = "</script><script>alert(1)</script> & <b>"
    n = res.layers[0].patches[0].neighbours[0]
    n.sentence, n.char_start, n.char_end, n.token = evil, 0, 9, "</script>"
    html = write_report(res, sample_image(res.image_size), tmp_path)["html"].read_text()
    assert "alert(1)</script>" not in html
    data = re.search(r'id="llens-data">(.*?)</script>', html, re.S).group(1)
    assert evil in json.loads(data)["sentences"]


def test_png_size_and_words_drawn(tmp_path):
    res = make_result(size=(240, 160), grid=(4, 6))
    img = sample_image(res.image_size)
    png = Image.open(write_report(res, img, tmp_path)["png"])
    # cells of 40 px are upscaled so each is >= 72 px wide: 240 * 1.8 = 432; a caption band under it
    assert png.size[0] == 432 and png.size[1] > 288
    png = png.crop((0, 0, 432, 288))
    base = np.asarray(img.resize(png.size, Image.Resampling.LANCZOS), dtype=np.int16)
    drawn = np.abs(np.asarray(png.convert("RGB"), dtype=np.int16) - base).sum(-1)
    # every patch centre has a label on it; a strip at a cell's edge (no label) is unchanged
    for p in res.patches:
        cx, cy = (int(v * 1.8) for v in p.center)
        assert drawn[cy - 3: cy + 3, cx - 6: cx + 6].mean() > 60, p
    assert np.median(drawn[:, :4]) < 10


def test_png_says_which_layer_and_method_it_shows():
    from latentlens.report import png_caption

    res = make_result(size=(240, 160), grid=(4, 6), layers=(0, 8), methods=ALL)
    img = sample_image(res.image_size)
    assert png_caption(res, res.layer(8), "latentlens") == (
        "tiny/model \u00b7 visual layer 8 (LLM layer 8) \u00b7 LatentLens top-1 word per patch (text layers 4,8)")
    assert "visual layer 0 (projector output) \u00b7 LogitLens" in png_caption(res, res.layer(0), "logitlens")
    png = render_png(res, img, 8, png_method="embeddinglens")
    band = np.asarray(png.convert("L"), dtype=np.int16)[288:]
    assert band.shape[0] >= 14 and band.max() == 255 and band.min() < 100  # white band, dark text in it


def test_png_dense_grid_labels_a_subset_and_big_images_shrink():
    res = make_result(size=(3000, 2000), grid=(40, 60), layers=(0,), k=1)
    img = sample_image(res.image_size)
    png = render_png(res, img)
    assert max(png.size) == 2048
    diff = np.abs(np.asarray(png, np.int16) - np.asarray(img.resize(png.size), np.int16)).sum(-1)
    labelled = sum(
        diff[int(p.center[1] * png.size[1] / 2000), int(p.center[0] * png.size[0] / 3000)] > 150
        for p in res.patches
    )
    assert 0 < labelled < len(res.patches)  # labels never overlap, so not all 2400 fit


def test_png_layer_choice_and_mismatched_image(tmp_path):
    res = make_result(layers=(0, 8))
    img = sample_image(res.image_size)
    a = np.asarray(render_png(res, img, 0))
    b = np.asarray(render_png(res, img, 8))
    assert a.shape == b.shape and not np.array_equal(a, b)
    with pytest.raises(InputError, match="visual layer 3"):
        render_png(res, img, 3)
    with pytest.raises(InputError, match="computed on a 240x160"):
        write_report(res, sample_image((100, 100)), tmp_path)


def _dump_dom(html_path, fragment, tmp_path) -> str:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom",
        f"{html_path.resolve().as_uri()}#{fragment}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@requires_chromium
def test_html_in_headless_chromium(tmp_path):
    res = make_result(grid=(4, 6), layers=(0, 8), queried={0, 3, 7, 20})
    path = write_report(res, sample_image(res.image_size), tmp_path)["html"]
    dom = _dump_dom(path, "patch=3&layer=8", tmp_path)
    # the grid: one cell per visual token, the queried ones shaded, the rest dashed
    assert len(re.findall(r'<div class="cell[ "]', dom)) == 24
    assert len(re.findall(r'class="cell queried', dom)) == 4
    # the pinned patch's neighbours at visual layer 8, with the matched token marked
    assert re.search(r'id="patch-title"[^>]*>Patch 3 \(row 0, col 3\)<', dom)
    want = [n for n in res.layer(8).patches[1].neighbours]
    items = re.findall(r'<li class="neighbour">(.*?)</li>', dom, re.S)
    assert len(items) == len(want)
    first = want[0]
    marked = (f"{first.sentence[:first.char_start]}<mark>"
              f"{first.sentence[first.char_start:first.char_end]}</mark>{first.sentence[first.char_end:]}")
    assert marked in items[0]
    assert re.search(r'<option value="8" selected', dom) or 'value="8"' in dom
    # across-layers table lists both visual layers
    assert "layer 0" in dom and "layer 8" in dom
    # a patch that was not queried at all says so
    dom = _dump_dom(path, "patch=1&layer=0", tmp_path)
    assert "not queried" in dom


def test_report_data_has_every_method(tmp_path):
    res = make_result(grid=(2, 3), layers=(0, 8), k=2, methods=ALL)
    data = report_data(res)
    assert data["methods"] == list(ALL)
    assert data["scores"] == {"latentlens": "cosine", "logitlens": "probability", "embeddinglens": "cosine"}
    lay = data["layers"][1]
    p = res.layer(8).patches[4]
    # LatentLens: the whole word (and the token), as before
    n = p.neighbours[0]
    assert lay["patches"]["4"][0]["word"] == n.word and lay["patches"]["4"][0]["token"] == n.token
    # the baselines: word, token, id and score per patch
    for m in ("logitlens", "embeddinglens"):
        got = lay["lenses"][m]["4"]
        assert [h["word"] for h in got] == [h.word for h in p.lenses[m]]
        assert got[0]["token"] == p.lenses[m][0].token and got[0]["token_id"] == p.lenses[m][0].token_id
        assert got[0]["score"] == pytest.approx(p.lenses[m][0].score, rel=1e-4)
    html = write_report(res, sample_image(res.image_size), tmp_path)["html"].read_text()
    assert page_data(html)["methods"] == list(ALL)
    assert 'id="methods"' in html and "method=M" in html
    # a baselines-only result has no LatentLens data and says so
    only = report_data(make_result(grid=(2, 3), layers=(0,), k=2, methods=("logitlens",)))
    assert only["methods"] == ["logitlens"] and list(only["layers"][0]["lenses"]) == ["logitlens"]
    assert all(v == [] for v in only["layers"][0]["patches"].values())


def test_png_method_choice(tmp_path):
    res = make_result(grid=(4, 6), layers=(0,), methods=ALL)
    img = sample_image(res.image_size)
    default = np.asarray(render_png(res, img))
    assert np.array_equal(default, np.asarray(render_png(res, img, png_method="latentlens")))
    logit = np.asarray(render_png(res, img, png_method="logitlens"))
    assert not np.array_equal(default, logit)
    with pytest.raises(InputError, match="method 'bogus' is not in this result"):
        render_png(res, img, png_method="bogus")
    with pytest.raises(InputError, match="method 'bogus'"):
        write_report(res, img, tmp_path / "bad", png_method="bogus")
    assert not (tmp_path / "bad" / "report.html").exists()
    paths = write_report(res, img, tmp_path / "ok", png_method="embeddinglens")
    assert np.array_equal(np.asarray(Image.open(paths["png"]).convert("RGB")),
                          np.asarray(render_png(res, img, png_method="embeddinglens")))
    # no LatentLens neighbours at all: the first method that has words labels the PNG
    res.methods = list(ALL)
    for p in res.layers[0].patches:
        p.neighbours = []
    assert np.array_equal(np.asarray(render_png(res, img)), logit)


@requires_chromium
def test_html_method_tabs_in_headless_chromium(tmp_path):
    res = make_result(grid=(2, 3), layers=(0, 8), k=3, methods=ALL)
    path = write_report(res, sample_image(res.image_size), tmp_path)["html"]
    dom = _dump_dom(path, "patch=2&layer=8&method=logitlens", tmp_path)
    assert len(re.findall(r'<button[^>]*class="tab', dom)) == 3
    assert re.search(r'class="tab active"[^>]*>LogitLens<', dom)
    items = re.findall(r'<li class="hit">(.*?)</li>', dom, re.S)
    want = res.layer(8).patches[2].lenses["logitlens"]
    assert len(items) == 3 and want[0].word in items[0]
    assert re.search(r"probability \d\.\d{3}", items[0]), items[0]
    # the grid labels follow the method: patch 2's label is LogitLens' top-1 word
    cell = re.search(r'<div class="cell[^"]*"[^>]*data-idx="2".*?<span class="word">(.*?)</span>', dom, re.S)
    assert cell.group(1) == want[0].word
    assert "Across methods" in dom
    dom = _dump_dom(path, "patch=2&layer=0&method=embeddinglens", tmp_path)
    items = re.findall(r'<li class="hit">(.*?)</li>', dom, re.S)
    assert "cos " in items[0] and "probability" not in items[0]
    assert res.layer(0).patches[2].lenses["embeddinglens"][0].word in items[0]


@pytest.fixture(scope="module")
def qwen_index(db_url, tmp_path_factory):
    from latentlens.store import Store
    from latentlens.vlm import load_vlm

    d = build_qwen(tmp_path_factory.mktemp("vlm") / "tiny-qwen2-vl")
    vlm = load_vlm(str(d))
    with Store.open(db_url) as store:
        ingest_text(store, vlm)
    return d


@pytest.fixture(scope="module")
def cli_report(qwen_index, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-report")
    img_path = tmp / "photo.png"
    sample_image((96, 64)).save(img_path)
    out = tmp / "report"
    r = CliRunner().invoke(cli, [
        "report", str(qwen_index), "--image", str(img_path), "--out", str(out),
        "--visual-layers", "0,2", "-k", "3", "--resolution", "112", "--json",
    ])
    return r, out


def test_llens_report_cli_writes_both_files(cli_report):
    r, out = cli_report
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["grid"] == [4, 4] and summary["patches"] == 16
    assert summary["visual_layers"] == [0, 2] and summary["searched_layers"] == [0, 1, 2, 3]
    assert summary["html"] == str(out / "report.html")
    png = Image.open(out / "report.png")
    assert png.size[0] == 288 and png.size[1] > 192  # 96x64 upscaled so a 24-px cell is 72 px; caption band


@requires_chromium
def test_llens_report_cli_html_in_chromium(cli_report, tmp_path):
    r, out = cli_report
    assert r.exit_code == 0, r.output
    dom = _dump_dom(out / "report.html", "patch=5&layer=2", tmp_path)
    assert re.search(r"Patch 5 \(row 1, col 1\)", dom)
    assert len(re.findall(r'<li class="neighbour">', dom)) == 3
    assert any(s.replace("&", "&amp;") in dom for s in CORPUS)


def test_llens_report_cli_all_methods(qwen_index, tmp_path):
    img_path = tmp_path / "photo.png"
    sample_image((96, 64)).save(img_path)
    out = tmp_path / "all"
    r = CliRunner().invoke(cli, [
        "report", str(qwen_index), "--image", str(img_path), "--out", str(out),
        "--visual-layers", "0,2", "-k", "3", "--resolution", "112", "--method", "all", "--json",
    ])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["methods"] == list(ALL)
    data = page_data((out / "report.html").read_text(encoding="utf-8"))
    assert data["methods"] == list(ALL)
    for lay in data["layers"]:
        assert len(lay["patches"]) == 16 and all(len(v) == 3 for v in lay["patches"].values())
        for m in ("logitlens", "embeddinglens"):
            assert all(len(v) == 3 for v in lay["lenses"][m].values()) and len(lay["lenses"][m]) == 16
    probs = [h["score"] for h in data["layers"][1]["lenses"]["logitlens"]["5"]]
    assert all(0 <= x <= 1 for x in probs) and probs == sorted(probs, reverse=True)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    base = tmp_path_factory.mktemp("llava")
    d = build_llava(base / "tiny-llava")
    img = base / "photo.png"
    sample_image((96, 64)).save(img)
    return d, img


def test_llens_report_cli_baselines_need_no_database(tiny_llava, tmp_path, monkeypatch):
    d, img = tiny_llava
    monkeypatch.setenv("LLENS_DATABASE_URL", "postgresql://127.0.0.1:1/x")  # nothing listens there
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["report", str(d), "--image", str(img), "--visual-layers", "1",
                                 "--method", "logitlens,embeddinglens", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["methods"] == ["logitlens", "embeddinglens"] and summary["visual_layers"] == [1]
    assert summary["searched_layers"] == [] and summary["patches"] == 16
    data = page_data((out / "report.html").read_text(encoding="utf-8"))
    assert data["methods"] == ["logitlens", "embeddinglens"]
    assert all(len(v) == 5 for v in data["layers"][0]["lenses"]["embeddinglens"].values())
    png = Image.open(out / "report.png")
    assert png.size[0] == 288 and png.size[1] > 192
    # labelled with LogitLens words: differs from the plain upscaled image
    base = Image.open(img).convert("RGB").resize(png.size, Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(png.convert("RGB"), np.int16) - np.asarray(base, np.int16)).sum(-1).max() > 150
    # --visual-layers is required when the store cannot say (a path, or a store out of reach)
    r = CliRunner().invoke(cli, ["report", str(d), "--image", str(img), "--method", "logitlens",
                                 "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "--visual-layers" in r.output
    r = CliRunner().invoke(cli, ["report", "some/vlm", "--image", str(img), "--method", "embeddinglens",
                                 "--out", str(tmp_path / "o3")])
    assert r.exit_code == 2 and "--visual-layers" in r.output
    r = CliRunner().invoke(cli, ["report", str(d), "--image", str(img), "--visual-layers", "1",
                                 "--method", "logitlens", "--png-method", "latentlens",
                                 "--out", str(tmp_path / "o4")])
    assert r.exit_code == 2 and "--png-method" in r.output
    r = CliRunner().invoke(cli, ["report", str(d), "--image", str(img), "--visual-layers", "1",
                                 "--method", "bogus", "--out", str(tmp_path / "o5")])
    assert r.exit_code != 0 and "unknown method 'bogus'" in r.output and "Traceback" not in r.output


def test_llens_report_cli_errors(qwen_index, db_url, tmp_path):
    img_path = tmp_path / "photo.png"
    sample_image((96, 64)).save(img_path)
    runner = CliRunner()
    r = runner.invoke(cli, ["report", "no-such-model", "--image", str(img_path), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "unknown model 'no-such-model'" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(cli, ["report", str(qwen_index), "--image", str(img_path), "--out",
                            str(tmp_path / "o"), "--patches", "9,9"])
    assert r.exit_code != 0 and "outside the" in r.output
    r = runner.invoke(cli, ["report", str(qwen_index), "--image", str(img_path), "--out",
                            str(tmp_path / "o"), "--visual-layers", "0,1", "--png-layer", "2"])
    assert r.exit_code != 0 and "--png-layer" in r.output
    assert not (tmp_path / "o" / "report.html").exists()  # nothing half-written
    r = runner.invoke(cli, ["report", "--help"])
    assert r.exit_code == 0 and "llens report" in r.output and "--method logitlens,embeddinglens" in r.output
