"""The web app's comparison (two views of an image result side by side, or one view against another
model on the same image) and its text query layout (a compact token x layer overview, details on
click), with the test client and in headless Chromium."""

from __future__ import annotations

import html
import json
import re

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from latentlens.cli.main import cli
from test_serve import CHROMIUM, MODEL, ingested, make_app, served  # noqa: F401  (fixtures)
from vlm_tiny import build_llava

TWIN = "tiny-llava-twin"  # the same checkpoint as MODEL under another name
COARSE = "tiny-llava-coarse"  # another random LLaVA: 16-px patches (a 2x2 grid), 2 text layers


@pytest.fixture(scope="module")
def client(db_url, ingested):  # noqa: F811
    with TestClient(make_app(db_url)) as c:
        yield c


@pytest.fixture(scope="module")
def others(db_url, ingested):  # noqa: F811
    from latentlens.store import Store

    base = ingested["base"]
    coarse = build_llava(base / COARSE, patch_size=16, seed=1, text_layers=2)
    for src, name, layers in ((base / MODEL, TWIN, "0,1,2,3"), (coarse, COARSE, "0,1,2")):
        r = CliRunner().invoke(cli, ["ingest", str(src), str(base / "corpus.txt"), "--name", name, "--layers", layers,
                                     "--skip-positions", "0", "--no-index", "--no-progress"])
        assert r.exit_code == 0, r.output
    with Store.open(db_url) as store:
        store.register_model("cmp-text-model", hidden_size=8, num_layers=2, architecture="LlamaForCausalLM")
    return {"twin": TWIN, "coarse": COARSE}


def _data(page: str) -> dict:
    return json.loads(re.search(r'id="llens-data">(.*?)</script>', page, re.S).group(1))


def _draft(client, ingested, **fields):  # noqa: F811
    data = {"model": MODEL, "visual_layers": "0,2", "k": "3", "patches": "all", **fields}
    r = client.post("/image", files={"image": ("photo.png", ingested["png"], "image/png")}, data=data,
                    headers={"X-Fragment": "1"})
    assert r.status_code == 200, r.text
    return r.text, re.search(r"/drafts/([^/]+)/report", r.text).group(1)


def test_image_result_offers_a_comparison_of_its_views(client, ingested):  # noqa: F811
    page, draft = _draft(client, ingested, methods=["latentlens", "logitlens"])
    assert 'id="compare-form"' in page and f'action="/drafts/{draft}/compare"' in page
    assert page.count("<option value=") >= 2 * 4  # 2 layers x 2 methods, in both selects
    r = client.get(f"/drafts/{draft}/compare", params={"a": "0:latentlens", "b": "2:logitlens"})
    assert r.status_code == 200, r.text
    data = json.loads(re.search(r'id="llens-data">(.*?)</script>', r.text, re.S).group(1))
    assert "visual layer 0" in data["left"] and "LogitLens" in data["right"] and len(data["patches"]) == 16
    for p in data["patches"]:
        assert len(p["left"]) == len(p["right"]) == 3
        assert p["overlap"] == len(p["shared"])
    # saved, the analysis offers the same comparison (without the model)
    r = client.post("/analyses", data={"draft": draft, "title": "compare me"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    url = r.headers["location"]
    page = client.get(url).text
    assert 'id="compare-form"' in page and f'action="{url}/compare"' in page
    r = client.get(f"{url}/compare", params={"a": "0:latentlens", "b": "2:logitlens"})
    assert r.status_code == 200 and json.loads(re.search(r'id="llens-data">(.*?)</script>', r.text, re.S)
                                                .group(1))["patches"] == data["patches"]
    r = client.get(f"/drafts/{draft}/compare", params={"a": "x", "b": "2:latentlens"})
    assert r.status_code == 400 and "LAYER:METHOD" in r.text and "Traceback" not in r.text
    r = client.get(f"/drafts/{draft}/compare", params={"a": "5:latentlens", "b": "2:latentlens"})
    assert r.status_code == 400 and "visual layer 5 is not in this result" in r.text


def test_text_results_show_distinct_contexts_in_a_compact_overview(client):
    r = client.post("/text", data={"model": MODEL, "text": "a red car", "query_layers": "1,2", "k": "3"},
                    headers={"X-Fragment": "1"})
    assert r.status_code == 200, r.text
    cells = re.findall(r'<details class="cell">(.*?)</details>', r.text, re.S)
    assert cells and all("<summary>" in c for c in cells)
    for c in cells:  # each context once
        items = re.findall(r'<div class="nb-sentence">(.*?)</div>', c, re.S)
        assert len(items) == len(set(items)) == 3


def test_twin_checkpoint_shares_every_word(client, ingested, others):  # noqa: F811
    page, draft = _draft(client, ingested, visual_layers="0,3")
    form = re.search(r'<form[^>]*id="compare-model-form".*?</form>', page, re.S).group(0)
    assert f'action="/drafts/{draft}/compare-model"' in form and 'method="post"' in form
    offered = re.findall(r'<option value="([^"]+)">', re.search(r'name="model_b".*?</select>', form, re.S).group(0))
    assert TWIN in offered and COARSE in offered and MODEL not in offered and "cmp-text-model" not in offered
    r = client.post(f"/drafts/{draft}/compare-model", data={"model_b": TWIN, "a": "3:latentlens"})
    assert r.status_code == 200, r.text
    data = _data(r.text)
    assert f"{MODEL} \u00b7 visual layer 3" in data["left"] and f"{TWIN} \u00b7 visual layer 3" in data["right"]
    assert len(data["patches"]) == 16 and "grid is" not in r.text  # one grid: nothing to say
    for p in data["patches"]:  # the same checkpoint and contexts: the same lists, every word shared
        assert p["right_patch"] == p["patch_idx"] and len(p["left"]) == 3
        assert [(h["word"], h["score"]) for h in p["right"]] == [(h["word"], h["score"]) for h in p["left"]]
        assert p["overlap"] == len({h["word"].lower() for h in p["left"]}) == len(p["shared"])
    # a saved analysis compares the same way, from its stored image and parameters (no model of its own)
    url = client.post("/analyses", data={"draft": draft}, follow_redirects=False).headers["location"]
    assert f'action="{url}/compare-model"' in client.get(url).text
    r = client.post(f"{url}/compare-model", data={"model_b": TWIN, "a": "3:latentlens"})
    assert r.status_code == 200 and _data(r.text)["patches"] == data["patches"]


def test_another_model_pairs_layers_and_grids(client, ingested, others):  # noqa: F811
    from latentlens.compare import shared_words, top_words
    from latentlens.vlm.query import ImageQueryResult

    _page, draft = _draft(client, ingested, visual_layers="0,3")
    r = client.post(f"/drafts/{draft}/compare-model", data={"model_b": COARSE, "a": "3:latentlens"})
    assert r.status_code == 200, r.text
    data = _data(r.text)
    # COARSE has 2 text layers: A's layer 3 is not among its visual layers (0 is): paired with its first
    assert "visual layer 3" in data["left"] and f"{COARSE} \u00b7 visual layer 0" in data["right"]
    assert "A's grid is 4x4 visual tokens, B's 2x2" in html.unescape(r.text)
    # B on its own, through the JSON API: its lists are those of the patch under A's patch centre
    b = client.post("/api/query/image", files={"image": ("photo.png", ingested["png"], "image/png")},
                    data={"model": COARSE, "visual_layers": "0", "k": "3", "patches": "all"})
    assert b.status_code == 200, b.text
    own = {p.patch_idx: top_words(p, "latentlens", 3) for p in ImageQueryResult.from_dict(b.json()).layer(0).patches}
    assert len(own) == 4
    for p in data["patches"]:
        under = (p["row"] // 2) * 2 + p["col"] // 2  # a 4x4 cell inside a 2x2 cell, by construction
        assert p["right_patch"] == under and p["right"] == own[under]
        assert p["shared"] == shared_words(p["left"], own[under]) and p["overlap"] == len(p["shared"])
    # B's layer given: that one
    r = client.post(f"/drafts/{draft}/compare-model", data={"model_b": COARSE, "a": "0:latentlens", "layer_b": "2"})
    assert r.status_code == 200 and f"{COARSE} \u00b7 visual layer 2" in _data(r.text)["right"]


def test_compare_model_errors_are_one_line(client, ingested, others):  # noqa: F811
    _page, draft = _draft(client, ingested)
    for fields, status, msg in (
        ({"model_b": "no-such-model", "a": "2:latentlens"}, 400, "no-such-model"),
        ({"model_b": MODEL, "a": "2:latentlens"}, 400, "is this result's own model"),
        ({"model_b": "cmp-text-model", "a": "2:latentlens"}, 400, "text-only model"),
        ({"model_b": "", "a": "2:latentlens"}, 400, "pick a second model"),
        ({"model_b": TWIN, "a": "5:latentlens"}, 400, "visual layer 5 is not in this result"),
        ({"model_b": TWIN, "a": "2:latentlens", "layer_b": "x"}, 400, "expected a layer number"),
        ({"model_b": TWIN, "a": "2:latentlens", "layer_b": "9"}, 400, "out of range"),
    ):
        r = client.post(f"/drafts/{draft}/compare-model", data=fields)
        text = html.unescape(r.text)
        assert r.status_code == status and msg in text and "Traceback" not in text, (fields, text[-800:])
        r = client.post(f"/drafts/{draft}/compare-model", data=fields, headers={"X-Fragment": "1"})
        assert r.status_code == status and "\n" not in r.json()["error"], r.text


def test_compare_model_behind_the_perimeter(db_url, ingested, others):  # noqa: F811
    """Token mode: the token by header or cookie (the form has no field named token), writes same-origin only."""
    with TestClient(make_app(db_url, token="cmp-token")) as c:
        auth = {"Authorization": "token cmp-token"}
        r = c.post("/image", files={"image": ("photo.png", ingested["png"], "image/png")},
                   data={"model": MODEL, "visual_layers": "2", "k": "3", "patches": "center"},
                   headers={"X-Fragment": "1", **auth})
        assert r.status_code == 200, r.text
        draft = re.search(r"/drafts/([^/]+)/report", r.text).group(1)
        assert 'name="token"' not in r.text
        url, fields = f"/drafts/{draft}/compare-model", {"model_b": TWIN, "a": "2:latentlens"}
        assert c.post(url, data=fields).status_code == 401
        r = c.post(url, data=fields, headers={**auth, "Origin": "https://elsewhere.example"})
        assert r.status_code == 403 and "cross-site" in r.text
        r = c.post(url, data=fields, headers={**auth, "Origin": "http://testserver"})
        assert r.status_code == 200 and len(_data(r.text)["patches"]) == 4


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_compare_and_text_layout_in_chromium(served, ingested, tmp_path):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    base, _app = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{base}/text?token=browser-token")
            page.goto(f"{base}/image")
            page.select_option("#model", MODEL)
            page.set_input_files("#image", str(ingested["image"]))
            page.fill("input[name=visual_layers]", "0,2")
            page.fill("input[name=k]", "3")
            page.click("form.query button[type=submit]")
            sync_api.expect(page.frame_locator("#report").locator(".cell")).to_have_count(16, timeout=60_000)
            page.select_option("#compare-form select[name=a]", "0:latentlens")
            page.select_option("#compare-form select[name=b]", "2:latentlens")
            page.click("#compare-form button[type=submit]")
            frame = page.frame_locator("#compare")
            sync_api.expect(frame.locator(".cell")).to_have_count(16, timeout=30_000)
            frame.locator('.cell[data-idx="5"]').click()
            sync_api.expect(frame.locator("#patch-title")).to_contain_text("Patch 5")
            assert frame.locator(".list-a li").count() == 3 and frame.locator(".list-b li").count() == 3
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
            # the text query: a token x layer overview across the window, a cell's details on click
            page.goto(f"{base}/text")
            page.select_option("#model", MODEL)
            page.fill("#text", "a red car on the road by the house")
            page.fill("input[name=query_layers]", "0,1,2,3")
            page.click("form.query button[type=submit]")
            table = page.locator("#text-results")
            sync_api.expect(table.locator("details.cell").first).to_be_visible(timeout=60_000)
            width = table.bounding_box()["width"]
            assert width > 0.8 * (1400 - 40), width  # uses the window, not a third of it
            first = table.locator("details.cell").first
            assert not first.evaluate("d => d.open") and not first.locator(".nb-sentence").first.is_visible()
            first.locator("summary").click()
            assert first.evaluate("d => d.open") and first.locator(".nb-sentence").first.is_visible()
            page.screenshot(path=str(tmp_path / "text.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_compare_models_in_chromium(served, ingested, others, tmp_path):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    base, _app = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{base}/image?token=browser-token")  # token mode: from now on the cookie carries it
            page.select_option("#model", MODEL)
            page.set_input_files("#image", str(ingested["image"]))
            page.fill("input[name=visual_layers]", "0,2")
            page.fill("input[name=k]", "3")
            page.click("form.query button[type=submit]")
            sync_api.expect(page.frame_locator("#report").locator(".cell")).to_have_count(16, timeout=60_000)
            form = page.locator("#compare-model-form")
            form.locator("select[name=a]").select_option("2:latentlens")
            form.locator("select[name=model_b]").select_option(TWIN)
            form.locator("button[type=submit]").click()
            frame = page.frame_locator("#compare")
            sync_api.expect(frame.locator(".cell")).to_have_count(16, timeout=60_000)
            sync_api.expect(page.locator("#busy")).to_be_hidden(timeout=30_000)
            frame.locator('.cell[data-idx="5"]').click()
            sync_api.expect(frame.locator("#patch-title")).to_contain_text("Patch 5")
            a, b = frame.locator(".list-a .nb-word").all_inner_texts(), frame.locator(".list-b .nb-word").all_inner_texts()
            assert len(a) == 3 and a == b  # the same checkpoint: the same list
            assert frame.locator(".list-b li.shared").count() == 3
            page.screenshot(path=str(tmp_path / "compare-twin.png"), full_page=True)
            # another model with another grid: said so above the image
            form.locator("select[name=model_b]").select_option(COARSE)
            form.locator("button[type=submit]").click()
            sync_api.expect(frame.locator("#summary")).to_contain_text("B's 2x2", timeout=60_000)
            sync_api.expect(frame.locator(".cell")).to_have_count(16)
            page.screenshot(path=str(tmp_path / "compare-coarse.png"), full_page=True)
        finally:
            browser.close()


def test_cli_report_compare_with_patches_reads_b_under_each_cell(others, ingested, tmp_path):  # noqa: F811
    """`llens report --patches R,C;... --compare MODEL_B`: the cells are MODEL's; on B's coarser grid
    the B patch shown beside a cell is the one under its centre (B reads its whole grid), not B's
    patch at the same (row, col), which is elsewhere in the image or off B's grid."""
    r = CliRunner().invoke(cli, ["report", MODEL, "--image", str(ingested["image"]), "--out", str(tmp_path / "r"),
                                 "-k", "2", "--visual-layers", "0", "--patches", "1,1;2,2", "--compare",
                                 others["coarse"], "--json"])
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)["compare"]
    assert c["grids"] == [[4, 4], [2, 2]]
    got = {(p["row"], p["col"]): p["right_patch"] for p in c["patches"]}
    # 4x4 cells (1,1) and (2,2) lie in the 2x2 grid's (0,0) and (1,1): patch indexes 0 and 3
    assert got == {(1, 1): 0, (2, 2): 3}
    assert all(p["right"] for p in c["patches"])
