"""The atlas store at a realistic shape, synthetic rows (no model): per-image write time, then
`find --word` (the neighbour table's word index) and `find --text`'s k-NN (exact scan vs HNSW)
latency on the loaded atlas.

    python bench/atlas.py [--images 60] [--patches 576] [--dim 2048] [--layers 2] [--k 10]

A model's own cost (the VLM's forward pass and the LatentLens search of each patch) is not
here: it is the same as `llens query --image`'s. Uses a throwaway embedded server in a temp
dir (or LLENS_BENCH_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from latentlens import migrate
from latentlens.db import EmbeddedServer
from latentlens.store import Store
from latentlens.store.atlas import AtlasImageRows

WORDS = [f"w{i}" for i in range(2000)]  # a vocabulary of whole words, Zipf-distributed below


def image_rows(rng: np.random.Generator, i: int, p: int, d: int, layers: list[int], k: int) -> AtlasImageRows:
    n = p * len(layers) * k
    ranks = np.tile(np.arange(1, k + 1, dtype=np.int16), p * len(layers))
    words = [WORDS[min(int(z) - 1, len(WORDS) - 1)] for z in rng.zipf(1.3, size=n)]
    side = int(np.ceil(np.sqrt(p)))
    rc = np.array([(j // side, j % side) for j in range(p)], dtype=np.int32)
    boxes = np.stack([rc[:, 1] * 14, rc[:, 0] * 14, rc[:, 1] * 14 + 14, rc[:, 0] * 14 + 14], axis=1).astype(float)
    return AtlasImageRows(
        content_hash=f"{i:064x}", path=f"/data/img{i}.jpg", size=(side * 14, side * 14), grid=(side, side),
        patch_row=rc[:, 0], patch_col=rc[:, 1], boxes=boxes,
        vectors={layer: rng.normal(size=(p, d)).astype(np.float32) for layer in layers},
        nb_layer=np.repeat(np.array(layers, dtype=np.int32), p * k),
        nb_patch=np.tile(np.repeat(np.arange(p, dtype=np.int32), k), len(layers)),
        nb_rank=ranks, nb_token_id=np.zeros(n, dtype=np.int32), nb_token=[None] * n, nb_word=words,
        nb_similarity=rng.uniform(0.05, 0.35, size=n).astype(np.float32),
        nb_text_layer=np.full(n, 8, dtype=np.int32), nb_sentence_id=np.arange(n, dtype=np.int64),
        nb_position=np.zeros(n, dtype=np.int32))


def timed(fn, reps: int = 5) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--patches", type=int, default=576)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--no-index", action="store_true", help="skip the HNSW build (minutes at D = 2048)")
    args = ap.parse_args()
    url = os.environ.get("LLENS_BENCH_DATABASE_URL") or EmbeddedServer(Path(tempfile.mkdtemp()) / "data").start()
    migrate.upgrade(url)
    layers = [8 * (i + 1) for i in range(args.layers)]
    rng = np.random.default_rng(0)
    with Store.open(url) as store:
        info = store.register_model(f"bench-atlas-{time.time()}", hidden_size=args.dim, num_layers=max(layers) + 1)
        atlas = store.create_atlas(f"bench-{time.time()}", info, layers, {"k": args.k})
        run = store.create_atlas_run(atlas, source="bench", shard=0, num_shards=1, images_total=args.images,
                                     hostname="bench", pid=os.getpid())
        writes = []
        for i in range(args.images):
            rows = image_rows(rng, i, args.patches, args.dim, layers, args.k)
            t = time.perf_counter()
            store.write_atlas_image(atlas, run.id, rows)
            writes.append(time.perf_counter() - t)
        store.finish_atlas_run(run.id, "done")
        atlas = store.get_atlas(atlas.name)
        store.analyze_atlas(atlas)
        n_tok = args.images * args.patches
        n_nb = n_tok * len(layers) * args.k
        print(f"atlas: {args.images} images x {args.patches} patches x {len(layers)} layers, D = {args.dim}, "
              f"k = {args.k}: {n_tok * len(layers):,} visual tokens, {n_nb:,} neighbour rows")
        print(f"write per image (median of {len(writes)}): {statistics.median(writes) * 1000:.0f} ms "
              f"({args.patches * len(layers) / statistics.median(writes):,.0f} tokens/s)")
        common, rare = WORDS[0], WORDS[300]
        for word in (common, rare):
            n = len(store.atlas_find_word(atlas, word, layer=layers[-1], limit=10_000))
            ms = timed(lambda w=word: store.atlas_find_word(atlas, w, layer=layers[-1], limit=50)) * 1000
            print(f"find --word {word} (-k 50; {n:,} matching patches at layer {layers[-1]}): {ms:.1f} ms")
        q = rng.normal(size=(1, args.dim)).astype(np.float32)
        ms = timed(lambda: store.atlas_knn(atlas, layers[-1], q, 50, exact=True), reps=3) * 1000
        print(f"find --text k-NN, exact scan of {n_tok:,} tokens: {ms:.0f} ms")
        if store.ann_supported() and not args.no_index:
            t = time.perf_counter()
            store.build_atlas_index(atlas, [layers[-1]])
            print(f"HNSW build, one layer: {time.perf_counter() - t:.1f} s")
            atlas = store.get_atlas(atlas.name)
            exact = {(a, b) for a, b, _ in store.atlas_knn(atlas, layers[-1], q, 50, exact=True)[0]}
            got = {(a, b) for a, b, _ in store.atlas_knn(atlas, layers[-1], q, 50, exact=False)[0]}
            ms = timed(lambda: store.atlas_knn(atlas, layers[-1], q, 50, exact=False)) * 1000
            print(f"find --text k-NN, HNSW: {ms:.1f} ms, recall@50 vs exact {len(exact & got) / 50:.2f} "
                  "(random queries: out of distribution, which `auto` answers exactly)")


if __name__ == "__main__":
    main()
