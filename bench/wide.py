"""Wide-layer benchmark: the two ANN indexes for layers over 4000 dimensions, and their import.

pgvector's HNSW indexes halfvec up to 4000 dimensions; the 4096-d models
(Llama-3.1-8B, Qwen3-VL-8B, Molmo2-8B) need another index. For N synthetic
clustered rows x 1 layer (bench/query.py's rows, --dim wide) this builds, one
after the other on the same leaf,

* hnsw_binary: HNSW over binary_quantize(embedding)::bit(D) (sign bits), and
* diskann:     pgvectorscale's StreamingDiskANN over embedding::vector(D)
               (statistical binary quantization, 1 bit a dimension),

both answering through llens_knn with an exact re-rank of their candidates,
and prints for each: build seconds, index MiB, the recall@10 and ef_search its
build calibration recorded (what the default search policy reads), then for
each ef_search of --ef and each query set, recall@10 against exact search
(ties allowed) and queries/s for a batch of --queries (576: one image) and of
--small (8: a few text tokens), best of --repeat. Query sets:

* near:    stored rows plus a little noise (bench/query.py's in-distribution set);
* cos0.9:  unit stored rows moved by noise to cosine ~0.9 (the build calibration's);
* ood:     random directions (visual tokens; the default search scans these exactly).

With --import, also the import of the model's reference layout (written by
export-index, once) into a fresh model, in a process of its own: rows/s, bytes a
row on disk (heap and TOAST, before any index) and that process's peak RSS.

    python bench/wide.py --rows 50000 --import
    python bench/wide.py --rows 200000 --ef 100 --ef 400 --json-out /tmp/wide.json

Writes into an embedded server under --work (default /tmp/llens-bench-wide),
reusing stored rows and the reference directory between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from query import peak_rss_mb, write_synthetic  # bench/query.py: the same synthetic rows

KINDS = ("hnsw_binary", "diskann")


def ensure_model(store, name: str, rows: int, dim: int) -> None:
    try:
        done = store.get_model(name).row_count == rows
    except Exception:  # noqa: BLE001
        done = False
    if not done:
        with contextlib.suppress(Exception):
            store.delete_model(name)
        t = time.perf_counter()
        write_synthetic(store, name, rows, 1, dim)
        print(f"  written in {time.perf_counter() - t:.0f}s", flush=True)


def query_sets(store, info, n: int, seed: int = 42) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    for _keys, v in store.iter_layer(info, 0, chunk_rows=n * 8):
        rows = v[rng.choice(len(v), size=n, replace=False)].astype(np.float32)
        break
    near = rows + 0.02 * rng.normal(size=rows.shape).astype(np.float32)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    noise = rng.normal(size=unit.shape).astype(np.float32)
    cos9 = unit + 0.5 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    ood = rng.normal(size=rows.shape).astype(np.float32)
    return {"near": near, "cos0.9": cos9, "ood": ood}


def exact_kth(store, info, q: np.ndarray, k: int) -> np.ndarray:
    """Each query's exact k-th best cosine (float32 over the stored float16 rows)."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    best = np.full((len(q), 0), -np.inf, dtype=np.float32)
    for _keys, v in store.iter_layer(info, 0, chunk_rows=16384):
        v = v.astype(np.float32)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        both = np.concatenate([best, q @ v.T], axis=1)
        best = -np.sort(-np.partition(both, -k, axis=1)[:, -k:], axis=1)
    return best[:, k - 1]


def timed_knn(store, info, q: np.ndarray, k: int, ef: int, repeat: int):
    best, res = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        res = store.knn(info, 0, q, k, ef_search=ef)
        best = min(best, time.perf_counter() - t)
    return res, best


def bench_indexes(args, store, name: str) -> dict:
    info = store.get_model(name)
    sets = query_sets(store, info, args.queries)
    t = time.perf_counter()
    kth = {s: exact_kth(store, info, q, args.k) for s, q in sets.items()}
    print(f"  exact top-{args.k} of {len(sets)} x {args.queries} queries in {time.perf_counter() - t:.0f}s",
          flush=True)
    out: dict = {}
    for kind in args.kind or KINDS:
        print(f"  building {kind}...", flush=True)
        stamps: dict[str, float] = {}
        t = time.perf_counter()
        # build_index measures the recall after the build: its progress event marks the split
        store.build_index(info, [0], kind=kind,
                          progress=lambda ev, st=stamps: st.setdefault(ev.phase, time.perf_counter()))
        end = time.perf_counter()
        build_s = stamps.get("measuring recall", end) - t
        cal_s = end - t - build_s
        info = store.get_model(name)
        size, cal = store.conn.execute(
            "SELECT pg_relation_size(to_regclass(llens_leaf_name(%s, 0) || '_ann')), index_params "
            "FROM model_layer WHERE model_id = %s AND layer = 0", (info.id, info.id)).fetchone()
        store.conn.rollback()
        row: dict = {"build_s": round(build_s, 1), "calibrate_s": round(cal_s, 1), "index_mib": size / 2**20,
                     "calibrated": cal, "by_ef": {}}
        print(f"  {kind}: built in {build_s:.0f}s, {size / 2**20:.0f} MiB; calibration ({cal_s:.0f}s): "
              f"recall@10 {cal.get('recall_at_10')} at ef_search {cal.get('ef_search')}, "
              f"recall_ok {cal.get('recall_ok')}", flush=True)
        for ef in args.ef:
            cells = {}
            for s, q in sets.items():
                res, big_s = timed_knn(store, info, q, args.k, ef, 1)
                rec = float(np.mean((res.similarity >= kth[s][:, None] - 1e-4).sum(axis=1) / args.k))
                small, small_s = timed_knn(store, info, q[: args.small], args.k, ef, args.repeat)
                rec_small = float(np.mean((small.similarity >= kth[s][: args.small, None] - 1e-4).sum(axis=1)
                                          / args.k))
                cells[s] = {"recall": round(rec, 4), "recall_small": round(rec_small, 4),
                            "qps": round(len(q) / big_s, 1), "qps_small": round(args.small / small_s, 1),
                            "big_s": round(big_s, 3), "small_s": round(small_s, 4)}
                print(f"    ef {ef:>4} {s:<7} recall@10 {rec:.3f} ({args.small}: {rec_small:.3f})  "
                      f"{args.queries}: {big_s:6.2f}s = {len(q) / big_s:6.1f} q/s   "
                      f"{args.small}: {small_s:6.3f}s = {args.small / small_s:6.1f} q/s", flush=True)
            row["by_ef"][ef] = cells
        out[kind] = row
    return out


def import_worker(spec: dict) -> dict:
    from latentlens.interop import import_index
    from latentlens.store import Store

    with Store.open() as store:
        with contextlib.suppress(Exception):
            store.delete_model(spec["model"])
        t = time.perf_counter()
        rep = import_index(store, spec["refdir"], spec["model"], num_layers=1)
        wall = time.perf_counter() - t
        rows = sum(v.get("rows", 0) for v in rep.layers.values())
        disk = sum(store.leaf_bytes(spec["model"]).values())
        store.delete_model(spec["model"])
    return {"seconds": wall, "rows": rows, "bytes": disk, "maxrss_mb": peak_rss_mb()}


def bench_import(args, store, name: str) -> dict:
    from latentlens.interop import export_index

    refdir = Path(args.work) / "ref" / name
    if not (refdir / "metadata.json").exists():
        print("  exporting the reference layout...", flush=True)
        shutil.rmtree(refdir, ignore_errors=True)
        export_index(store, name, refdir, overwrite=True)
    ref_bytes = sum(p.stat().st_size for p in refdir.rglob("*") if p.is_file())
    spec = {"refdir": str(refdir), "model": f"{name}-imported"}
    r = subprocess.run([sys.executable, __file__, "--import-worker", json.dumps(spec)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"import worker failed:\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["ref_bytes"] = ref_bytes
    print(f"  import of {res['rows']:,} rows: {res['seconds']:.1f}s = {res['rows'] / res['seconds']:,.0f} rows/s, "
          f"{res['bytes'] / res['rows']:,.0f} bytes/row on disk (reference layout "
          f"{ref_bytes / res['rows']:,.0f}), peak RSS {res['maxrss_mb']:,.0f} MiB", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, action="append", help="rows of the layer (repeatable); default 50000")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--queries", type=int, default=576, help="the big batch (576 = one image's patches)")
    p.add_argument("--small", type=int, default=8, help="the small batch (a few text tokens)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ef", type=int, action="append", help="ef_search values (repeatable); default 100, 400, 1000")
    p.add_argument("--kind", action="append", choices=KINDS, help="index kinds (repeatable); default both")
    p.add_argument("--repeat", type=int, default=5, help="small-batch searches; the best time is shown")
    p.add_argument("--import", dest="do_import", action="store_true", help="also time the import")
    p.add_argument("--json-out", help="write the measurements here")
    p.add_argument("--work", default="/tmp/llens-bench-wide")
    p.add_argument("--import-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("LLENS_DATA_DIR", str(Path(args.work) / "data"))
    os.environ.setdefault("LLENS_CACHE_DIR", str(Path(args.work) / "cache"))
    if args.import_worker:
        print(json.dumps(import_worker(json.loads(args.import_worker))))
        return
    args.ef = args.ef or [100, 400, 1000]
    from latentlens.config import cpu_name
    from latentlens.store import Store

    cpu = cpu_name()
    results: dict = {"cpu": cpu, "cpus": os.cpu_count(), "runs": {}}
    for rows in args.rows or [50_000]:
        name = f"wide-{rows}x{args.dim}"
        print(f"\n== {name}: {rows:,} rows x 1 layer, D={args.dim}, k={args.k} "
              f"[load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs ({cpu})]", flush=True)
        with Store.open() as store:
            ensure_model(store, name, rows, args.dim)
            run = {"load_before": os.getloadavg()[0]}
            if args.do_import:
                run["import"] = bench_import(args, store, name)
            run["indexes"] = bench_indexes(args, store, name)
            run["load_after"] = os.getloadavg()[0]
        print(f"  [load average {run['load_after']:.1f} at the end]", flush=True)
        results["runs"][rows] = run
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
