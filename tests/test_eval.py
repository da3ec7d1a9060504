"""`llens eval` on a tiny random LLaVA: the labels judge end to end, the summary against a
hand computation, resume after kill -9, and the OpenAI-compatible judge against a local endpoint."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli
from PIL import Image
from vlm_tiny import CORPUS, WORDS, build_llava, sample_image

from latentlens.eval import JudgeTask, LabelsJudge, summarize, wilson
from latentlens.eval.judges import MalformedAnswer, parse_answer
from latentlens.eval.sampling import choose_patches, real_patches
from latentlens.vlm.geometry import Patch

TESTS = Path(__file__).resolve().parent
LABELLED = WORDS[: len(WORDS) // 2]  # half the vocabulary names the left half of every image


@pytest.fixture(scope="module")
def setup(db_url, tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    model_dir = build_llava(base / "tiny-llava")
    corpus = base / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    r = CliRunner().invoke(cli, ["ingest", str(model_dir), str(corpus), "--layers", "0,1,2,3",
                                 "--skip-positions", "0", "--no-index", "--no-progress"])
    assert r.exit_code == 0, r.output
    images = base / "images"
    images.mkdir()
    rows = []
    for i, size in enumerate([(64, 64), (96, 64), (64, 96), (80, 80)]):
        img = sample_image(size)
        if i % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(images / f"img{i}.png")
        w, h = size
        rows.append({"image": f"img{i}.png", "x": 0, "y": 0, "w": w / 2, "h": h, "names": LABELLED})
        rows.append({"image": f"img{i}.png", "x": w / 2, "y": 0, "w": w / 2, "h": h / 2,
                     "names": ["parked cars"]})
    ann = base / "regions.jsonl"
    ann.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return {"name": "tiny-llava", "dir": model_dir, "images": images, "ann": ann, "base": base}


def _eval(setup, *args, run="r", judge=("--judge", "labels")):
    labels = [] if "openai-compatible" in judge else ["--annotations", str(setup["ann"])]
    cmd = ["eval", setup["name"], "--images", str(setup["images"]), "--visual-layers", "0,2",
           "--patches-per-image", "3", *labels, "--no-progress", "--run", run, *judge, *args]
    return CliRunner().invoke(cli, cmd)


def _verdicts(db_url, run):
    with psycopg.connect(db_url) as conn:
        return sorted(conn.execute(
            "SELECT v.item, v.method, v.visual_layer, v.words, v.interpretable, v.category "
            "FROM eval_verdict v JOIN eval_run r ON r.id = v.run_id WHERE r.name = %s", (run,)).fetchall())


def test_labels_judge_end_to_end_and_summary_matches_hand_count(setup, db_url, tmp_path):
    r = _eval(setup, run="labels-1")
    assert r.exit_code == 0, r.output
    rows = _verdicts(db_url, "labels-1")
    # 4 images x 3 patches x 2 visual layers x 3 methods
    assert len(rows) == 4 * 3 * 2 * 3
    assert {m for _, m, *_ in rows} == {"latentlens", "logitlens", "embeddinglens"}
    assert any(x[4] for x in rows) and not all(x[4] for x in rows)
    # every verdict is what the labels rule says about its words and box
    exported = tmp_path / "v.jsonl"
    r = CliRunner().invoke(cli, ["eval", "--summary", "labels-1", "--export", str(exported),
                                 "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in exported.read_text().splitlines()]
    assert len(recs) == len(rows)
    for rec in recs:
        x0, y0, x1, y1 = rec["box"]
        w, h = rec["image_size"]
        in_left = (min(x1, w / 2) - x0) * (y1 - y0) >= 0.5 * (x1 - x0) * (y1 - y0)
        expect = in_left and any(word.lower() in LABELLED for word in rec["words"])
        in_cars = (max(0, min(x1, w) - max(x0, w / 2)) * max(0, min(y1, h / 2) - y0)
                   >= 0.5 * (x1 - x0) * (y1 - y0))
        expect = expect or (in_cars and any(word.lower() in ("car", "cars") for word in rec["words"]))
        assert rec["interpretable"] == expect, rec
    # the summary equals a hand count of the stored verdicts
    out = json.loads(r.stdout)
    hand: dict[tuple[str, int], list[int]] = {}
    for rec in recs:
        c = hand.setdefault((rec["method"], rec["visual_layer"]), [0, 0])
        c[0] += 1
        c[1] += bool(rec["interpretable"])
    assert len(out["summary"]) == len(hand) == 6
    for row in out["summary"]:
        n, k = hand[(row["method"], row["visual_layer"])]
        assert (row["judged"], row["interpretable"]) == (n, k)
        assert row["pct"] == round(100 * k / n, 2)
        lo, hi = wilson(k, n)
        assert row["ci_low"] <= row["pct"] <= row["ci_high"] and row["ci_low"] == round(lo, 2)
    assert [row["method"] for row in out["summary"][::2]] == ["latentlens", "logitlens", "embeddinglens"]
    png = Path(out["files"]["png"])
    assert png.stat().st_size > 5000 and Image.open(png).size[0] > 500
    csv_lines = Path(out["files"]["csv"]).read_text().splitlines()
    assert csv_lines[0].startswith("method,visual_layer,judged,interpretable,pct") and len(csv_lines) == 7


def test_rerun_resumes_and_changed_settings_are_refused(setup, db_url):
    r = _eval(setup, run="labels-2")
    assert r.exit_code == 0, r.output
    first = _verdicts(db_url, "labels-2")
    r = _eval(setup, run="labels-2")
    assert r.exit_code == 0 and "already complete" in r.output
    assert _verdicts(db_url, "labels-2") == first
    r = _eval(setup, "--seed", "5", run="labels-2")
    assert r.exit_code == 2 and "other settings" in r.output and "Traceback" not in r.output


def test_kill_9_mid_eval_then_rerun_gives_the_uninterrupted_verdicts(setup, db_url):
    judge = ("--judge", "eval_judges:SlowLabels")
    r = _eval(setup, run="straight", judge=judge)
    assert r.exit_code == 0, r.output
    want = _verdicts(db_url, "straight")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "latentlens.cli", "eval", setup["name"], "--images", str(setup["images"]),
           "--visual-layers", "0,2", "--patches-per-image", "3", "--annotations", str(setup["ann"]),
           "--no-progress", "--run", "killed", *judge]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    items = 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        while time.time() < deadline and proc.poll() is None:
            items = conn.execute("SELECT count(*) FROM eval_item i JOIN eval_run r ON r.id = i.run_id "
                                 "WHERE r.name = 'killed'").fetchone()[0]
            if items >= 2:
                break
            time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _verdicts(db_url, "killed")
    assert 0 < len(partial) < len(want)
    assert len(partial) % 6 == 0  # whole items only: 2 layers x 3 methods each
    r = _eval(setup, run="killed", judge=judge)
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    assert _verdicts(db_url, "killed") == want


def test_labels_judge_rules(setup):
    judge = LabelsJudge(setup["ann"])
    img = sample_image((64, 64))
    left = (0.0, 0.0, 16.0, 16.0)
    right_top = (48.0, 0.0, 64.0, 16.0)
    task = JudgeTask(img, "img0.png", left, left, ["Dogs", "zebra"])
    v = judge.judge(task)
    assert "dog" in LABELLED and v.interpretable and v.answer["matched"] == {"Dogs": "dog"}
    v = judge.judge(JudgeTask(img, "img0.png", right_top, right_top, ["car"]))
    assert v.interpretable and v.answer["matched"] == {"car": "parked cars"}  # lemma of the label's head
    v = judge.judge(JudgeTask(img, "img0.png", right_top, right_top, ["dog"]))
    assert not v.interpretable and v.category is None
    v = judge.judge(JudgeTask(img, "other.png", left, left, ["dog"]))
    assert not v.interpretable


def test_patch_sampling_skips_padding_and_is_repeatable():
    full = [Patch(i, 0, i, (i * 10.0, 0.0, i * 10.0 + 10, 10.0)) for i in range(4)]
    padded = [Patch(4, 1, 0, (0.0, 10.0, 10.0, 13.0)), Patch(5, 1, 1, (10.0, 10.0, 10.0, 10.0))]
    assert real_patches(full + padded) == full
    a = choose_patches(full + padded, 2, seed=3, image_index=1)
    assert a == choose_patches(full + padded, 2, seed=3, image_index=1) and all(p in full for p in a)


def test_parse_answer_validates():
    words = ["dog", "Grass", "sky"]
    got = parse_answer('sure: ```json {"reasoning": "x", "concrete_words": ["grass", "tree"], '
                       '"abstract_words": [], "global_words": ["SKY"]}```', words)
    assert got["concrete_words"] == ["Grass"] and got["global_words"] == ["sky"]
    assert got["ignored_words"] == ["tree"]
    for bad in ["no json here", '{"reasoning": "x"}', '{"concrete_words": "dog"}', "[1, 2]", "{oops}"]:
        with pytest.raises(MalformedAnswer):
            parse_answer(bad, words)


# ---------------------------------------------------------------------------
# the openai-compatible judge against a local endpoint


def _png(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def test_openai_compatible_judge_against_a_local_endpoint(setup, db_url, httpserver, monkeypatch):
    from werkzeug import Response

    seen: list[dict] = []
    script = ["500", "ok", "malformed", "empty"]

    def handler(request):
        body = request.get_json()
        assert request.headers["Authorization"] == "Bearer sekret-123"
        step = script[min(len(seen), len(script) - 1)]
        seen.append(body)
        if step == "500":
            return Response("upstream broke", status=500)
        msg = body["messages"][0]["content"]
        assert [c["type"] for c in msg] == ["image_url", "text", "image_url"]
        full, crop = _png(msg[0]["image_url"]["url"]), _png(msg[2]["image_url"]["url"])
        arr = np.asarray(full)
        red = (arr[..., 0] > 200) & (arr[..., 1] < 60) & (arr[..., 2] < 60)
        assert red.sum() > 20  # the region is outlined in red
        assert min(crop.size) >= 128
        words = json.loads(msg[1]["text"].split("this region: ", 1)[1].split("\n", 1)[0])
        assert words and "concrete" in msg[1]["text"]
        if step == "malformed":
            content = "I think it is a dog."
        elif step == "ok":
            content = json.dumps({"reasoning": "visible", "concrete_words": [words[0]],
                                  "abstract_words": [], "global_words": []})
        else:
            content = json.dumps({"reasoning": "nothing fits", "concrete_words": [],
                                  "abstract_words": [], "global_words": []})
        return Response(json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
        }), content_type="application/json")

    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_handler(handler)
    monkeypatch.setenv("JUDGE_KEY", "sekret-123")
    r = _eval(setup, "--methods", "logitlens", "--num-images", "1", "--patches-per-image", "2",
              "--visual-layers", "1", run="api",
              judge=("--judge", "openai-compatible", "--url", httpserver.url_for("/v1"),
                     "--model", "judge-vl", "--api-key-env", "JUDGE_KEY"))
    assert r.exit_code == 0, r.output
    assert len(seen) == 4  # 500 retried, then ok; malformed asked again, then a valid "none"
    assert all(b["model"] == "judge-vl" for b in seen)
    rows = _verdicts(db_url, "api")
    assert [(x[1], x[2], x[4], x[5]) for x in rows] == [("logitlens", 1, True, "concrete"),
                                                          ("logitlens", 1, False, None)]
    with psycopg.connect(db_url) as conn:
        settings, answers, shown = conn.execute(
            "SELECT r.judge_settings, array_agg(v.answer ORDER BY v.item), array_agg(v.shown ORDER BY v.item) "
            "FROM eval_run r JOIN eval_verdict v ON v.run_id = r.id WHERE r.name = 'api' "
            "GROUP BY r.judge_settings").fetchone()
    assert settings["api_key_env"] == "JUDGE_KEY" and "sekret" not in json.dumps(settings)
    assert "sekret" not in json.dumps(answers) + json.dumps(shown)
    assert answers[1]["malformed_before"] and answers[0]["parsed"]["concrete_words"]
    assert shown[0]["words"] and len(shown[0]["region"]) == 4


def test_failing_judge_leaves_the_run_resumable(setup, db_url, httpserver):
    from werkzeug import Response

    httpserver.expect_request("/v1/chat/completions").respond_with_handler(
        lambda request: Response("down", status=503))
    r = _eval(setup, "--methods", "embeddinglens", "--num-images", "1", "--visual-layers", "1", run="down",
              judge=("--judge", "openai-compatible", "--url", httpserver.url_for("/v1"), "--model", "m"))
    assert r.exit_code == 1 and "run the same command again to resume" in r.output
    assert "Traceback" not in r.output
    with psycopg.connect(db_url) as conn:
        status, n = conn.execute("SELECT status, (SELECT count(*) FROM eval_item i WHERE i.run_id = r.id) "
                                 "FROM eval_run r WHERE name = 'down'").fetchone()
    assert status == "failed" and n == 0


def test_eval_usage_errors(setup):
    r = CliRunner().invoke(cli, ["eval", setup["name"], "--images", str(setup["images"])])
    assert r.exit_code == 2 and "--judge" in r.output
    r = _eval(setup, judge=("--judge", "nope"))
    assert r.exit_code == 2 and "unknown judge 'nope'" in r.output
    r = CliRunner().invoke(cli, ["eval", setup["name"], "--images", "/no/such/dir", "--judge", "labels",
                                 "--annotations", str(setup["ann"])])
    assert r.exit_code == 2 and "no such directory" in r.output
    r = CliRunner().invoke(cli, ["eval", "--summary", "never-ran"])
    assert r.exit_code == 2 and "no eval run 'never-ran'" in r.output


def test_summary_rows_order_and_interval():
    rows = summarize([("logitlens", 2, 10, 1), ("latentlens", 2, 10, 9), ("latentlens", 0, 4, 0)],
                     ["latentlens", "logitlens"])
    assert [(r.method, r.visual_layer) for r in rows] == [("latentlens", 0), ("latentlens", 2), ("logitlens", 2)]
    assert rows[0].pct == 0.0 and rows[0].ci_low == 0.0 and 40 < rows[0].ci_high < 60
    lo, hi = wilson(9, 10)
    assert 55 < lo < 60 and 98 < hi < 99.9


def test_review_guards(setup, db_url, tmp_path):
    # a run being judged elsewhere (its lock held) is refused, not judged twice
    from latentlens.store import Store

    r = _eval(setup, "--num-images", "1", run="locked")
    assert r.exit_code == 0, r.output
    with Store.open(db_url) as other:
        run = other.get_eval_run("locked")
        other._fetch("UPDATE eval_run SET status = 'running' WHERE id = %s RETURNING id", (run.id,))
        assert other.lock_eval_run(run)
        r = _eval(setup, "--num-images", "1", run="locked")
        assert r.exit_code == 2 and "is being judged by" in r.output
        other.unlock_eval_run(run)
    # an image replaced since it was judged stops a resume
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    sample_image((64, 64)).save(imgs / "img0.png")
    sample_image((96, 64)).save(imgs / "img1.png")
    args = ["eval", setup["name"], "--images", str(imgs), "--visual-layers", "1", "--patches-per-image", "2",
            "--annotations", str(setup["ann"]), "--judge", "labels", "--no-progress", "--run", "changed"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM eval_item WHERE item = 3 AND run_id = (SELECT id FROM eval_run "
                     "WHERE name = 'changed')")
        conn.execute("UPDATE eval_run SET status = 'interrupted' WHERE name = 'changed'")
    sample_image((64, 64)).transpose(Image.Transpose.ROTATE_90).save(imgs / "img0.png")
    sample_image((64, 96)).save(imgs / "img1.png")
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "img1.png changed since this run judged it" in r.output
    # labels that name none of the images: an error, not a silent 0%
    other_ann = tmp_path / "other.jsonl"
    other_ann.write_text(json.dumps({"image": "elsewhere.png", "x": 0, "y": 0, "w": 5, "h": 5, "names": ["dog"]}))
    r = _eval(setup, "--annotations", str(other_ann), run="nolabels")
    assert r.exit_code == 2 and "none of the 4 images has a region" in r.output
    # one image file is a valid --images
    r = CliRunner().invoke(cli, ["eval", setup["name"], "--images", str(imgs / "img0.png"), "--visual-layers", "1",
                                 "--judge", "labels", "--annotations", str(setup["ann"]), "--no-progress",
                                 "--run", "single", "--json"])
    assert r.exit_code == 0, r.output
    # judge options are checked by name, not by a Python signature
    r = CliRunner().invoke(cli, ["eval", setup["name"], "--images", str(imgs), "--judge", "labels"])
    assert r.exit_code == 2 and "judge 'labels' needs --annotations FILE" in r.output
    r = CliRunner().invoke(cli, ["eval", setup["name"], "--images", str(imgs), "--judge", "labels",
                                 "--annotations", str(setup["ann"]), "--url", "http://x"])
    assert r.exit_code == 2 and "takes no --url" in r.output
    # export into a folder that does not exist yet
    r = CliRunner().invoke(cli, ["eval", "--summary", "single", "--export", str(tmp_path / "a" / "b" / "v.jsonl"),
                                 "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "b" / "v.jsonl").read_text().strip()


def test_parse_answer_skips_braces_before_the_json():
    text = ('<think>maybe {"x": 1} or {broken</think> {"reasoning": "r", "concrete_words": ["dog"], '
            '"abstract_words": [], "global_words": []}')
    assert parse_answer(text, ["dog"])["concrete_words"] == ["dog"]
