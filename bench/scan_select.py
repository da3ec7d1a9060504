"""The exact scan's two candidate selections side by side, on one cached leaf (no database).

* threshold: one pass keeps every row within the rounding bound of the running
  k-th best, re-ranks those and certifies (the default);
* topk:      the top-(k + 32) by score, re-ranked, rescanned with 4x the
  candidates where not certified (LLENS_SCAN_SELECT=topk);
* auto:      top-k, the one pass for what it leaves and on leaves where it
  left > 10% of a batch (the default).

Rows are bench/query.py's synthetic clustered rows (normalised, as the store
keeps them), written once as a cache leaf under --work; queries are stored rows
plus noise (in-distribution, best cosine ~0.99, k-th ~0.83) and random unit
vectors (out of distribution), 576 and 8 of each. The engines alternate
search by search (same machine state); the table shows median wall and CPU
seconds per search of one leaf (x layers for a whole index), the rescans
("widened") and whether both answers agree (they must: both are certified).

    python bench/scan_select.py --rows 300000 --rows 36500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


def leaf_for(rows: int, dim: int, work: Path):
    from query import synthetic

    from latentlens.scan import CACHE_FORMAT, LeafCache
    from latentlens.store.types import KEY_DTYPE

    path = work / f"leaf-{rows}x{dim}"
    leaf = LeafCache._open(path, dim)
    if leaf is not None:
        return leaf
    path.mkdir(parents=True, exist_ok=True)
    _layer, _tok, v = next(synthetic(rows, 1, dim))
    v16 = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    v16.tofile(path / "vectors.f16")
    keys = np.zeros(rows, KEY_DTYPE)
    keys["sentence_id"] = np.arange(rows)
    np.save(path / "keys.npy", keys)
    np.save(path / "inv_norm.npy", (1 / np.linalg.norm(v16.astype(np.float32), axis=1)).astype(np.float32))
    (path / "meta.json").write_text(json.dumps({"format": CACHE_FORMAT, "rows": rows, "dim": dim,
                                                "row_count": rows, "version": 1}))
    return LeafCache._open(path, dim)


def main() -> None:
    from latentlens.scan import ScanEngine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, action="append", help="rows of the leaf (repeatable); default 300000")
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dtype", default=None, help="scan dtype (default: the scan's own choice)")
    p.add_argument("--work", default="/tmp/llens-bench/scan-select")
    args = p.parse_args()
    from latentlens.config import cpu_name

    cpu = cpu_name()
    print(f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} (noisy when high)")
    print(f"{'rows':>8} {'queries':<8} {'threshold s':>11} {'topk s':>8} {'auto s':>8} {'topk/thr':>8} "
          f"{'topk/auto':>9} {'cpu thr':>8} {'cpu topk':>8} {'cpu auto':>8} {'widened thr':>11} {'topk':>5} "
          f"{'auto':>5} {'same':>5}")
    for rows in args.rows or [300000]:
        leaf = leaf_for(rows, args.dim, Path(args.work))
        v16 = np.memmap(leaf.vectors_path, dtype=np.float16, mode="r", shape=(leaf.rows, leaf.dim))
        rng = np.random.default_rng(42)
        ind = v16[np.sort(rng.choice(leaf.rows, 576, replace=False))].astype(np.float32)
        ind += 0.02 * rng.normal(size=ind.shape).astype(np.float32)
        ood = rng.normal(size=(576, leaf.dim)).astype(np.float32)
        for name, q in (("in-576", ind), ("ood-576", ood), ("in-8", ind[:8]), ("ood-8", ood[:8])):
            qt = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
            engines = {s: ScanEngine(None, dtype=args.dtype, select=s) for s in ("threshold", "topk", "auto")}
            wall: dict[str, list[float]] = {s: [] for s in engines}
            cpus: dict[str, list[float]] = {s: [] for s in engines}
            out = {}
            for r in range(args.repeat + 1):  # the first search of each is not timed (keep hints, bf16 copy)
                for s in (("threshold", "topk", "auto") if r % 2 else ("auto", "topk", "threshold")):
                    t, c = time.perf_counter(), time.process_time()
                    out[s] = engines[s].search_leaf(leaf, qt, args.k)
                    if r:
                        wall[s].append(time.perf_counter() - t)
                        cpus[s].append(time.process_time() - c)
            same = all(bool(torch.allclose(out[s][0], out["topk"][0], atol=1e-6)) for s in out)
            w = {s: statistics.median(x) for s, x in wall.items()}
            c = {s: statistics.median(x) for s, x in cpus.items()}
            print(f"{rows:>8} {name:<8} {w['threshold']:11.3f} {w['topk']:8.3f} {w['auto']:8.3f} "
                  f"{w['topk'] / w['threshold']:7.2f}x {w['topk'] / w['auto']:8.2f}x {c['threshold']:8.3f} "
                  f"{c['topk']:8.3f} {c['auto']:8.3f} {engines['threshold'].widened:>11} "
                  f"{engines['topk'].widened:>5} {engines['auto'].widened:>5} {str(same):>5}", flush=True)


if __name__ == "__main__":
    main()
