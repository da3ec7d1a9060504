"""GPU check (run by bench/gpu_check.sh on a machine with CUDA; CI never runs it).

    python bench/gpu_check.py scan --rows 300000 --layers 8
    python bench/gpu_check.py ingest

scan: writes N synthetic rows x L layers straight into scan-cache leaves (no
database), answers 576 and 8 queries, in and out of distribution, with the
CPU scan (its default dtype) and the CUDA scan (each leaf kept on the GPU as
float16), checks that the top-10 rows are identical (ties within 1e-6 of
the float32 cosine allowed) and prints warm median times of both.

ingest: a tiny random Llama (latentlens.models.tiny) over the shipped sample
corpus with ``llens ingest --device cuda`` into an embedded PostgreSQL, then
checks the stored row count and prints the time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_leaf(path: Path, rows: np.ndarray):
    from latentlens.scan import CACHE_FORMAT, Leaf
    from latentlens.store.types import KEY_DTYPE

    path.mkdir(parents=True)
    v = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)  # unit, as the store writes
    v.tofile(path / "vectors.f16")
    keys = np.zeros(len(v), KEY_DTYPE)
    keys["sentence_id"] = np.arange(len(v))
    np.save(path / "keys.npy", keys)
    np.save(path / "inv_norm.npy", (1 / np.linalg.norm(v.astype(np.float32), axis=1)).astype(np.float32))
    (path / "meta.json").write_text(json.dumps({"format": CACHE_FORMAT, "rows": len(v), "dim": v.shape[1],
                                                "row_count": len(v), "version": 1}))
    return Leaf(path, len(v), v.shape[1], len(v), 1)


def check_scan(args) -> int:
    import torch
    from query import synthetic  # bench/query.py's rows

    from latentlens.scan import ScanEngine

    smoke = args.device == "cpu"  # a CPU-only smoke run of this script: the resident float16 path on the CPU
    assert smoke or torch.cuda.is_available(), "no CUDA device"
    work = Path(tempfile.mkdtemp(prefix="llens-gpu-"))
    leaves, sample = [], None
    for layer, _tok, vecs in synthetic(args.rows, args.layers, args.dim):
        leaves.append(write_leaf(work / str(layer), vecs))
        if layer == args.layers // 2:
            sample = vecs[np.random.default_rng(1).choice(len(vecs), args.queries, replace=False)]
    rng = np.random.default_rng(42)
    ind = sample + 0.02 * rng.normal(size=sample.shape).astype(np.float32)
    ood = rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    sets = {"576 in-dist": ind, "576 OOD": ood, "8 in-dist": ind[:8], "8 OOD": ood[:8]}
    engines = {"cpu": ScanEngine(None, device="cpu"), "cuda": ScanEngine(None, device=args.device)}
    engines["cuda"]._resident_scan = True
    sync = (lambda: None) if smoke else torch.cuda.synchronize
    failed = 0
    print(f"{args.rows:,} rows x {args.layers} layers x {args.dim}; CPU scan dtype {engines['cpu'].dtype}; "
          f"GPU {'none (smoke run)' if smoke else torch.cuda.get_device_name(0)}")
    print(f"{'queries':<12} {'cpu s':>8} {'cuda s':>8} {'cuda first s':>12}  identical top-10")
    for name, q in sets.items():
        qt = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
        times: dict[str, list[float]] = {"cpu": [], "cuda": []}
        answers = {}
        first = None
        for rep in range(args.repeat + 1):
            for dev, eng in engines.items():
                t = time.perf_counter()
                answers[dev] = [eng.search_leaf(leaf, qt, 10) for leaf in leaves]
                if dev == "cuda":
                    sync()
                took = time.perf_counter() - t
                if rep == 0 and dev == "cuda":
                    first = took  # copies each leaf to the GPU
                if rep > 0:
                    times[dev].append(took)
        same = True
        for (cs, ci), (gs, gi) in zip(answers["cpu"], answers["cuda"], strict=True):
            diff = ci != gi
            if bool(diff.any()) and float((cs - gs).abs()[diff].max()) > 1e-6:
                same = False
        failed += not same
        print(f"{name:<12} {statistics.median(times['cpu']):8.3f} {statistics.median(times['cuda']):8.3f} "
              f"{first:12.3f}  {'yes' if same else 'NO'}")
    return 1 if failed else 0


def check_ingest(args) -> int:
    from latentlens.models.tiny import make_tiny_model, sample_corpus_path

    work = Path(tempfile.mkdtemp(prefix="llens-gpu-ingest-"))
    model = make_tiny_model(work / "tiny-llama", "llama")
    env = dict(os.environ, LLENS_DATA_DIR=str(work / "data"), LLENS_CACHE_DIR=str(work / "cache"))
    env.pop("LLENS_DATABASE_URL", None)
    t = time.perf_counter()
    r = subprocess.run(["llens", "ingest", str(model), str(sample_corpus_path()), "--name", "tiny-gpu",
                        "--device", "cuda", "--layers", "1,2,3"], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if r.returncode != 0:
        print(r.stderr[-3000:])
        return 1
    info = subprocess.run(["llens", "models", "--json"], env=env, capture_output=True, text=True)
    print(f"tiny ingest on cuda: {took:.1f} s, exit 0; models: {info.stdout.strip()[:400]}")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["scan", "ingest"])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--queries", type=int, default=576)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script without a GPU")
    args = p.parse_args()
    sys.exit(check_scan(args) if args.what == "scan" else check_ingest(args))


if __name__ == "__main__":
    main()
