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
