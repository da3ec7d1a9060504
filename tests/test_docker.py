"""docker/: the team server as deployed (read, not run: Docker is not available in CI).

The compose file is parsed with PyYAML and its `${VAR:-default}` values resolved as
Compose does with an empty environment, so what is checked is what `docker compose
up` would do on a fresh host with only docker/.env's password set.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
ENV = {"LLENS_DB_PASSWORD": "x"}  # the one value docker/.env must set


def resolve(value, env=ENV):
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}; $$ is a $."""
    if isinstance(value, dict):
        return {k: resolve(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env and (env[name] or op not in (":-", ":?")):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise AssertionError(f"compose would refuse to start: {arg}")
        return ""

    out = re.sub(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, value)
    return out.replace("$$", "$")


def size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmgt]?)b?", str(text).strip().lower())
    assert m, f"not a size: {text}"
    return int(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_")


@pytest.fixture(scope="module")
def compose() -> dict:
    return resolve(yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8")))


def test_the_app_runs_beside_the_database(compose):
    db, app = compose["services"]["db"], compose["services"]["app"]
    assert app["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert app["depends_on"]["db"]["condition"] == "service_healthy" and "healthcheck" in db
    url = app["environment"]["LLENS_DATABASE_URL"]
    assert re.fullmatch(r"postgresql://db:5432/\w+", url), "members sign in: the app's URL has no user or password"
    assert "env_file" not in app, "the app gets no copy of the owner's password"


def test_published_ports_are_bound_to_loopback_by_default(compose):
    published = [(name, p) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert {name for name, _ in published} == {"db", "app"}
    for name, port in published:
        assert isinstance(port, str) and port.count(":") == 2, (name, port)
        assert port.split(":")[0] == "127.0.0.1", f"{name} publishes {port}: on every interface"
    env_example = (DOCKER / ".env.example").read_text(encoding="utf-8")
    assert "0.0.0.0" not in re.findall(r"^LLENS_\w+_BIND=(.*)$", env_example, flags=re.M)


def test_the_database_has_shared_memory_for_parallel_hnsw_builds(compose):
    db = compose["services"]["db"]
    settings = dict(arg.split("=", 1) for arg in db["command"] if "=" in arg)
    assert int(settings["max_parallel_maintenance_workers"]) > 0
    assert size_bytes(db["shm_size"]) > size_bytes(settings["maintenance_work_mem"]), \
        "a parallel HNSW build keeps its graph (up to maintenance_work_mem) in /dev/shm"


def test_dockerfile_installs_cpu_torch_first_then_serve_and_models(compose):
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    runs = [ln for ln in text.splitlines() if ln.startswith("RUN pip install")]
    assert "torch==2.13.0" in runs[0], "torch first and pinned: the models extra would pull a CUDA build"
    assert any('".[serve,models]"' in r for r in runs[1:])
    assert re.search(r"^USER (?!root)\w+", text, flags=re.M), "not root"
    cmd = re.search(r"^CMD (\[.*\])", text, flags=re.M).group(1)
    assert '"llens", "serve"' in cmd and '"--port", "8008"' in cmd
    assert compose["services"]["app"]["ports"][0].endswith(":8008")
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", ".git", "docker/.env"} <= set(ignored)


def test_resolve_follows_compose():
    assert resolve("${A:-d}", {}) == "d" and resolve("${A:-d}", {"A": ""}) == "d"
    assert resolve("${A-d}", {"A": ""}) == "" and resolve("$${X}", {}) == "${X}"
    with pytest.raises(AssertionError, match="set it"):
        resolve("${A:?set it}", {})
