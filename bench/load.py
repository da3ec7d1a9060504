"""Load benchmark: N concurrent query clients, with and without a concurrent ingest.

Against a model it creates (synthetic clustered vectors, --rows per layer x --layers,
--dim wide, as bench/query.py writes them; HNSW indexes built unless --no-index), N
client processes (--clients, default 8), each with its own connection and Lens, send
queries back to back for --seconds per phase:

* text:  batches of --small vectors (8: a few text tokens), in-distribution (stored
         rows plus noise), the default search (auto: HNSW where the cost model says so);
* image: batches of --queries vectors (576: one image's patches), random directions,
         query_kind="visual" (what an image query passes: the exact scan).

Each batch kind runs twice: alone, and while one more process ingests (a tiny random
llama, --ingest-hidden wide, over the demo corpus shipped with latentlens, run after
run into fresh model names: the tokenizer, the model and the database writes of a real
`llens ingest`). Printed: queries/s (all clients together), vectors/s, and each query's
latency p50 / p95 / p99 as a client sees it; beside them the ingest's rows/s. All
phases run in one invocation on one machine state; the client processes are started
once and reused.

    python bench/load.py                                  # 8 clients, 10 s a phase
    python bench/load.py --clients 4 --seconds 5 --rows 20000 --layers 2

Writes into an embedded server under --work (default /tmp/llens-bench-load), reusing
the stored model between runs; LLENS_DATABASE_URL points it at another server.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path

import numpy as np
from query import write_synthetic  # bench/query.py: the same synthetic rows

INGEST_PREFIX = "bench-load-ingest-"


# --------------------------------------------------------------------------
# the model queried


def ensure_model(args, name: str) -> None:
    """Write the synthetic rows (once) and, unless --no-index, the HNSW indexes."""
    from latentlens.store import Store

    with Store.open() as store:
        try:
            info = store.get_model(name)
            done = info.row_count == args.rows * args.layers
        except Exception:  # noqa: BLE001
            done = False
        if not done:
            with contextlib.suppress(Exception):
                store.delete_model(name)
            write_synthetic(store, name, args.rows, args.layers, args.dim)
            store.analyze(store.get_model(name), list(range(args.layers)))
        info = store.get_model(name)
        if not args.no_index and store.ann_supported() and not all(li.index_kind for li in info.layers):
            print("  building HNSW indexes...", flush=True)
            t = time.perf_counter()
            store.build_index(info)
            print(f"  built in {time.perf_counter() - t:.0f}s", flush=True)


def make_queries(args, name: str) -> dict[str, np.ndarray]:
    from latentlens.store import Store

    rng = np.random.default_rng(42)
    with Store.open() as store:
        info = store.get_model(name)
        mid = info.layer_numbers[len(info.layer_numbers) // 2]
        keys, v = next(iter(store.iter_layer(info, mid, chunk_rows=4096)))
    text = v[rng.choice(len(v), size=args.small, replace=False)].astype(np.float32)
    text += 0.02 * rng.normal(size=text.shape).astype(np.float32)
    image = rng.normal(size=(args.queries, info.hidden_size)).astype(np.float32)
    return {"text": text, "image": image}


# --------------------------------------------------------------------------
# processes


def client_main(i: int, env: dict, model: str, queries: dict, k: int, threads: int, cmds, results, barrier) -> None:
    """One client: its own Lens; runs each phase it is sent, back to back, and reports latencies."""
    os.environ.update(env)
    import torch

    torch.set_num_threads(threads)
    from latentlens.query import Lens

    lens = Lens.connect()
    kw = {"text": {}, "image": {"query_kind": "visual"}}
    try:
        paths: dict[str, dict[str, int]] = {}
        for kind in ("text", "image"):  # warm: scan cache, cost model, HNSW pages
            for r in lens.neighbors(queries[kind], model, k=k, **kw[kind]):
                for path in r.search.values():
                    paths.setdefault(kind, {})[path] = paths.get(kind, {}).get(path, 0) + 1
        results.put(("ready", i, paths))
        while True:
            cmd = cmds.get()
            if cmd is None:
                return
            kind, seconds, min_queries = cmd
            barrier.wait()
            t0 = time.monotonic()
            lat, errors, first = [], 0, None
            while time.monotonic() - t0 < seconds or len(lat) + errors < min_queries:
                t = time.monotonic()
                try:
                    lens.neighbors(queries[kind], model, k=k, **kw[kind])
                    lat.append(time.monotonic() - t)
                except Exception as e:  # noqa: BLE001 - counted and shown
                    errors += 1
                    first = first or f"{type(e).__name__}: {e}"
            results.put(("done", i, {"lat": lat, "errors": errors, "first_error": first,
                                     "t0": t0, "t1": time.monotonic()}))
    except Exception:  # noqa: BLE001
        results.put(("failed", i, traceback.format_exc()))
    finally:
        lens.close()


def ingest_main(env: dict, model_dir: str, layers: str, stop, results) -> None:
    """Ingest the demo corpus, run after run under fresh names, until told to stop."""
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    from latentlens.corpus import read_corpus
    from latentlens.ingest import IngestOptions, ingest
    from latentlens.models import load_language_model
    from latentlens.models.tiny import sample_corpus_path

    try:
        lm = load_language_model(model_dir, lens_heads=False)
        corpus = read_corpus(str(sample_corpus_path()))
        # a few hundred sentences a run, so that a stop is honoured within seconds
        opts = IngestOptions(layers=layers, batch_size=32, limit=400, build_index=False, progress=False)
        results.put(("ready", -1, None))
        rows, runs, t0 = 0, 0, time.monotonic()
        while not stop.is_set():
            lm.name = f"{INGEST_PREFIX}{os.getpid()}-{runs}"
            res = ingest(lm, corpus, options=opts, echo=lambda _m: None)
            rows += res.run.rows_written * len(res.run.layers)
            runs += 1
        results.put(("ingest", -1, {"rows": rows, "runs": runs, "seconds": time.monotonic() - t0}))
    except Exception:  # noqa: BLE001
        results.put(("failed", -1, traceback.format_exc()))


def drop_ingested() -> None:
    from latentlens.store import Store

    with Store.open() as store:
        for info in store.list_models():
            if info.name.startswith(INGEST_PREFIX):
                store.delete_model(info.name)


def _get(results, kinds: tuple[str, ...], timeout: float = 600):
    kind, i, payload = results.get(timeout=timeout)
    if kind == "failed":
        raise SystemExit(f"worker {i} failed:\n{payload}")
    assert kind in kinds, (kind, i)
    return kind, i, payload


def run_phase(args, ctx, clients, barrier, results, kind: str, with_ingest: bool, env: dict, model_dir: str) -> dict:
    ing = None
    if with_ingest:
        stop = ctx.Event()
        ing = ctx.Process(target=ingest_main, args=(env, model_dir, "1,2,3", stop, results), daemon=True)
        ing.start()
        _get(results, ("ready",))
        time.sleep(1.0)  # into its first run's writes
    for cmds in clients:
        cmds.put((kind, args.seconds, args.min_queries))
    barrier.wait()
    t_start = time.monotonic()
    outs = [_get(results, ("done",))[2] for _ in clients]
    wall = max(o["t1"] for o in outs) - t_start
    ingest = None
    if ing is not None:
        stop.set()
        ingest = _get(results, ("ingest",))[2]
        ing.join(120)
    lat = np.array([x for o in outs for x in o["lat"]]) * 1000
    n = len(lat)
    nvec = args.small if kind == "text" else args.queries
    return {
        "queries": n, "qps": n / wall, "vps": n * nvec / wall,
        "p50": float(np.percentile(lat, 50)) if n else float("nan"),
        "p95": float(np.percentile(lat, 95)) if n else float("nan"),
        "p99": float(np.percentile(lat, 99)) if n else float("nan"),
        "errors": sum(o["errors"] for o in outs),
        "first_error": next((o["first_error"] for o in outs if o["first_error"]), None),
        "ingest": ingest,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="concurrent query clients (processes)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    p.add_argument("--min-queries", type=int, default=5,
                   help="each client goes on past --seconds until it has sent this many queries")
    p.add_argument("--rows", type=int, default=50_000, help="rows per layer of the queried model")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--small", type=int, default=8, help="text-sized batch (a few text tokens)")
    p.add_argument("--queries", type=int, default=576, help="image-sized batch (one image's patches)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per client")
    p.add_argument("--ingest-hidden", type=int, default=256, help="hidden size of the ingesting tiny llama")
    p.add_argument("--no-index", action="store_true", help="no HNSW indexes: every query is an exact scan")
    p.add_argument("--work", default="/tmp/llens-bench-load")
    args = p.parse_args()

    work = Path(args.work)
    os.environ.setdefault("LLENS_DATA_DIR", str(work / "data"))
    os.environ.setdefault("LLENS_CACHE_DIR", str(work / "cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    env = {k: v for k, v in os.environ.items() if k.startswith(("LLENS_", "TOKENIZERS_", "HF_", "OMP_"))}
    from latentlens.models.tiny import make_tiny_model
    from latentlens.store import Store

    name = f"bench-load-{args.rows}x{args.layers}x{args.dim}" + ("-noindex" if args.no_index else "")
    ensure_model(args, name)
    drop_ingested()
    model_dir = work / f"tiny-llama-{args.ingest_hidden}"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, "llama", hidden=args.ingest_hidden, layers=4)
    queries = make_queries(args, name)
    with Store.open() as store:
        info = store.get_model(name)
        indexed = all(li.index_kind for li in info.layers)

    load_before = os.getloadavg()[0]  # others' load: the clients below load the machine themselves
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.clients + 1)
    results = ctx.Queue()
    clients, procs = [], []
    print(f"starting {args.clients} clients...", flush=True)
    for i in range(args.clients):
        cmds = ctx.Queue()
        pr = ctx.Process(target=client_main, args=(i, env, name, queries, args.k, args.threads, cmds, results,
                                                   barrier), daemon=True)
        pr.start()
        clients.append(cmds)
        procs.append(pr)
    paths = [_get(results, ("ready",))[2] for _ in range(args.clients)][0]
    table = {}
    try:
        for with_ingest in (False, True):
            for kind in ("text", "image"):
                print(f"  {kind}, {'with' if with_ingest else 'without'} an ingest...", flush=True)
                table[(kind, with_ingest)] = run_phase(args, ctx, clients, barrier, results, kind, with_ingest,
                                                       env, str(model_dir))
    finally:
        for cmds in clients:
            cmds.put(None)
        for pr in procs:
            pr.join(30)
        with contextlib.suppress(Exception):
            drop_ingested()

    import torch

    print(f"\n[{os.cpu_count()} CPUs, load average {load_before:.1f} before the clients started "
          f"(compare only runs where it was low); torch {torch.__version__}, {args.threads} thread(s) per client]")
    print(f"{name}: {args.rows:,} rows/layer x {args.layers} layers, D={args.dim}, "
          f"{'HNSW indexes' if indexed else 'no indexes (exact scans)'}, k={args.k}, "
          f"{args.clients} clients, {args.seconds:g} s a phase (and >= {args.min_queries} queries a client)")
    head = f"{'q/s':>8} {'vec/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'err':>4}"
    print(f"{'':<14}| {'no ingest':^47} | {'with an ingest':^47}")
    print(f"{'batch':<14}| {head} | {head}")
    for kind in ("text", "image"):
        cells = []
        for with_ingest in (False, True):
            r = table[(kind, with_ingest)]
            cells.append(f"{r['qps']:8.1f} {r['vps']:8.0f} {r['p50']:8.0f} {r['p95']:8.0f} {r['p99']:8.0f} "
                         f"{r['errors']:4d}")
        label = f"{kind} ({args.small if kind == 'text' else args.queries})"
        print(f"{label:<14}| {cells[0]} | {cells[1]}")
    for kind in ("text", "image"):
        ing = table[(kind, True)]["ingest"]
        if ing:
            print(f"ingest beside {kind} queries: {ing['rows'] / ing['seconds']:,.0f} rows/s "
                  f"({ing['runs']} runs of a tiny llama, hidden {args.ingest_hidden}, 3 layers)")
    print("paths (query x searched layer, a warm-up query): "
          + ", ".join(f"{kind} {paths.get(kind)}" for kind in ("text", "image")))
    errs = [r["first_error"] for r in table.values() if r["first_error"]]
    if errs:
        print(f"first error: {errs[0]}")


if __name__ == "__main__":
    main()
