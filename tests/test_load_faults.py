"""Load and faults: concurrent ingests and queries, kill -9 at random points, a server
restarted under a running command, a statement timeout and a full disk.

Everything talks to PostgreSQL on a unix socket (the session's embedded server, or a
spare embedded server of this module's own for the tests that stop it) and to the web
app in-process; every loop is bounded in count and time. Each fault is followed by
the same command again, and the final rows are compared with an uninterrupted run of
the same work (stored under another name): same (sentence, position, layer) keys,
same vectors, no duplicate, nothing half-written marked complete.

Where a fault reaches the command line as a traceback instead of one ``Error:`` line,
the data checks still run first; the message check then ends the test as an expected
failure naming the gap (see docs/reliability.md), so that fixing it turns them green.

The kill -9 tests (ingest at three points, import at two, eval at two) start a fresh
interpreter with torch for every kill and are marked slow; the server-restart,
statement-timeout and full-disk faults are injected by a thread while the command runs
in this process (click's CliRunner), which keeps them fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch
from _ingest_ref import stored_rows
from click.testing import CliRunner
from conftest import server_tmpdir
from latentlens.cli.main import cli

from latentlens import migrate
from latentlens.db import EmbeddedServer
from latentlens.errors import LatentLensError
from latentlens.models.tiny import make_tiny_model, sample_corpus_path

LAYERS = "1,3"
LAYER_LIST = [1, 3]
N = 300  # corpus sentences
SEED = 12  # kill points, query vectors
LLENS = [sys.executable, "-m", "latentlens.cli"]
CMD_TIMEOUT = 180  # seconds any one command may take before the test calls it hung


# ---------------------------------------------------------------------------
# helpers


def _env(**extra: str) -> dict[str, str]:
    """The test's env (database URL, dirs) with one torch thread: tiny models are all overhead."""
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def _popen(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(LLENS + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(**env))


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(LLENS + args, capture_output=True, text=True, timeout=CMD_TIMEOUT, env=_env(**env))


def _ok(p: subprocess.CompletedProcess | tuple) -> str:
    rc, err = (p.returncode, p.stderr) if isinstance(p, subprocess.CompletedProcess) else p
    assert rc == 0, err[-3000:]
    return err


def _ingest_args(model: Path, corpus: Path, name: str, *extra: str) -> list[str]:
    return ["ingest", str(model), str(corpus), "--name", name, "--layers", LAYERS, "--no-progress", *extra]


def error_line(err: str) -> str | None:
    """The one ``Error: ...`` line of a failed command; None if it printed a traceback or no such line."""
    if "Traceback" in err:
        return None
    lines = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
    return lines[0] if len(lines) == 1 else None


def last_line(err: str) -> str:
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    return lines[-1] if lines else "(nothing)"


def check_message(gaps: list[str], what: str, rc: int, err: str, codes: tuple[int, ...]) -> None:
    """A failed command must say one clear line with a documented exit code; else note the gap."""
    line = error_line(err)
    if rc in codes and line:
        return
    gaps.append(f"{what}: exit {rc}, " + (f"said {line!r}" if line else f"traceback ending {last_line(err)!r}"))


def end_with_gaps(gaps: list[str]) -> None:
    """After the data checks: every failure said one clear line with a documented exit code."""
    assert not gaps, "data intact, but: " + " | ".join(gaps)


def _runs(url: str, name: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT r.id, r.status, r.sentences_done, r.rows_written, r.error FROM ingest_run r "
            "JOIN model m ON m.id = r.model_id WHERE m.name = %s ORDER BY r.id", (name,)).fetchall()


def _counts(url: str, name: str) -> tuple[int, int]:
    """(rows, distinct (layer, sentence, position) keys) stored for a model."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (e.layer, e.sentence_id, e.position)) FROM token_embedding e "
            "JOIN model m ON m.id = e.model_id WHERE m.name = %s", (name,)).fetchone()
    return int(row[0]), int(row[1])


def _done(url: str, name: str) -> int:
    """Sentences a model's latest run has committed (0 before it exists)."""
    with contextlib.suppress(psycopg.OperationalError), psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT r.sentences_done FROM ingest_run r JOIN model m ON m.id = r.model_id "
            "WHERE m.name = %s ORDER BY r.id DESC LIMIT 1", (name,)).fetchone()
        return int(row[0]) if row else 0
    return 0


def wait_for(cond, proc: subprocess.Popen | None = None, timeout: float = 120, what: str = "progress"):
    """Poll ``cond()`` until truthy; None if ``proc`` ended first; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {timeout}s")


def assert_consistent_after_fault(url: str, name: str) -> tuple:
    """After a killed or failed ingest: not done, and the rows are exactly the committed chunks'."""
    (run,) = _runs(url, name)
    run_id, status, done, rows_written, _ = run
    assert status != "done" and done < N, run
    rows, keys = _counts(url, name)
    assert rows == keys == rows_written * len(LAYER_LIST), (rows, keys, run)
    return run


def assert_same_rows(url: str, name: str, ref_url: str, ref_name: str) -> None:
    """Same (sentence ordinal, position) keys at every layer, same token and prefix, same vectors."""
    for layer in LAYER_LIST:
        got, want = stored_rows(url, name, layer), stored_rows(ref_url, ref_name, layer)
        assert set(got) == set(want), (
            f"layer {layer}: {len(got)} rows vs {len(want)}; missing {sorted(set(want) - set(got))[:5]}, "
            f"extra {sorted(set(got) - set(want))[:5]}")
        keys = sorted(want)
        assert [got[k][:3] for k in keys] == [want[k][:3] for k in keys]
        a = np.stack([got[k][3] for k in keys])
        b = np.stack([want[k][3] for k in keys])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.999, f"layer {layer}: min cosine {cos.min()}"
    rows, keys = _counts(url, name)
    assert rows == keys, "duplicate rows"


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory, db_url):
    base = tmp_path_factory.mktemp("loadfaults")
    llama = make_tiny_model(base / "llama", "llama", hidden=64, layers=4)
    gemma = make_tiny_model(base / "gemma", "gemma3_text", bos=True, padding_side="left", hidden=32, layers=3)
    corpus = base / "corpus.txt"
    corpus.write_text("\n".join(sample_corpus_path().read_text(encoding="utf-8").splitlines()[:N]) + "\n")
    return {"base": base, "llama": llama, "gemma": gemma, "corpus": corpus}


@pytest.fixture(scope="module")
def reference(setup, db_url):
    """Uninterrupted single-process runs: ref_a (llama), ref_b (gemma), one after the other."""
    from latentlens.corpus import read_corpus
    from latentlens.ingest import IngestOptions, ingest
    from latentlens.models import load_language_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for src, name in ((setup["llama"], "ref_a"), (setup["gemma"], "ref_b")):
            lm = load_language_model(str(src), name=name, lens_heads=False)
            res = ingest(lm, read_corpus(str(setup["corpus"])), database_url=db_url,
                         options=IngestOptions(layers=LAYERS, batch_size=16, build_index=False, progress=False),
                         echo=lambda _msg: None)
            assert res.run.status == "done"
    finally:
        torch.set_num_threads(before)
    return {"ref_a": _counts(db_url, "ref_a"), "ref_b": _counts(db_url, "ref_b")}


@pytest.fixture(scope="module")
def spare():
    """An embedded server of this module's own, which tests stop and restart."""
    base = server_tmpdir("llens-spare-")
    srv = EmbeddedServer(base / "data")
    url = srv.start()
    migrate.upgrade(url)
    box = {"srv": srv, "url": url}
    yield box
    srv.stop()
    shutil.rmtree(base, ignore_errors=True)


def restart(box: dict, *, file_size_limit: int | None = None) -> str:
    """Stop the spare server if it runs, start it again (its postmaster optionally under a
    file size limit, inherited from this process for the moment of the start)."""
    srv: EmbeddedServer = box["srv"]
    srv.stop()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if file_size_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, hard))
    try:
        box["url"] = srv.start()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return box["url"]


# ---------------------------------------------------------------------------
# 1. two ingests and four query clients at once


def _answer(results) -> list[list[tuple]]:
    return [[(n.sentence_id, n.position, n.layer, round(n.similarity, 3)) for n in r.neighbours] for r in results]


class Client(threading.Thread):
    """Runs ``step()`` until told to stop (at most ``max_steps`` times): counts answers, sorts errors."""

    def __init__(self, name: str, step, stop: threading.Event, deadline: float, max_steps: int = 1000,
                 pause: float = 0.1):
        super().__init__(name=name, daemon=True)
        self.step, self.halt, self.deadline, self.max_steps = step, stop, deadline, max_steps
        self.pause = pause  # between steps: clients that never pause would starve the ingests on 2 cores
        self.answered = 0
        self.clear_errors: list[str] = []
        self.bad: list[str] = []

    def run(self) -> None:
        for _ in range(self.max_steps):
            if self.halt.is_set() or time.monotonic() > self.deadline:
                return
            try:
                self.step(self)
            except Exception as e:  # noqa: BLE001 - sorted below
                self.bad.append(f"{type(e).__name__}: {e}")
            self.halt.wait(self.pause)


def test_two_ingests_and_four_query_clients_at_once(setup, db_url, reference, tmp_path):
    from fastapi.testclient import TestClient
    from serve_app import make_app

    from latentlens.query import Lens

    rng = np.random.default_rng(SEED)
    q = rng.normal(size=(8, 64)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    with Lens.connect(db_url) as lens:
        want_a = _answer(lens.neighbors(q, "ref_a", k=5, mode="exact"))
    qb = rng.normal(size=32).astype(np.float32)
    qb_text = "[" + ",".join(f"{x:.5f}" for x in qb) + "]"
    text = setup["corpus"].read_text().splitlines()[7]

    ingests = {name: _popen(_ingest_args(setup[m], setup["corpus"], name, "--batch-size", "8"))
               for m, name in (("llama", "load_a"), ("gemma", "load_b"))}
    stop = threading.Event()
    deadline = time.monotonic() + CMD_TIMEOUT

    # (a) the Python API, its own Store: a finished model (answers must not change) and a growing one
    lens = Lens.connect(db_url)

    def api_step(c: Client) -> None:
        assert _answer(lens.neighbors(q, "ref_a", k=5, mode="exact")) == want_a, "answer changed under load"
        try:
            lens.neighbors(q, "load_a", k=5)
        except LatentLensError as e:  # not there yet / no rows yet
            c.clear_errors.append(str(e))
            assert "\n" not in str(e)
        c.answered += 1

    # (b) plain SQL, as any team member may: the finished gemma and the growing one
    sql = psycopg.connect(db_url, autocommit=True)
    want_b = sql.execute("SELECT sentence_id, position, layer FROM llens_neighbors('ref_b', 1, %s::halfvec, 5)",
                         (qb_text,)).fetchall()

    def sql_step(c: Client) -> None:
        got = sql.execute("SELECT sentence_id, position, layer FROM llens_neighbors('ref_b', 1, %s::halfvec, 5)",
                          (qb_text,)).fetchall()
        assert got == want_b, "SQL answer changed under load"
        try:
            sql.execute("SELECT count(*) FROM llens_neighbors('load_b', 3, %s::halfvec, 5)", (qb_text,)).fetchall()
        except (psycopg.errors.RaiseException, psycopg.errors.NoDataFound) as e:  # model not there yet
            c.clear_errors.append(str(e).splitlines()[0])
        c.answered += 1

    # (c) the web app (llens serve's app, in-process): models and a text query that runs the model
    web = TestClient(make_app(db_url))
    web.__enter__()

    def web_step(c: Client) -> None:
        r = web.get("/api/models")
        assert r.status_code == 200, r.text
        r = web.post("/api/query/text", json={"model": "ref_a", "text": text, "query_layers": [3], "k": 3})
        assert r.status_code == 200, r.text
        assert r.json() and all(len(res["neighbours"]) == 3 for res in r.json())
        r = web.post("/api/query/text", json={"model": "load_a", "text": text, "query_layers": [3], "k": 3})
        if r.status_code != 200:
            assert r.status_code in (400, 404) and "Traceback" not in r.text, r.text
            c.clear_errors.append(r.json()["error"])
        c.answered += 1

    # (d) the command line: `llens query --vectors`, one process per query
    def cli_step(c: Client) -> None:
        model = ("ref_a", "load_a")[c.answered % 2]  # the finished model, then the growing one
        p = _run(["query", model, "--vectors", str(tmp_path / "q.npy"), "-k", "5", "--json"])
        if p.returncode == 0:
            out = json.loads(p.stdout)
            assert len(out) == 8 and all(len(r["neighbours"]) == 5 for r in out)
            if model == "ref_a":
                got = [[(n["sentence_id"], n["position"], n["layer"]) for n in r["neighbours"]] for r in out]
                assert got == [[x[:3] for x in r] for r in want_a]
        else:
            line = error_line(p.stderr)
            assert p.returncode == 2 and line, p.stderr[-2000:]
            c.clear_errors.append(line)
        c.answered += 1

    clients = [Client("api", api_step, stop, deadline), Client("sql", sql_step, stop, deadline),
               Client("web", web_step, stop, deadline), Client("cli", cli_step, stop, deadline, max_steps=3)]
    try:
        for c in clients:
            c.start()
        outs = {name: p.communicate(timeout=CMD_TIMEOUT) for name, p in ingests.items()}
        # one more round of every client against the finished models
        rounds = {c.name: c.answered for c in clients}
        wait_for(lambda: all(c.answered > rounds[c.name] or not c.is_alive() for c in clients),
                 timeout=60, what="final round of the clients")
        stop.set()
        for c in clients:
            c.join(60)
        assert not [c.name for c in clients if c.is_alive()], "a client hung (deadlock?)"
        print("answered per client:", {c.name: c.answered for c in clients},
              "clear errors:", {c.name: len(c.clear_errors) for c in clients})
    finally:
        stop.set()
        for p in ingests.values():
            if p.poll() is None:
                p.kill()
        web.__exit__(None, None, None)
        lens.close()
        sql.close()
    for name, p in ingests.items():
        _ok((p.returncode, outs[name][1]))
    for c in clients:
        assert not c.bad, f"client {c.name}: {c.bad[:3]}"
        assert c.answered >= 2, f"client {c.name} answered {c.answered} times"
    # the final rows equal the sequential single-process runs'
    for name, ref in (("load_a", "ref_a"), ("load_b", "ref_b")):
        (run,) = _runs(db_url, name)
        assert run[1:3] == ("done", N)
        assert _counts(db_url, name) == reference[ref] and run[3] * len(LAYER_LIST) == reference[ref][0]
        assert_same_rows(db_url, name, db_url, ref)


# ---------------------------------------------------------------------------
# 2. kill -9 at random points, then the same command again


@pytest.mark.slow  # four interpreters with torch: ~25 s on 2 idle cores (one kill point: test_ingest_process.py)
def test_ingest_kill_9_at_three_random_points_then_resume(setup, db_url, reference):
    rng = np.random.default_rng(SEED)
    points = sorted(int(x) for x in rng.choice(np.arange(20, N - 60, 20), size=3, replace=False))
    args = _ingest_args(setup["llama"], setup["corpus"], "killed", "--no-index", "--batch-size", "4")
    landed = []
    for point in points:
        proc = _popen(args)
        try:
            got = wait_for(lambda p=point: _done(db_url, "killed") >= p, proc, what="ingest progress")
            assert got, "the ingest ended before the kill point: " + proc.communicate()[1][-2000:]
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        run = assert_consistent_after_fault(db_url, "killed")
        landed.append(run[2])
    assert landed == sorted(landed) and len(set(landed)) == 3, landed
    print(f"kill -9 targets {points}, landed after {landed} of {N} sentences")
    err = _ok(_run(args))
    assert f"Resuming run {run[0]}" in err
    (run,) = _runs(db_url, "killed")
    assert run[1:3] == ("done", N)
    assert _counts(db_url, "killed") == reference["ref_a"]
    assert_same_rows(db_url, "killed", db_url, "ref_a")


# ---------------------------------------------------------------------------
# 3. an import killed twice


def write_reference_dir(path: Path, layers: dict[int, tuple[np.ndarray, list[dict]]]) -> None:
    """What the reference ContextualIndex.save writes: metadata.json + layer_N/embeddings_cache.pt."""
    path.mkdir(parents=True)
    dim = next(iter(layers.values()))[0].shape[1]
    (path / "metadata.json").write_text(json.dumps({"layers": sorted(layers), "hidden_dim": dim}))
    for layer, (emb, meta) in layers.items():
        (path / f"layer_{layer}").mkdir()
        torch.save({"embeddings": torch.from_numpy(emb).half(), "metadata": meta},
                   path / f"layer_{layer}" / "embeddings_cache.pt")


def synthetic_index(path: Path, *, rows: int, dim: int, layers=(2, 5), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    per = 10  # positions per caption
    meta = [{"token_str": f" w{(i * 7) % 500}", "token_id": (i * 7) % 500, "caption": f"caption {i // per}",
             "position": i % per + 1} for i in range(rows)]
    write_reference_dir(path, {layer: (rng.normal(size=(rows, dim)).astype(np.float32), meta) for layer in layers})
    return path


def _import_state(url: str, name: str) -> dict[int, int]:
    """Rows per layer of an imported model ({} before it exists)."""
    with contextlib.suppress(psycopg.OperationalError), psycopg.connect(url, connect_timeout=5) as conn:
        return dict(conn.execute("SELECT l.layer, l.row_count FROM model_layer l JOIN model m ON m.id = l.model_id "
                                 "WHERE m.name = %s", (name,)).fetchall())
    return {}


def _same_import(url: str, a: str, b: str) -> int:
    """Rows of model a whose (caption, position, layer, vector) has no twin in model b, plus the reverse."""
    q = """SELECT s.text, e.position, e.layer, md5(e.embedding::text) FROM token_embedding e
             JOIN model m ON m.id = e.model_id JOIN sentence s ON s.id = e.sentence_id WHERE m.name = %s"""
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT count(*) FROM (({q} EXCEPT ALL {q}) UNION ALL ({q} EXCEPT ALL {q})) d",
                            (a, b, b, a)).fetchone()[0]


CHUNK = 16384  # import_index's rows per transaction


@pytest.mark.slow  # three interpreters with torch: ~16 s on 2 idle cores
def test_import_kill_9_twice_then_rerun(setup, db_url):
    from latentlens.interop import import_index
    from latentlens.store import Store

    rows = 2 * CHUNK + 3000
    src = synthetic_index(setup["base"] / "refidx", rows=rows, dim=32)
    with Store.open(db_url) as store:
        import_index(store, src, "imp_ref", corpus_name="refidx")
    args = ["import-index", str(src), "--model", "imp_killed", "--corpus-name", "refidx"]
    rng = np.random.default_rng(SEED)
    # kill once the import has committed this many rows (of 2 layers x 3 chunks)
    points = sorted(int(x) for x in rng.choice([1, 2, 3, 4], size=2, replace=False))
    landed = []
    for point in points:
        proc = _popen(args)
        try:
            got = wait_for(lambda p=point: sum(_import_state(db_url, "imp_killed").values()) >= p * CHUNK // 2,
                           proc, what="import progress")
            assert got, "the import ended before the kill point: " + proc.communicate()[1][-2000:]
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        state = _import_state(db_url, "imp_killed")
        # what a kill leaves: whole chunks only, and its run, still 'running', counting them
        assert 0 < sum(state.values()) < 2 * rows, state
        assert all(n % CHUNK == 0 or n == rows for n in state.values()), state
        assert _counts(db_url, "imp_killed")[0] == sum(state.values())
        with Store.open(db_url) as store:
            (run,) = store.list_runs("imp_killed")
        assert (run.kind, run.status, run.pid) == ("import", "running", proc.pid)
        assert run.rows_written == state[2]  # contexts: the first layer's rows
        landed.append(sum(state.values()))
    print(f"import killed after {landed} of {2 * rows} rows")
    p = _run(args + ["--json"])
    _ok(p)
    rep = json.loads(p.stdout)
    assert sum(r["written"] for r in rep["layers"].values()) < 2 * rows  # it skipped what was there
    assert rep["resumed"] and rep["run"] == run.id
    with Store.open(db_url) as store:
        (run,) = store.list_runs("imp_killed")
    assert run.status == "done" and run.rows_written == rows
    assert _import_state(db_url, "imp_killed") == {2: rows, 5: rows}
    assert _counts(db_url, "imp_killed") == (2 * rows, 2 * rows)
    assert _same_import(db_url, "imp_killed", "imp_ref") == 0


# ---------------------------------------------------------------------------
# 4-6: faults injected by a background thread while the command runs in this process
# (CliRunner: the same click command and error handling as `llens`, without a new
# interpreter's seconds of imports; kill -9 above needs real processes, these don't)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def check_invoke(gaps: list[str], what: str, r, codes: tuple[int, ...]) -> None:
    """CliRunner's result: an exception other than SystemExit is what `llens` shows as a traceback."""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        gaps.append(f"{what}: exit 1, traceback ending "
                    f"{type(r.exception).__module__}.{type(r.exception).__name__}: {last_line(str(r.exception))!r}")
        return
    check_message(gaps, what, r.exit_code, r.output, codes)


class Fault(threading.Thread):
    """Waits for ``ready()``, then does ``act()``; records whether it acted, never raises."""

    def __init__(self, ready, act, timeout: float = 120):
        super().__init__(daemon=True)
        self.ready, self.act, self.timeout = ready, act, timeout
        self.acted = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if wait_for(self.ready, timeout=self.timeout, what="the moment for the fault"):
                self.act()
                self.acted.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def _lock_waiters(url: str) -> int:
    with contextlib.suppress(psycopg.OperationalError), psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND pid <> pg_backend_pid()").fetchone()[0]
    return 0


def test_server_restarted_mid_query_and_mid_ingest(setup, db_url, reference, spare, tmp_path, one_torch_thread):
    from fastapi.testclient import TestClient
    from serve_app import make_app

    from latentlens.query import Lens

    gaps: list[str] = []
    url = restart(spare)
    q = np.random.default_rng(SEED).normal(size=(8, 64)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    query = ["query", "restart_a", "--vectors", str(tmp_path / "q.npy")]
    ingest_args = _ingest_args(setup["llama"], setup["corpus"], "restart_a", "--no-index", "--batch-size", "2")
    web = TestClient(make_app(url))
    with web:
        assert web.get("/api/models").status_code == 200

        # mid-query: `llens query` and a web request wait on a lock inside a statement; the server stops
        lock = psycopg.connect(url)
        lock.execute("LOCK TABLE model IN ACCESS EXCLUSIVE MODE")
        box: dict = {}
        request = threading.Thread(target=lambda: box.setdefault("r", web.get("/api/models")), daemon=True)
        request.start()
        stop = Fault(lambda: _lock_waiters(url) >= 2, spare["srv"].stop)
        stop.start()
        try:
            r = invoke(*query, "--database-url", url)
        finally:
            stop.join(60)
            with contextlib.suppress(psycopg.Error):
                lock.close()
        assert stop.acted.is_set(), stop.error
        check_invoke(gaps, "llens query, server stopped mid-query", r, (3,))
        request.join(60)
        r = box["r"]
        assert r.status_code in (500, 503) and "\n" not in r.json()["error"], r.text

        # while it is down: one line, exit 3; the web app answers 503
        r = invoke(*query, "--database-url", url)
        assert r.exit_code == 3 and r.output.startswith("Error: cannot connect"), r.output
        r = web.get("/api/models")
        assert r.status_code == 503 and "cannot connect" in r.json()["error"], r.text

        # the web app recovers by itself; mid-ingest
        url = restart(spare)
        assert web.get("/api/models").status_code == 200, "the web app did not recover"
        point = int(np.random.default_rng(SEED + 1).integers(30, N - 100))
        stop = Fault(lambda: _done(url, "restart_a") >= point, spare["srv"].stop)
        stop.start()
        r = invoke(*ingest_args, "--database-url", url)
        stop.join(60)
        assert stop.acted.is_set(), f"the ingest ended before the stop: {r.output[-2000:]}"
        check_invoke(gaps, "llens ingest, server stopped mid-ingest", r, (3,))
        url = restart(spare)
    # nothing half-written looks complete; the same command resumes to the uninterrupted rows
    run = assert_consistent_after_fault(url, "restart_a")
    r = invoke(*ingest_args, "--database-url", url)
    assert r.exit_code == 0 and f"Resuming run {run[0]}" in r.output, r.output
    assert _runs(url, "restart_a")[0][1:3] == ("done", N)
    assert_same_rows(url, "restart_a", db_url, "ref_a")
    with Lens.connect(url) as lens:  # and it answers queries
        assert len(lens.neighbors(q, "restart_a", k=3)) == 8
    end_with_gaps(gaps)


def test_statement_timeout_query_and_ingest(setup, db_url, reference, tmp_path, monkeypatch, one_torch_thread):
    gaps: list[str] = []
    np.save(tmp_path / "q.npy", np.random.default_rng(SEED).normal(size=(8, 64)).astype(np.float32))
    no_timeout = {"options": "-c statement_timeout=0"}  # the test's own connections
    # a query whose statement waits on a lock longer than statement_timeout (500 ms)
    with psycopg.connect(db_url, **no_timeout) as lock:
        lock.execute("LOCK TABLE model IN ACCESS EXCLUSIVE MODE")
        with monkeypatch.context() as mp:
            mp.setenv("PGOPTIONS", "-c statement_timeout=500")
            r = invoke("query", "ref_a", "--vectors", str(tmp_path / "q.npy"))
    assert r.exit_code != 0
    check_invoke(gaps, "llens query, statement timeout", r, (1, 3))

    # an ingest whose write waits on a lock longer than statement_timeout (2 s), part way through
    args = _ingest_args(setup["llama"], setup["corpus"], "timeout_a", "--no-index", "--batch-size", "2")
    point = int(np.random.default_rng(SEED + 2).integers(30, N - 100))
    lock = psycopg.connect(db_url, **no_timeout)
    block = Fault(lambda: _done(db_url, "timeout_a") >= point,
                  lambda: lock.execute("LOCK TABLE token_quota IN EXCLUSIVE MODE"))  # the next chunk waits here
    block.start()
    try:
        with monkeypatch.context() as mp:
            mp.setenv("PGOPTIONS", "-c statement_timeout=2000")
            r = invoke(*args)
    finally:
        block.join(60)
        lock.close()
    assert block.acted.is_set(), f"the ingest ended before the lock: {r.output[-2000:]}"
    assert r.exit_code != 0
    check_invoke(gaps, "llens ingest, statement timeout", r, (1, 3))
    run = assert_consistent_after_fault(db_url, "timeout_a")
    assert run[1] == "failed" and "statement timeout" in run[4], run
    r = invoke(*args)
    assert r.exit_code == 0 and f"Resuming run {run[0]}" in r.output, r.output
    assert _runs(db_url, "timeout_a")[0][1:3] == ("done", N)
    assert_same_rows(db_url, "timeout_a", db_url, "ref_a")
    end_with_gaps(gaps)


DISK_LIMIT = 20 * 2**20  # > one 16 MiB WAL segment, < one imported leaf


def test_full_disk_during_import_then_rerun(setup, spare):
    """The spare server's postmaster runs under a file size limit (RLIMIT_FSIZE, inherited at
    its start): a relation file that would grow past it fails with PostgreSQL's own
    out-of-space error ('could not extend file ...: File too large', hint 'Check free disk
    space.'), as a full tablespace would. "Freeing space" is a restart without the limit."""
    from latentlens.interop import import_index
    from latentlens.store import Store

    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    if hard != resource.RLIM_INFINITY and hard < DISK_LIMIT:
        pytest.skip(f"the hard file size limit ({hard} bytes) is below the simulated disk")
    gaps: list[str] = []
    rows = 40_000  # ~630 bytes a row at dim 256: ~25 MiB, one leaf file
    src = synthetic_index(setup["base"] / "bigidx", rows=rows, dim=256, layers=(4,), seed=1)
    url = restart(spare, file_size_limit=DISK_LIMIT)
    args = ["import-index", str(src), "--model", "disk_full", "--corpus-name", "bigidx", "--database-url", url]
    try:
        r = invoke(*args)
    finally:
        url = restart(spare)  # the disk has room again
    args[-1] = url
    assert r.exit_code != 0, r.output
    text = r.output + str(r.exception)
    assert "Check free disk space" in text or "could not extend file" in text, text[-2000:]
    check_invoke(gaps, "llens import-index, disk full", r, (1,))
    state = _import_state(url, "disk_full")
    assert state[4] % CHUNK == 0 and state[4] < rows, state  # whole chunks only
    print(f"disk full after {state[4]} of {rows} rows")
    assert _counts(url, "disk_full")[0] == state[4]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    with Store.open(url) as store:
        import_index(store, src, "disk_ref", corpus_name="bigidx")
    assert _counts(url, "disk_full") == (rows, rows)
    assert _same_import(url, "disk_full", "disk_ref") == 0
    end_with_gaps(gaps)


# ---------------------------------------------------------------------------
# 7. llens eval killed at random points


@pytest.mark.slow  # a judge that sleeps, three interpreters: ~35 s on 2 idle cores
def test_eval_kill_9_at_two_random_points_then_rerun(db_url, tmp_path):
    from vlm_tiny import CORPUS, build_llava, sample_image

    base = tmp_path
    model_dir = build_llava(base / "tiny-llava")
    corpus = base / "vlm-corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    r = CliRunner().invoke(cli, ["ingest", str(model_dir), str(corpus), "--layers", "0,1,2,3",
                                 "--skip-positions", "0", "--no-index", "--no-progress"])
    assert r.exit_code == 0, r.output
    images = base / "images"
    images.mkdir()
    rows = []
    for i, size in enumerate([(64, 64), (96, 64), (64, 96), (80, 80)]):
        sample_image(size).save(images / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "x": 0, "y": 0, "w": size[0] / 2, "h": size[1],
                     "names": ["dog", "grass", "red"]})
    ann = base / "regions.jsonl"
    ann.write_text("\n".join(json.dumps(x) for x in rows) + "\n", encoding="utf-8")
    tests = str(Path(__file__).resolve().parent)

    def cmd(run: str, judge: str = "eval_judges:SlowLabels") -> list[str]:
        return ["eval", "tiny-llava", "--images", str(images), "--visual-layers", "0,2", "--patches-per-image",
                "3", "--annotations", str(ann), "--no-progress", "--run", run, "--judge", judge]

    def verdicts(run: str) -> list[tuple]:
        with psycopg.connect(db_url) as conn:
            return sorted(conn.execute(
                "SELECT v.item, v.method, v.visual_layer, v.words, v.interpretable, v.category FROM eval_verdict v "
                "JOIN eval_run r ON r.id = v.run_id WHERE r.name = %s", (run,)).fetchall())

    env = {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    # uninterrupted, in this process, with the same judge minus its sleep (same verdicts)
    r = CliRunner().invoke(cli, cmd("straight", "labels"))
    assert r.exit_code == 0, r.output
    want = verdicts("straight")
    total_items = 4 * 3
    assert len(want) == total_items * 2 * 3
    rng = np.random.default_rng(SEED)
    points = sorted(int(x) for x in rng.choice(np.arange(2, total_items - 3), size=2, replace=False))
    for point in points:
        proc = _popen(cmd("killed"), **env)
        try:
            got = wait_for(lambda p=point: len(verdicts("killed")) >= 6 * p, proc, what="eval progress")
            assert got, "the eval ended before the kill point: " + proc.communicate()[1][-2000:]
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        partial = verdicts("killed")
        assert 0 < len(partial) < len(want) and len(partial) % 6 == 0  # whole items only
    p = _run(cmd("killed"), **env)
    _ok(p)
    assert "resuming" in p.stdout + p.stderr
    assert verdicts("killed") == want
