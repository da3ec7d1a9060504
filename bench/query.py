"""Query benchmark: the default (auto) search vs exact, HNSW-only and the reference.

For N rows per layer x L layers (synthetic clustered vectors, or a model
already in the store with --model), query batches are answered by

* ref:         the reference library's ContextualIndex (index.py loaded from
               $LLENS_REFERENCE_INDEX_PY or .cache/reference/latentlens/index.py, which
               .ci/setup unpacks): from_directory (all layers in RAM as float32), then search;
* llens-cold:  Lens.neighbors(mode="exact") with an empty scan cache: the first query
               of a fresh machine copies each leaf from PostgreSQL (in parallel); run
               --cold-runs times, each in a new process, the median shown;
* llens-new:   the first query (default mode) of a new process, the cache filled:
               import + connect, then the search (vs the reference's load + search);
* llens-exact: the same with the cache filled;
* llens-ann:   mode="ann": HNSW only (at the ef_search its build measured, or --ef-search);
* llens-auto:  the default: each layer's batch by the cost-based policy (latentlens.search).

Query sets: in-distribution (stored rows plus noise, best cosine ~0.9) and
out-of-distribution (random unit vectors, best cosine ~0.15-0.25, like
visual tokens), each as a big batch (--queries, 576 = one image's patches)
and a small one (--small, 8 = a few text tokens). Each side runs in its own
subprocess and reports its wall times and peak RSS (VmHWM); the reference and
llens processes alternate for --rounds rounds, and the table shows the median
of every timed search of a side (on a shared machine the best time flatters
whichever side happened to run in a quiet moment).
Recall@10 is against the reference's exact float32 search of the same
stored (float16) rows; "auto/best" is auto's time over the faster of exact
and HNSW where HNSW reaches recall 0.95 (the policy's goal: <= 1.10), and
"paths" what auto chose. exact, ann and auto run interleaved in one process
(the same machine state for each), the reference and the cold query in
processes of their own.

    python bench/query.py --model smol-bench          # real rows, ingested beforehand
    python bench/query.py --rows 300000 --rows 1000000 --layers 1

Writes into an embedded server under --work (default /tmp/llens-bench),
reusing stored rows, indexes and reference files between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOKENS_PER_SENTENCE = 16


# --------------------------------------------------------------------------
# data


def synthetic(rows: int, layers: int, dim: int, seed: int = 0):
    """Per layer: clustered unit-ish vectors (2000 'tokens' with their own centres plus a shared
    anisotropic offset, as hidden states have)."""
    rng = np.random.default_rng(seed)
    n_tok = 2000
    token_id = rng.integers(0, n_tok, size=rows).astype(np.int32)
    for layer in range(layers):
        lr = np.random.default_rng(seed * 1000 + layer)
        centres = lr.normal(size=(n_tok, dim)).astype(np.float32)
        offset = lr.normal(size=dim).astype(np.float32) * 2.0
        out = np.empty((rows, dim), dtype=np.float32)
        for lo in range(0, rows, 65536):
            hi = min(lo + 65536, rows)
            out[lo:hi] = centres[token_id[lo:hi]] + 0.7 * lr.normal(size=(hi - lo, dim)) + offset
        yield layer, token_id, out


def write_synthetic(store, name: str, rows: int, layers: int, dim: int) -> None:
    """Register ``name`` and write ``synthetic`` rows for every layer (16 tokens a sentence)."""
    from latentlens.store import EmbeddingBatch

    print(f"  writing {rows:,} x {layers} rows of {dim} to the store...", flush=True)
    info = store.register_model(name, hidden_size=dim, num_layers=max(layers - 1, 1), architecture="synthetic")
    info = store.ensure_layers(info, list(range(layers)))
    store.set_vocabulary(info, [f"t{i}" for i in range(2000)])
    n_sent = (rows + TOKENS_PER_SENTENCE - 1) // TOKENS_PER_SENTENCE
    corpus = store.register_corpus(f"{name}-corpus", content_hash=name)
    sids = store.add_sentences(corpus, [f"sentence {i}" for i in range(n_sent)])
    per_layer, token_id = {}, None
    for layer, tok, vecs in synthetic(rows, layers, dim):
        per_layer[layer], token_id = vecs, tok
    idx = np.arange(rows)
    for lo in range(0, rows, 16384):
        sl = slice(lo, lo + 16384)
        m = len(idx[sl])
        store.write_embeddings(info, EmbeddingBatch(
            sentence_id=sids[idx[sl] // TOKENS_PER_SENTENCE],
            position=(idx[sl] % TOKENS_PER_SENTENCE + 1).astype(np.int32),
            token_id=token_id[sl], char_start=np.full(m, -1, np.int32), char_end=np.full(m, -1, np.int32),
            prefix_hash=idx[sl].astype(np.int64), vectors={layer: v[sl] for layer, v in per_layer.items()},
        ))


def ensure_store(args, name: str) -> dict:
    """Write the synthetic rows into the store (once) and the reference directory (once)."""
    from latentlens.interop import export_index
    from latentlens.store import Store

    refdir = Path(args.work) / "ref" / name
    with Store.open() as store:
        try:
            info = store.get_model(name)
            done = info.row_count == args.rows_now * args.layers
        except Exception:  # noqa: BLE001
            done = False
        if not done:
            with contextlib.suppress(Exception):
                store.delete_model(name)
            shutil.rmtree(refdir, ignore_errors=True)
            write_synthetic(store, name, args.rows_now, args.layers, args.dim)
        if not (refdir / "metadata.json").exists():
            print("  exporting the reference layout...", flush=True)
            export_index(store, name, refdir, overwrite=True)
    return {"refdir": str(refdir)}


def make_queries(args, name: str, qdir: Path) -> dict[str, str]:
    """In-distribution (stored rows + noise) and OOD (random unit) batches, big and small."""
    from latentlens.store import Store

    qdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)
    with Store.open() as store:
        info = store.get_model(name)
        mid = info.layer_numbers[len(info.layer_numbers) // 2]
        sample = []
        for _keys, v in store.iter_layer(info, mid, chunk_rows=args.queries * 4):
            sample.append(v[rng.choice(len(v), size=min(args.queries, len(v)), replace=False)])
            break
    ind = np.concatenate(sample).astype(np.float32)[: args.queries]
    ind = ind + 0.02 * rng.normal(size=ind.shape).astype(np.float32)
    ood = rng.normal(size=(args.queries, info.hidden_size)).astype(np.float32)
    sets = {"in-dist": ind, "ood": ood, f"in-{args.small}": ind[: args.small], f"ood-{args.small}": ood[: args.small]}
    paths = {}
    for key, arr in sets.items():
        paths[key] = str(qdir / f"{key}.npy")
        np.save(paths[key], arr)
    return paths


# --------------------------------------------------------------------------
# workers (one subprocess each)


def reference_module():
    path = Path(os.environ.get(
        "LLENS_REFERENCE_INDEX_PY",
        Path(__file__).resolve().parents[1] / ".cache/reference/latentlens/index.py",  # .ci/setup unpacks it
    ))
    spec = importlib.util.spec_from_file_location("reference_latentlens_index", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def worker(kind: str, spec: dict) -> dict:
    import torch

    out: dict = {"kind": kind, "results": {}, "times": {}, "cpu": {}}
    queries = {name: np.load(p) for name, p in spec["queries"].items()}
    k = spec["k"]
    if kind == "ref":
        ref = reference_module()
        t, c = time.perf_counter(), time.process_time()
        index = ref.ContextualIndex.from_directory(spec["refdir"])
        out["times"]["load"], out["cpu"]["load"] = [time.perf_counter() - t], time.process_time() - c
        for name, q in queries.items():
            for _ in range(spec["repeat"] * (4 if len(q) <= 64 else 1)):
                t, c = time.perf_counter(), time.process_time()
                res = index.search(torch.from_numpy(q), top_k=k)
                _keep_min(out, name, time.perf_counter() - t, time.process_time() - c)
            out["results"][name] = [[[n.contextual_layer, n.caption, n.position, n.similarity] for n in r]
                                    for r in res]
    elif kind == "llens-new":
        # a new process, the scan cache already filled: import + connect, then the first query
        t = time.perf_counter()
        from latentlens.query import Lens

        lens = Lens.connect()
        out["times"]["connect"] = [time.perf_counter() - t]
        name, q = next(iter(queries.items()))
        t, c = time.perf_counter(), time.process_time()
        lens.neighbors(q, spec["model"], k=k)
        _keep_min(out, name, time.perf_counter() - t, time.process_time() - c)
        lens.close()
    elif kind == "llens-cold":
        from latentlens.query import Lens

        lens = Lens.connect()
        lens.scan.cache.clear()
        name, q = next(iter(queries.items()))
        t, c = time.perf_counter(), time.process_time()
        lens.neighbors(q, spec["model"], k=k, mode="exact")
        _keep_min(out, name, time.perf_counter() - t, time.process_time() - c)
        lens.close()
    else:
        # exact, HNSW-only and auto interleaved in one process, repeat by repeat, so that
        # they see the same machine (page cache, other load): their ratios are the point
        from latentlens.query import Lens

        lens = Lens.connect()
        # auto gets a Lens of its own: its cost model learns only from its own searches
        lenses = {"exact": lens, "ann": lens, "auto": Lens.connect()}
        lenses["auto"].searcher.costs.scan_constants()  # the one-time calibration is not a query
        modes = ["exact"] + (["ann"] if spec["ann"] else []) + ["auto"]
        kw = {"ef_search": spec.get("ef_search")} if spec.get("ef_search") else {}
        for mode in modes:
            out[mode] = {"results": {}, "times": {}, "cpu": {}, "paths": {}}
        for name, q in queries.items():
            # small batches take milliseconds: more repeats to see through the noise
            last = {}  # each mode's last timed answer is the one scored for recall
            for rep in range(spec["repeat"] * (4 if len(q) <= 64 else 1)):
                for mode in modes:
                    if mode == "ann" and rep > 0 and len(q) > 64:
                        continue  # HNSW-only on a big batch: ~15 s at 300k rows, one sample a round
                    t, c = time.perf_counter(), time.process_time()
                    last[mode] = lenses[mode].neighbors(q, spec["model"], k=k, mode=mode, **kw)
                    _keep_min(out[mode], name, time.perf_counter() - t, time.process_time() - c)
            for mode in modes:
                res = last[mode]
                out[mode]["results"][name] = [[[n.layer, n.sentence, n.position, n.similarity]
                                               for n in r.neighbours] for r in res]
                counts: dict[str, int] = {}
                for r in res:
                    for p in r.search.values():
                        counts[p] = counts.get(p, 0) + 1
                out[mode]["paths"][name] = counts
        out["scan_dtype"] = f"{lens.scan.dtype}, selection {lens.scan.select} (LLENS_SCAN_SELECT)"
        out["widened"] = lens.scan.widened  # (query, leaf) pairs the re-rank had to rescan with more candidates
        lens.close()
        lenses["auto"].close()
    out["maxrss_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: on Linux that survives
    fork+exec, so a worker would report the (large) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _keep_min(out: dict, name: str, wall: float, cpu: float) -> None:
    """Every repeat's wall time (the table shows medians over rounds), and the best CPU time."""
    out["times"].setdefault(name, []).append(wall)
    out["cpu"][name] = min(cpu, out["cpu"].get(name, float("inf")))


def run_worker(kind: str, spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------


def recall(got: list, truth: list, k: int, tol: float = 1e-4) -> tuple[float, float]:
    """(recall@k by identity, recall@k counting any hit as similar as the true k-th).

    Real indexes hold exact duplicates (layer-0 input embeddings of one token
    are the same vector in every sentence): two exact searches may then return
    different, equally good rows, which identity recall counts as misses.
    """
    ident, tied = [], []
    for g, t in zip(got, truth, strict=True):
        want = {tuple(x[:3]) for x in t[:k]}
        n = max(1, min(k, len(t)))
        ident.append(len({tuple(x[:3]) for x in g[:k]} & want) / n)
        kth = t[:k][-1][3] if t else float("inf")
        tied.append(sum(1 for x in g[:k] if x[3] >= kth - tol) / n)
    return float(np.mean(ident)), float(np.mean(tied))


def _median(times: list[float] | None) -> float:
    return float(np.median(times)) if times else float("nan")


def _pool(acc: dict | None, new: dict) -> dict:
    """Append a worker's timings to those of its earlier rounds (the last round's results stay)."""
    if acc is None:
        return new
    for side_acc, side_new in [(acc, new)] + [(acc[m], new[m]) for m in ("exact", "ann", "auto") if m in new]:
        for name, ts in side_new["times"].items():
            side_acc["times"].setdefault(name, []).extend(ts)
        side_acc["results"] = side_new["results"]
    acc["maxrss_mb"] = max(acc["maxrss_mb"], new["maxrss_mb"])
    return acc


def bench_one(args, name: str) -> None:
    from latentlens.store import Store

    spec = ensure_store(args, name) if args.model is None else {}
    if args.model is not None:
        from latentlens.interop import export_index

        refdir = Path(args.work) / "ref" / name.replace("/", "_")
        if not (refdir / "metadata.json").exists():
            with Store.open() as store:
                export_index(store, name, refdir, overwrite=True)
        spec["refdir"] = str(refdir)
    with Store.open() as store:
        info = store.get_model(name)
        ann = store.ann_supported() and not args.no_ann
        if ann and not all(li.index_kind for li in info.layers):
            print("  building HNSW indexes (m=16, ef_construction=64) and measuring their recall...", flush=True)
            t = time.perf_counter()
            store.build_index(info)
            info = store.get_model(name)
            print(f"  built in {time.perf_counter() - t:.0f}s", flush=True)
    spec.update(model=name, k=args.k, ef_search=args.ef_search, repeat=args.repeat,
                queries=make_queries(args, name, Path(args.work) / "queries" / name.replace("/", "_")))
    index_mb = sum(li.row_count for li in info.layers) * info.hidden_size * 2 / 2**20
    print(f"\n[load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: wall times are only "
          "comparable when it is low]")
    print(f"\n== {name}: {info.row_count // max(1, len(info.layers))} rows/layer x {len(info.layers)} layers, "
          f"D={info.hidden_size}, fp16 index {index_mb:.0f} MiB, k={args.k}", flush=True)
    spec["ann"] = ann
    # the reference and llens alternate, round by round, so that both see the same load
    runs: dict = {}
    for r in range(args.rounds):
        for kind in ("ref", "llens") if r % 2 == 0 else ("llens", "ref"):
            runs[kind] = _pool(runs.get(kind), run_worker(kind, spec))
        print(f"  round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.1f})", flush=True)
    runs["llens-new"] = run_worker("llens-new", spec)  # after the llens rounds: the cache is filled
    # one cold query is one sample of a ~2 s span that a neighbouring process's leftovers sway
    # (one run: 2.12 s inside the bench, 1.55-1.60 s alone, the same hour): the median of several
    for _ in range(args.cold_runs):
        runs["llens-cold"] = _pool(runs.get("llens-cold"), run_worker("llens-cold", spec))
    sides = {"ref": runs["ref"], **{f"llens-{m}": runs["llens"][m] for m in ("exact", "ann", "auto")
                                    if m in runs["llens"]}}
    truth = runs["ref"]["results"]
    print(f"medians of {args.rounds} rounds x {args.repeat} searches (x4 for the small batches; HNSW-only "
          "once a round for the big ones); "
          f"llens scan dtype {runs['llens'].get('scan_dtype')}, (query, layer) pairs rescanned with more "
          f"candidates in the last round's exact mode: {runs['llens'].get('widened')}")
    print(f"{'queries':<9} {'ref s':>7} {'exact s':>8} {'ann s':>7} {'auto s':>7} {'ref/exact':>9} {'ref/auto':>8} {'auto/best':>9} "
          f"{'recall exact':>12} {'ann':>6} {'auto':>6} {'(ties ok: ann, auto)':>20}  auto paths")
    for qname in truth:
        t = {kind: _median(r["times"].get(qname)) for kind, r in sides.items()}
        rec = {kind: recall(r["results"][qname], truth[qname], args.k) for kind, r in sides.items()
               if kind != "ref"}
        ann_r = rec.get("llens-ann", (float("nan"),) * 2)
        # the faster of exact and HNSW among those that reach the recall target here
        ok = [t["llens-exact"]] + ([t["llens-ann"]] if "llens-ann" in t and ann_r[1] >= 0.95 else [])
        best = min(ok)
        ann_t = f"{t['llens-ann']:7.3f}" if t.get("llens-ann") is not None else f"{'n/a':>7}"
        print(f"{qname:<9} {t['ref']:7.3f} {t['llens-exact']:8.3f} {ann_t} {t['llens-auto']:7.3f} "
              f"{t['ref'] / t['llens-exact']:8.2f}x {t['ref'] / t['llens-auto']:7.2f}x {t['llens-auto'] / best:8.2f}x {rec['llens-exact'][0]:12.3f} {ann_r[0]:6.3f} "
              f"{rec['llens-auto'][0]:6.3f} {ann_r[1]:9.3f} {rec['llens-auto'][1]:10.3f}  "
              f"{sides['llens-auto']['paths'][qname]}")
    first = next(iter(truth))
    cold = runs["llens-cold"]["times"][first]
    print(f"first (cold) query, {first}: llens {_median(cold):.2f}s (copies every leaf; median of {len(cold)}: "
          f"{', '.join(f'{t:.2f}' for t in cold)}); reference load {_median(runs['ref']['times']['load']):.2f}s "
          f"+ search {_median(runs['ref']['times'][first]):.2f}s")
    print(f"first query of a new process (cache filled, default mode), {first}: llens import + connect "
          f"{_median(runs['llens-new']['times']['connect']):.2f}s + search {_median(runs['llens-new']['times'][first]):.2f}s; "
          f"reference load {_median(runs['ref']['times']['load']):.2f}s + search {_median(runs['ref']['times'][first]):.2f}s")
    print("peak RSS MiB: " + ", ".join(f"{kind} {r['maxrss_mb']:.0f}" for kind, r in runs.items())
          + " (llens: the exact, ann and auto process)")
    print("auto/best: auto's time over the faster of exact and HNSW-only, counting HNSW only "
          "where its tie-aware recall@10 is >= 0.95 on that query set")
    if args.no_ann:
        print("llens-ann: n/a (--no-ann: no HNSW built or searched; auto then scans every leaf)")
    elif not ann:
        print("llens-ann: n/a (this server's pgvector failed the ANN probe: llens.ann_index = off)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, action="append", help="rows per layer (repeatable); default 100000")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--queries", type=int, default=576, help="the big batch (576 = one image's patches)")
    p.add_argument("--small", type=int, default=8, help="the small batch (a few text tokens)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ef-search", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3, help="searches per side and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating reference / llens processes; medians shown")
    p.add_argument("--no-ann", action="store_true",
                   help="no HNSW: skip its build (hours at 1M rows on 2 cores) and the ann column")
    p.add_argument("--cold-runs", type=int, default=3,
                   help="first (cold) queries, each in a new process with the cache emptied (median shown)")
    p.add_argument("--model", help="benchmark a model already in the store instead of synthetic rows")
    p.add_argument("--work", default="/tmp/llens-bench")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cold_runs < 1:
        p.error("--cold-runs must be at least 1")
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec))))
        return
    os.environ.setdefault("LLENS_DATA_DIR", str(Path(args.work) / "data"))
    os.environ.setdefault("LLENS_CACHE_DIR", str(Path(args.work) / "cache"))
    import torch

    from latentlens.config import cpu_flags, cpu_name

    units = [f for f in ("avx512_bf16", "amx_bf16") if f in cpu_flags()]
    print(f"{cpu_name()}, {os.cpu_count()} CPUs ({', '.join(units) or 'no BF16 units'}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    from latentlens.scan import measure_dtypes

    t = measure_dtypes(dim=args.dim)
    print(f"block matmul as the scan runs it (float32: fp16 -> f32 + mm; bfloat16: cached bf16 rows), "
          f"seconds per 512x{args.dim} @ {args.dim}x16384: "
          f"float32 {t['float32']:.3f}, bfloat16 {t['bfloat16']:.3f}")
    if args.model:
        bench_one(args, args.model)
        return
    for rows in args.rows or [100_000]:
        args.rows_now = rows
        bench_one(args, f"bench-{rows}x{args.layers}x{args.dim}")


if __name__ == "__main__":
    main()
