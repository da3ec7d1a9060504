"""The web app's comparison (two views of an image result side by side) and its text query layout
(a compact token x layer overview, details on click), with the test client and in headless Chromium."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient
from test_serve import CHROMIUM, MODEL, ingested, make_app, served  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def client(db_url, ingested):  # noqa: F811
    with TestClient(make_app(db_url)) as c:
        yield c


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
