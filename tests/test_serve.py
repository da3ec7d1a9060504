"""`llens serve`: the JSON API with FastAPI's test client, and the image page in a real
headless Chromium (Playwright driving the system `chromium`), on a tiny LLaVA ingested
with `llens ingest DIR corpus`."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
import uuid
from urllib.parse import unquote, urlsplit

import psycopg
import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli
from serve_app import TEST_HOSTS, make_app
from vlm_tiny import CORPUS, build_llava, sample_image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from latentlens.serve import create_app  # noqa: E402

MODEL = "tiny-llava"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def ingested(db_url, tmp_path_factory, one_torch_thread):
    base = tmp_path_factory.mktemp("serve")
    model_dir = build_llava(base / MODEL)
    corpus = base / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    image = base / "photo.png"
    sample_image((96, 64)).save(image)
    r = CliRunner().invoke(cli, ["ingest", str(model_dir), str(corpus), "--layers", "0,1,2,3",
                                 "--skip-positions", "0", "--no-index", "--no-progress"])
    assert r.exit_code == 0, r.output
    return {"image": image, "png": image.read_bytes(), "base": base}


@pytest.fixture(scope="module")
def client(db_url, ingested):
    # the tests' database URL looks like a team server's: sign-in is tested on its own below
    with TestClient(make_app(db_url)) as c:
        yield c


def _upload(client, png, **fields):
    data = {"model": MODEL, "visual_layers": "0,2", "k": "2", "patches": "center", **fields}
    return client.post("/api/query/image", files={"image": ("photo.png", png, "image/png")}, data=data)


def _clean(obj):
    """Drop what differs between two runs of the same query (when, floating noise)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k != "at"}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 4)
    return obj


def _no_trace(r) -> None:
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_models_and_status(client):
    r = client.get("/api/models")
    assert r.status_code == 200, r.text
    (m,) = [m for m in r.json() if m["model"] == MODEL]
    assert [li["layer"] for li in m["layers"]] == [0, 1, 2, 3] and m["rows"] > 0
    state = client.app.state.llens
    with state.activity("loading something big"):
        busy = client.get("/api/status").json()["busy"]
    assert [b["what"] for b in busy] == ["loading something big"]
    assert client.get("/api/status").json()["busy"] == []
    page = client.get("/models")
    assert page.status_code == 200 and MODEL in page.text
    assert page.headers["x-frame-options"] == "SAMEORIGIN"
    # a write from another site is refused before anything runs
    r = client.post("/api/analyses", json={"draft": "x"}, headers={"Origin": "https://elsewhere.example"})
    assert r.status_code == 403 and "cross-site" in r.json()["error"]


def test_text_query_json_is_llens_query_json(client):
    body = {"model": MODEL, "text": "a red car on the road", "query_layers": [1, 2], "k": 3, "methods": "all"}
    r = client.post("/api/query/text", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-llens-draft"]
    cli_out = CliRunner().invoke(cli, ["query", MODEL, "--text", body["text"], "--query-layer", "1,2", "-k", "3",
                                       "--method", "all", "--json"])
    assert cli_out.exit_code == 0, cli_out.output
    want = json.loads(cli_out.stdout)
    got = r.json()
    assert _clean(got) == _clean(want)
    assert {n["sentence"] for res in got for n in res["neighbours"]} <= set(CORPUS)
    assert set(got[0]["lenses"]) == {"logitlens", "embeddinglens"} and got[0]["provenance"]["model"]["name"] == MODEL
    # the page renders the same as a fragment (tokens x layers)
    page = client.post("/text", data={"model": MODEL, "text": "a red car", "query_layers": "1", "k": "2",
                                      "methods": ["latentlens", "logitlens"]}, headers={"X-Fragment": "1"})
    assert page.status_code == 200 and 'id="text-results"' in page.text and "<mark>" in page.text


def test_image_query_upload(client, ingested):
    r = _upload(client, ingested["png"])
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["grid"] == [4, 4] and d["image_size"] == [96, 64]
    assert [vl["visual_layer"] for vl in d["layers"]] == [0, 2]
    patches = d["layers"][1]["patches"]
    assert [(p["row"], p["col"]) for p in patches] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(len(p["neighbours"]) == 2 and {n["sentence"] for n in p["neighbours"]} <= set(CORPUS)
               for p in patches)
    # the page's grid for that result is the report's own page
    report = client.get(f"/drafts/{r.headers['x-llens-draft']}/report")
    assert report.status_code == 200 and 'id="llens-data"' in report.text


def test_progress_of_long_work(db_url, ingested, tmp_path):
    """What /api/status reports: a model's first load, a cold scan cache; then nothing but the query."""
    app = make_app(db_url, cache_dir=tmp_path / "scan")
    state = app.state.llens
    seen = []
    activity = state.activity

    def recording(what):
        seen.append(what)
        return activity(what)

    state.activity = recording
    with TestClient(app) as c:
        assert _upload(c, ingested["png"]).status_code == 200
        first, seen[:] = list(seen), []
        assert _upload(c, ingested["png"]).status_code == 200
    assert first[0] == f"image query on {MODEL}"
    assert first[1].startswith(f"loading the vision-language model {MODEL}")
    assert first[2].startswith(f"4 layer(s) of {MODEL} (236 rows) are not in the scan cache yet")
    assert seen == [f"image query on {MODEL}"]


def test_bad_uploads_are_clear_4xx(client, db_url, ingested):
    r = client.post("/api/query/image", files={"image": ("notes.txt", b"just some text", "text/plain")},
                    data={"model": MODEL})
    assert r.status_code == 400 and "not an image" in r.json()["error"]
    _no_trace(r)
    r = _upload(client, ingested["png"], model="no-such-model")
    assert r.status_code == 400 and "no-such-model" in r.json()["error"]
    r = _upload(client, ingested["png"], visual_layers="0,9")
    assert r.status_code == 400 and "out of range" in r.json()["error"]
    with TestClient(make_app(db_url, max_upload_bytes=1000)) as small:
        r = _upload(small, ingested["png"] + b"\0" * 2000)  # read, then refused
        assert r.status_code == 413 and "at most" in r.json()["error"]
        r = _upload(small, b"\0" * (1100 * 1024))  # refused before the body is read
        assert r.status_code == 413 and "at most" in r.json()["error"]
        _no_trace(r)
    # a page (not the API) shows the error as a page, in one line
    page = client.post("/text", data={"model": "no-such-model", "text": "a dog"})
    assert page.status_code == 400 and 'id="error"' in page.text and "no-such-model" in page.text
    _no_trace(page)


def test_save_list_get_delete(client, ingested):
    r = _upload(client, ingested["png"])
    assert r.status_code == 200, r.text
    saved = client.post("/api/analyses", json={"draft": r.headers["x-llens-draft"], "title": "centre patches"})
    assert saved.status_code == 201, saved.text
    aid = saved.json()["id"]
    listed = client.get("/api/analyses", params={"model": MODEL, "kind": "image"}).json()
    assert [(a["id"], a["title"]) for a in listed if a["id"] == aid] == [(aid, "centre patches")]
    got = client.get(f"/api/analyses/{aid}").json()
    assert got["kind"] == "image" and _clean(got["result"]) == _clean(r.json())
    assert got["input"]["size"] == [96, 64] and got["provenance"]["model"]["name"] == MODEL
    page = client.get(f"/analyses/{aid}")
    assert page.status_code == 200 and f'src="/analyses/{aid}/report"' in page.text
    report = client.get(f"/analyses/{aid}/report")
    assert report.status_code == 200 and "centre patches" in report.text and 'id="llens-data"' in report.text
    # a text query saved at once
    t = client.post("/api/query/text", json={"model": MODEL, "text": "the cat", "k": 1, "save": True,
                                             "title": "cat"})
    assert t.status_code == 200 and t.headers["location"] == f"/api/analyses/{t.headers['x-llens-analysis']}"
    assert "cat" in client.get(f"/analyses/{t.headers['x-llens-analysis']}").text
    for a in (aid, int(t.headers["x-llens-analysis"])):
        assert client.delete(f"/api/analyses/{a}").status_code == 204
        gone = client.get(f"/api/analyses/{a}")
        assert gone.status_code == 404 and f"no analysis {a}" in gone.json()["error"]
    assert client.delete(f"/api/analyses/{aid}").status_code == 404
    assert client.post("/api/analyses", json={"draft": "nope"}).status_code == 400


def test_context_search(client):
    r = client.get("/api/search", params={"model": MODEL, "q": "Grass"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["ranking"] == "sentence order"  # no pg_textsearch on the embedded server
    want = [s for s in CORPUS if "grass" in s.split()]
    assert sorted({o["sentence"] for o in d["occurrences"]}) == sorted(want)
    o = d["occurrences"][0]
    assert o["sentence"][o["char_start"]:o["char_end"]] == "grass" and o["tokens"][0]["token"] == "grass"
    phrase = client.get("/api/search", params={"model": MODEL, "q": "the  green grass"}).json()
    assert [o["sentence"] for o in phrase["occurrences"]] == [s for s in CORPUS if "the green grass" in s]
    assert len(phrase["occurrences"][0]["tokens"]) == 3
    page = client.get("/search", params={"model": MODEL, "q": "grass"})
    assert page.status_code == 200 and "<mark>grass</mark>" in page.text


def test_evaluations_when_there_are_none(client):
    assert client.get("/api/evals").json() == []
    r = client.get("/api/evals/nope")
    assert r.status_code == 404 and "no eval run 'nope'" in r.json()["error"]
    assert "No evaluation yet" in client.get("/evals").text


def test_evaluation_table_and_plot(client, db_url):
    from latentlens.store import EvalItem, EvalVerdict, Store

    with Store.open(db_url) as store:
        info = store.get_model(MODEL)
        run = store.create_eval_run("serve-eval", model=MODEL, model_id=info.id, methods=["latentlens", "logitlens"],
                                    visual_layers=[0, 2], judge="labels", judge_settings={}, settings={},
                                    fingerprint="f", items_planned=2)
        for i in range(2):
            item = EvalItem(i, "photo.png", "0" * 64, (96, 64), i, 0, i, (24.0 * i, 0.0, 24.0 * i + 24, 16.0))
            store.record_eval_item(run, item, [
                EvalVerdict(m, v, ["grass"], interpretable=(m == "latentlens" or i == 0))
                for m in run.methods for v in run.visual_layers])
    assert [r["name"] for r in client.get("/api/evals").json()] == ["serve-eval"]
    d = client.get("/api/evals/serve-eval").json()
    rows = {(r["method"], r["visual_layer"]): r for r in d["summary"]}
    assert rows["latentlens", 2]["pct"] == 100.0 and rows["logitlens", 0]["pct"] == 50.0
    assert rows["logitlens", 0]["ci_low"] < 50.0 < rows["logitlens", 0]["ci_high"]
    png = client.get("/api/evals/serve-eval/plot.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    page = client.get("/evals/serve-eval")
    assert page.status_code == 200 and "95% CI" in page.text and "/api/evals/serve-eval/plot.png" in page.text


def test_read_only_refuses_writes(db_url, ingested):
    with TestClient(make_app(db_url, read_only=True)) as c:
        r = c.post("/api/analyses", json={"draft": "x"})
        assert r.status_code == 403 and "read-only" in r.json()["error"]
        assert c.delete("/api/analyses/1").status_code == 403
        r = c.post("/api/query/text", json={"model": MODEL, "text": "a dog", "save": True})
        assert r.status_code == 403


def test_team_server_signs_in_as_the_member(db_url, ingested):
    app = create_app(db_url, allow_hosts=TEST_HOSTS)  # a URL with a host: a team server, so sign-in is on
    assert app.state.llens.auth
    # the embedded server trusts its owner's socket: a password given for it proves nothing
    parts = urlsplit(db_url)
    owner = (unquote(parts.username or ""), unquote(parts.password or "") or "any")
    reader = f"llens_test_reader_{uuid.uuid4().hex[:8]}"
    writer = f"llens_test_writer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        group, wgroup = conn.execute("SELECT llens_team_role('reader'), llens_team_role('writer')").fetchone()
        conn.execute(f'CREATE ROLE "{reader}" LOGIN PASSWORD \'pw\'')
        conn.execute(f'GRANT "{group}" TO "{reader}"')
        conn.execute(f'CREATE ROLE "{writer}" LOGIN PASSWORD \'pw\'')
        conn.execute(f'GRANT "{wgroup}" TO "{writer}"')
    try:
        with TestClient(app) as c:
            r = c.get("/api/models")
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
            assert "sign in" in r.json()["error"]
            assert c.get("/models").status_code == 401
            assert c.get("/api/models", auth=("nobody_" + uuid.uuid4().hex[:6], "x")).status_code == 401
            assert c.get("/api/models", auth=(owner[0], "")).status_code == 401
            assert c.get("/api/models", auth=owner).status_code == 401
            assert c.get("/api/models", auth=(reader, "pw")).status_code == 200
            # a reader queries, but the database refuses its save
            r = c.post("/api/query/text", auth=(reader, "pw"),
                       json={"model": MODEL, "text": "a dog", "k": 1, "query_layers": [1]})
            assert r.status_code == 200, r.text
            draft = {"draft": r.headers["x-llens-draft"]}
            refused = c.post("/api/analyses", auth=(reader, "pw"), json=draft)
            assert refused.status_code == 403 and "permission denied" in refused.json()["error"]
            _no_trace(refused)
            # a draft belongs to whoever ran the query
            assert c.post("/api/analyses", auth=(writer, "pw"), json=draft).status_code == 400
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{reader}"')
            conn.execute(f'DROP ROLE IF EXISTS "{writer}"')


# ---------------------------------------------------------------------------
# the pages in a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(db_url, ingested):
    import uvicorn

    port = _free_port()
    app = make_app(db_url, token="browser-token")  # the real perimeter: 127.0.0.1 and the token
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(15)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_image_page_in_chromium(served, ingested):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    base, app = served
    state = app.state.llens
    load_vlm = state.vlm

    def slow_first_load(info):  # a tiny VLM loads in no time: make its load long enough to watch
        with state.activity(f"loading the vision-language model {info.name} (slowed down)"):
            time.sleep(2)
        return load_vlm(info)

    state.vlm = slow_first_load
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context()  # one cookie jar for both pages
            page = context.new_page()
            assert page.goto(f"{base}/image").status == 401  # the token page
            page.fill("#token-form input[name=token]", "browser-token")
            page.click("#token-form button[type=submit]")
            page.wait_for_url(f"{base}/image")  # the token became a cookie, and left the URL
            page.select_option("#model", MODEL)
            page.set_input_files("#image", str(ingested["image"]))
            page.fill("input[name=visual_layers]", "0,2")
            page.fill("input[name=k]", "3")
            page.click("form.query button[type=submit]")
            # while it waits, the page shows what the server is busy with (from /api/status)
            sync_api.expect(page.locator("#busy-list")).to_contain_text("loading the vision-language model",
                                                                        timeout=10_000)
            grid = page.frame_locator("#report")
            sync_api.expect(grid.locator(".cell")).to_have_count(16, timeout=60_000)
            sync_api.expect(page.locator("#busy")).to_be_hidden()
            grid.locator('.cell[data-idx="5"]').click()
            sync_api.expect(grid.locator("#patch-title")).to_contain_text("Patch 5")
            sentences = grid.locator("#neighbours .nb-sentence").all_inner_texts()
            assert len(sentences) == 3 and set(sentences) <= set(CORPUS)
            assert grid.locator("#neighbours mark").count() == 3
            page.fill("#save-form input[name=title]", "seen in the browser")
            page.click("#save")
            page.wait_for_url(re.compile(r"/analyses/\d+$"))
            url = page.url
            # the saved analysis, opened by its URL, shows the grid again (no model needed)
            again = context.new_page()
            again.goto(url + "#patch=5&layer=2")
            sync_api.expect(again.locator("h1")).to_have_text("seen in the browser")
            grid2 = again.frame_locator("#report")
            sync_api.expect(grid2.locator(".cell")).to_have_count(16)
            sync_api.expect(grid2.locator("#patch-title")).to_contain_text("Patch 5")
            assert set(grid2.locator("#neighbours .nb-sentence").all_inner_texts()) <= set(CORPUS)
        finally:
            browser.close()


def test_serve_command_help_and_missing_extra(monkeypatch):
    r = CliRunner().invoke(cli, ["serve", "--help"])
    assert r.exit_code == 0 and "--read-only" in r.output and "--max-upload-mb" in r.output
    assert "Examples:" in r.output
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else find_spec(name, *a))
    r = CliRunner().invoke(cli, ["serve"])
    assert r.exit_code == 2
    assert r.output.strip() == "Error: llens serve needs uvicorn: pip install 'latentlens-db[serve]'"


# ---------------------------------------------------------------------------
# one image reader for every path; the smaller things a new user meets


def test_exif_rotated_photo_drawn_upright_like_the_cli(client, ingested, tmp_path):
    """A phone photo tagged 'rotate 90' (EXIF orientation 6): the saved analysis's page draws the grid
    on the upright image it was computed on, exactly as `llens report --analysis` does."""
    import base64
    import io

    from PIL import Image
    from vlm_tiny import sample_image

    img = sample_image((96, 64))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    r = client.post("/api/query/image", files={"image": ("phone.jpg", buf.getvalue(), "image/jpeg")},
                    data={"model": MODEL, "visual_layers": "0", "k": "1", "patches": "center", "save": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["image_size"] == [64, 96]  # computed upright
    aid = int(r.headers["x-llens-analysis"])

    def embedded_image(html: str) -> Image.Image:
        m = re.search(r'<img id="image" alt="input image" src="data:image/\w+;base64,([^"]+)"', html)
        assert m
        return Image.open(io.BytesIO(base64.b64decode(m.group(1)))).convert("RGB")

    web = client.get(f"/analyses/{aid}/report")
    assert web.status_code == 200
    out = CliRunner().invoke(cli, ["report", "--analysis", str(aid), "--out", str(tmp_path / "cli")])
    assert out.exit_code == 0, out.output
    cli_html = (tmp_path / "cli" / "report.html").read_text(encoding="utf-8")
    web_img, cli_img = embedded_image(web.text), embedded_image(cli_html)
    assert web_img.size == cli_img.size == (64, 96)
    assert web_img.tobytes() == cli_img.tobytes()
    data = re.compile(r'<script[^>]*id="llens-data"[^>]*>(.*?)</script>', re.S)
    assert data.search(web.text).group(1) == data.search(cli_html).group(1)  # the same grid and cells
    draft = client.get(f"/drafts/{r.headers['x-llens-draft']}/report")  # the unsaved result: the same image
    assert embedded_image(draft.text).tobytes() == web_img.tobytes()


def test_pixel_budget_is_a_setting(db_url, ingested):
    with TestClient(make_app(db_url, max_image_pixels=96 * 64 - 1)) as c:
        r = _upload(c, ingested["png"])
        assert r.status_code == 400 and "96x64 = 0.0 megapixels, over the limit" in r.json()["error"]
    with TestClient(make_app(db_url, max_image_pixels=96 * 64)) as c:
        assert _upload(c, ingested["png"]).status_code == 200


def test_forms_default_and_unknown_models(client, db_url):
    from latentlens.store import Store

    with Store.open(db_url) as store:  # sorts first: a text-only model must not be the image form's default
        store.register_model("a-text-model", hidden_size=8, num_layers=2, architecture="LlamaForCausalLM")
    page = client.get("/image")
    assert page.status_code == 200
    assert re.search(rf'<option value="{MODEL}"[^>]*selected', page.text), page.text
    assert not re.search(r'<option value="a-text-model"[^>]*selected', page.text)
    assert "a-text-model (0 stored layers, text only)" in page.text
    for path in ("/image", "/text", "/search"):
        r = client.get(path, params={"model": "no-such-model"})
        assert r.status_code == 400 and "no-such-model" in r.text and 'id="error"' in r.text, path
    assert re.search(r'<option value="a-text-model"[^>]*selected', client.get("/text?model=a-text-model").text)


def test_errors_show_no_server_paths(db_url, ingested, monkeypatch):
    from pathlib import Path

    from latentlens.errors import InputError

    app = make_app(db_url)
    home = Path.home()

    def cannot_load(info):
        raise InputError(f"cannot load a model config from '{home}/models/{info.name}': no config.json")

    monkeypatch.setattr(app.state.llens, "vlm", cannot_load)
    with TestClient(app) as c:
        page = c.post("/image", files={"image": ("p.png", ingested["png"], "image/png")}, data={"model": MODEL})
        assert page.status_code == 400 and f"…/{MODEL}" in page.text and "no config.json" in page.text
        assert str(home) not in page.text
        api = _upload(c, ingested["png"])
        assert str(home) not in api.text and "/api/" not in api.json()["error"]


def test_no_swagger_ui_from_a_cdn(client):
    r = client.get("/docs", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/api-docs"
    for path in ("/api-docs", "/models"):
        assert 'href="/docs"' not in client.get(path).text
    assert client.get("/openapi.json").json()["paths"]["/api/query/image"]
