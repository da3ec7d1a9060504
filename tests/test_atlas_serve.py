"""The Atlas page of `llens serve`: in-process HTTP checks (page, API, images only while the file holds
the hashed content) and headless Chromium (search, gallery, paging, click through to the grid)."""

from __future__ import annotations

import re
import shutil

import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli
from serve_app import make_app
from vlm_checks import cli_ingest
from vlm_tiny import CORPUS, build_llava, sample_image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from latentlens.serve import create_app  # noqa: E402

MODEL = "tiny-llava-atlas-serve"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def built(db_url, tmp_path_factory, one_torch_thread):
    base = tmp_path_factory.mktemp("atlas-serve")
    model_dir = build_llava(base / MODEL)
    cli_ingest(model_dir, base)
    runner = CliRunner()
    images = base / "photos"
    images.mkdir()
    for i in range(4):
        sample_image((96 - 8 * i, 64 + 8 * i)).rotate(90 * i).save(images / f"img{i}.png")
    r = runner.invoke(cli, ["atlas", "build", MODEL, "--images", str(images), "--layers", "0,2", "-k", "3",
                            "--no-progress", "--name", "gallery"])
    assert r.exit_code == 0, r.output
    import psycopg

    with psycopg.connect(db_url) as conn:  # the word with the most patches at layer 2
        word, n = conn.execute("SELECT lower(word), count(DISTINCT (image_id, patch)) FROM atlas_neighbour "
                               "WHERE layer = 2 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1").fetchone()
    return {"images": images, "word": word, "n": n}


@pytest.fixture(scope="module")
def client(db_url, built):
    with TestClient(make_app(db_url)) as c:
        yield c


def test_page_api_and_paging(client, built):
    r = client.get("/atlas")
    assert r.status_code == 200 and "gallery (tiny-llava-atlas-serve, 4 images, layers 0,2)" in r.text
    r = client.get("/api/atlas/gallery/find", params={"word": built["word"], "layer": 2, "per_page": 5})
    assert r.status_code == 200
    d = r.json()
    assert len(d["hits"]) == min(5, built["n"]) and d["more"] == (built["n"] > 5)
    sims = [h["similarity"] for h in d["hits"]]
    assert sims == sorted(sims, reverse=True)
    second = client.get("/api/atlas/gallery/find", params={"word": built["word"], "layer": 2, "per_page": 5,
                                                           "page": 2}).json()
    assert not {(h["image_id"], h["patch"]) for h in d["hits"]} & {(h["image_id"], h["patch"]) for h in second["hits"]}
    page = client.get("/atlas", params={"atlas": "gallery", "word": built["word"], "layer": "2"})
    assert page.status_code == 200 and page.text.count('class="atlas-card"') == min(24, built["n"])
    assert client.get("/api/atlas/nope/find", params={"word": "dog"}).status_code == 400
    assert client.get("/api/atlas/gallery/find").json() == {"error": "give word or text"}


def test_images_and_report_need_the_hashed_content(client, built):
    hit = client.get("/api/atlas/gallery/find", params={"word": built["word"], "layer": 2}).json()["hits"][0]
    base = f"/atlas/gallery/images/{hit['image_id']}"
    thumb = client.get(base + "/thumb.jpg")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    crop = client.get(f"{base}/patches/{hit['patch']}.jpg")
    assert crop.status_code == 200 and crop.content[:2] == b"\xff\xd8"
    assert client.get(f"{base}/patches/999.jpg").status_code == 404
    report = client.get(base + "/report")
    assert report.status_code == 200 and "4x4 visual tokens" in report.text
    assert any(s in report.text for s in CORPUS)  # the stored neighbours' sentences, no model run
    page = client.get(base, params={"layer": 2, "patch": hit["patch"]})
    assert f'/report#patch={hit["patch"]}&amp;layer=2"' in page.text
    # the file changes on disk: its bytes are no longer served, the grid still is
    path = built["images"] / hit["path"].rsplit("/", 1)[1]
    saved = path.read_bytes()
    try:
        sample_image((30, 30)).save(path)
        r = client.get(base + "/thumb.jpg")
        assert r.status_code == 404 and "file changed" in r.text
        assert "(image file changed)" in client.get(base + "/report").text
    finally:
        path.write_bytes(saved)
    assert client.get(base + "/thumb.jpg").status_code == 200


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_atlas_page_in_chromium(db_url, built):
    import threading
    import time

    import uvicorn

    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the default mode: the access token (a cookie once given), so ?token= is the server's
    server = uvicorn.Server(uvicorn.Config(create_app(db_url, auth=False, token="atlas-test-token"),
                                          host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/models?token=atlas-test-token")
                page.click("nav >> text=Atlas")
                page.select_option("#atlas", "gallery")
                page.fill("#word", built["word"])
                page.fill("#layer", "2")
                page.click("#atlas-form button[type=submit]")
                cards = page.locator("figure.atlas-card")
                sync_api.expect(cards).to_have_count(min(24, built["n"]))
                # every crop and thumbnail arrived and decoded
                page.wait_for_function("[...document.querySelectorAll('figure.atlas-card img')]"
                                       ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
                # paging (six a page): the next page holds other patches, previous comes back
                page.goto(page.url + "&per_page=6")
                sync_api.expect(cards).to_have_count(6)
                seen = [(c.get_attribute("data-image"), c.get_attribute("data-patch")) for c in cards.all()]
                page.click("#next")
                sync_api.expect(page.locator("#prev")).to_be_visible()
                nxt = [(c.get_attribute("data-image"), c.get_attribute("data-patch")) for c in cards.all()]
                assert nxt and not set(nxt) & set(seen)
                page.click("#prev")
                sync_api.expect(cards.first).to_have_attribute("data-patch", seen[0][1])
                page.screenshot(path=str(built["images"].parent / "atlas-gallery.png"), full_page=True)
                first = cards.first
                patch = first.get_attribute("data-patch")
                first.locator("a").click()
                page.wait_for_url(re.compile(r"/atlas/gallery/images/\d+\?layer=2&patch=\d+$"))
                grid = page.frame_locator("#report")
                sync_api.expect(grid.locator(".cell")).to_have_count(16, timeout=30_000)
                sync_api.expect(grid.locator("#patch-title")).to_contain_text(f"Patch {patch}")
                assert set(grid.locator("#neighbours .nb-sentence").all_inner_texts()) <= set(CORPUS)
                page.screenshot(path=str(built["images"].parent / "atlas-page.png"), full_page=True)
                # a text search: its token field must not be taken for the server's access token
                page.goto(f"http://127.0.0.1:{port}/atlas")
                page.fill("#text", "a small dog runs on the grass")
                page.fill("#query-token", "dog")
                page.fill("#layer", "2")
                page.click("#atlas-form button[type=submit]")
                sync_api.expect(cards.first).to_be_visible()
                assert "query_token=dog" in page.url
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(15)


def test_text_search_through_the_api(client):
    r = client.get("/api/atlas/gallery/find", params={"text": "a small dog runs on the grass", "query_token": "dog",
                                                      "layer": 2, "per_page": 4})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["token"] == "dog" and d["search"] == {"2": "exact"} and len(d["hits"]) == 4 and d["more"]
    sims = [h["similarity"] for h in d["hits"]]
    assert sims == sorted(sims, reverse=True)
    page2 = client.get("/api/atlas/gallery/find", params={"text": "a small dog runs on the grass", "query_token": "dog",
                                                          "layer": 2, "per_page": 4, "page": 2}).json()
    assert page2["hits"][0]["similarity"] <= sims[-1]
    both = client.get("/api/atlas/gallery/find", params={"text": "a dog", "word": "dog"})
    assert both.status_code == 400 and "not both" in both.json()["error"]
