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
    assert r.exit_code == 2 and "img0.png changed since this run judged it" in r.output
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


# ---------------------------------------------------------------------------
# Ctrl-C: always 130 and one line, whatever the process was doing


INTERRUPTED = "interrupted; run the same command to resume"


def _eval_proc(setup, run, judge=("--judge", "eval_judges:SlowLabels")):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "latentlens.cli", "eval", setup["name"], "--images", str(setup["images"]),
           "--visual-layers", "0,2", "--patches-per-image", "3", "--annotations", str(setup["ann"]),
           "--no-progress", "--run", run, *judge]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _items(conn, run) -> tuple[str | None, int]:
    row = conn.execute("SELECT status, items_done FROM eval_run WHERE name = %s", (run,)).fetchone()
    return (row[0], row[1]) if row else (None, 0)


@pytest.mark.slow
def test_sigint_at_any_point_exits_130_and_resumes_to_the_uninterrupted_verdicts(setup, db_url):
    """SIGINT used to land inside psycopg at times (2 of 9 just after the first patch): exit 3,
    "lost the database" and a traceback. Interrupt one run again and again, each time a little later."""
    judge = ("--judge", "eval_judges:SlowLabels")
    r = _eval(setup, run="sigint-straight", judge=judge)
    assert r.exit_code == 0, r.output
    want = _verdicts(db_url, "sigint-straight")
    # when: 'run' = as soon as it is running, N = once N more patches are recorded
    for when in ("run", 1, 1, 2, 1):
        proc = _eval_proc(setup, "sigint", judge)
        deadline = time.time() + 120
        with psycopg.connect(db_url, autocommit=True) as conn:
            start = _items(conn, "sigint")[1]
            while time.time() < deadline and proc.poll() is None:
                status, n = _items(conn, "sigint")
                if status == "running" and (when == "run" or n >= start + when):
                    break
                time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (when, err)
        assert "Traceback" not in err and "lost the database" not in err, err
        assert err.strip().splitlines()[-1] == INTERRUPTED, err
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert _items(conn, "sigint")[0] == "interrupted"
    r = _eval(setup, run="sigint", judge=judge)
    assert r.exit_code == 0, r.output
    assert _verdicts(db_url, "sigint") == want


def test_ctrl_c_inside_a_database_call_is_130_not_a_lost_database(setup, db_url, monkeypatch):
    """The interrupt arrives while psycopg waits on the server (a slow INSERT here)."""
    import threading

    from latentlens.store import Store

    real = Store.record_eval_item

    def slow_record(self, run, item, verdicts):
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        self._fetch("SELECT pg_sleep(1)")
        return real(self, run, item, verdicts)

    monkeypatch.setattr(Store, "record_eval_item", slow_record)
    r = _eval(setup, "--num-images", "1", run="ctrl-c-db")
    assert r.exit_code == 130, r.output
    assert INTERRUPTED in r.output and "lost the database" not in r.output
    monkeypatch.setattr(Store, "record_eval_item", real)
    with psycopg.connect(db_url, autocommit=True) as conn:
        # the connection stayed usable: the run is recorded as interrupted, not left "running"
        assert _items(conn, "ctrl-c-db")[0] == "interrupted"
    r = _eval(setup, "--num-images", "1", run="ctrl-c-db")
    assert r.exit_code == 0, r.output
    assert len(_verdicts(db_url, "ctrl-c-db")) == 3 * 2 * 3


def test_sigint_never_leaves_psycopg_half_way(db_url):
    """Unguarded, a SIGINT between psycopg's send and its read left the connection busy: the rollback
    failed ("error ignored in rollback"), then every statement raised "another command is already in
    progress", which the CLI reported as a lost database (exit 3; this loop without the guard fails
    within a few interrupts). Guarded, every interrupt is a KeyboardInterrupt outside psycopg and the
    connection stays usable."""
    import contextlib
    import random
    import threading

    from psycopg.types.json import Jsonb

    from latentlens.eval.interrupts import deferred_in_psycopg
    from latentlens.store import Store

    rng = random.Random(0)
    interrupts = 0
    with Store.open(db_url) as store, deferred_in_psycopg() as guard:
        for _ in range(40):
            timer = threading.Timer(rng.uniform(0, 0.01), os.kill, (os.getpid(), signal.SIGINT))
            try:
                timer.start()
                for _ in range(50):
                    with store.transaction() as conn:
                        conn.execute("CREATE TEMP TABLE IF NOT EXISTS t (a int, j jsonb)")
                        with conn.cursor() as cur:
                            cur.executemany("INSERT INTO t VALUES (%s, %s)", [(k, Jsonb({"k": k})) for k in range(20)])
                        conn.execute("SELECT count(*) FROM t").fetchall()
                    guard.check()  # where the runner checks: after each database call
                time.sleep(0.1)
            except KeyboardInterrupt:
                interrupts += 1
            while timer.is_alive():
                with contextlib.suppress(KeyboardInterrupt):
                    timer.join()
            assert store._fetch("SELECT 1") == [(1,)]
    assert interrupts >= 30


# ---------------------------------------------------------------------------
# a resume never mixes models or patches


def _partial(db_url, run, drop_item):
    """Make a finished run look interrupted with one item still to judge."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM eval_item WHERE item = %s AND run_id = (SELECT id FROM eval_run WHERE name = %s)",
                     (drop_item, run))
        conn.execute("UPDATE eval_run SET status = 'interrupted', items_done = items_done - 1 WHERE name = %s",
                     (run,))


def test_resume_with_a_changed_model_is_refused(setup, db_url, tmp_path):
    """The fingerprint named the model but not its weights, revision or processor: a resume judged the
    rest with whatever model the dir held by then, mixing verdicts of two models."""
    import shutil

    from safetensors.numpy import load_file, save_file

    model = tmp_path / "vlm"
    shutil.copytree(setup["dir"], model)
    args = ["eval", str(model), "--images", str(setup["images"]), "--num-images", "2", "--visual-layers", "1",
            "--methods", "logitlens", "--patches-per-image", "2", "--judge", "labels",
            "--annotations", str(setup["ann"]), "--no-progress", "--run", "model-changed"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    want = _verdicts(db_url, "model-changed")
    _partial(db_url, "model-changed", 3)
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(weights)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + np.float32(1e-3)  # one tensor of many, slightly: a fine-tune's step
    save_file(tensors, weights, metadata={"format": "pt"})
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert "was judged with another" in r.output and "its weights changed since" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    weights.write_bytes(original)
    proc = model / "preprocessor_config.json"
    proc_text = proc.read_text()
    cfg = json.loads(proc_text)
    cfg["image_mean"] = [0.5, 0.5, 0.5]
    proc.write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "its processor changed since" in r.output, r.output
    proc.write_text(proc_text)
    # the same bytes copied elsewhere and touched: the same model (no mtimes, no paths)
    os.utime(weights, (1, 1))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "resuming" in r.output, r.output
    assert _verdicts(db_url, "model-changed") == want


def test_model_identity_of_a_hub_id_is_its_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from latentlens.errors import InputError
    from latentlens.eval.identity import model_identity

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--org--vlm"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    first = model_identity("org/vlm")
    assert first["commit"] == "a" * 40 and first["kind"] == "hub"
    (repo / "refs" / "main").write_text("b" * 40)  # main moved on: another model
    assert model_identity("org/vlm")["commit"] == "b" * 40
    assert model_identity("org/vlm", "c" * 40)["commit"] == "c" * 40  # a pinned commit needs no lookup
    with pytest.raises(InputError, match="cannot resolve model 'org/other' to a commit") as e:
        model_identity("org/other")
    assert "\n" not in str(e.value)


def test_resume_compares_the_stored_patches_with_the_draw(setup, db_url, monkeypatch):
    """Resume skipped items by number only: a draw that changed (another processor or latentlens)
    judged other patches under the same numbers."""
    from latentlens.eval import runner

    r = _eval(setup, "--num-images", "2", "--methods", "logitlens", run="redraw")
    assert r.exit_code == 0, r.output
    _partial(db_url, "redraw", 4)
    draw = runner.choose_patches
    monkeypatch.setattr(runner, "choose_patches", lambda patches, per, seed, i: draw(patches, per, seed + 1, i))
    r = _eval(setup, "--num-images", "2", "--methods", "logitlens", run="redraw")
    assert r.exit_code == 2, r.output
    assert "of eval run 'redraw' is patch" in r.output and "the draw now gives patch" in r.output
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT items_done FROM eval_run WHERE name = 'redraw'").fetchone()[0] == 5
    monkeypatch.setattr(runner, "choose_patches", draw)
    r = _eval(setup, "--num-images", "2", "--methods", "logitlens", run="redraw")
    assert r.exit_code == 0 and "resuming" in r.output, r.output


def test_list_reads_pg_locks_and_never_takes_a_runs_lock(setup, db_url):
    """--list took and released each running run's lock: an eval starting in that moment failed
    "being judged". It reads pg_locks now."""
    from latentlens.store import Store

    r = _eval(setup, "--num-images", "1", "--methods", "logitlens", run="listed")
    assert r.exit_code == 0, r.output
    with Store.open(db_url) as holder, Store.open(db_url) as lister:
        run = holder.get_eval_run("listed")
        holder.set_eval_status(run, "running")
        statements: list[str] = []
        fetch = lister._fetch

        def spy(sql, params=()):
            statements.append(sql)
            return fetch(sql, params)

        lister._fetch = spy  # type: ignore[method-assign]
        assert holder.lock_eval_run(run)
        assert {r.name: r.status for r in lister.list_eval_runs()}["listed"] == "running"
        holder.unlock_eval_run(run)
        assert {r.name: r.status for r in lister.list_eval_runs()}["listed"] == "stopped"
        assert not any("advisory_lock" in s or "advisory_unlock" in s for s in statements), statements
        # listing over and over while a run starts: it always gets its lock
        import threading

        stop = threading.Event()

        def list_forever():
            with Store.open(db_url) as s:
                while not stop.is_set():
                    s.list_eval_runs()

        t = threading.Thread(target=list_forever)
        t.start()
        try:
            for _ in range(200):
                assert holder.lock_eval_run(run)
                holder.unlock_eval_run(run)
        finally:
            stop.set()
            t.join()
