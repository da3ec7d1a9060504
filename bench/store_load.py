"""Bulk load: numpy-encoded binary COPY (latentlens.pgcopy) vs pgvector-python's
per-row ``copy.write_row``, side by side on the same rows, one database:
wall-clock rows/s and the client process's CPU time.

    python bench/store_load.py [--rows 50000] [--dim 576]

Prints rows/s of each and the ratio. Uses a throwaway embedded server in a
temp dir (or LLENS_BENCH_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector

from latentlens import migrate
from latentlens.db import EmbeddedServer
from latentlens.store import EmbeddingBatch, Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=576)
    args = ap.parse_args()
    n, d = args.rows, args.dim

    url = os.environ.get("LLENS_BENCH_DATABASE_URL")
    if not url:
        url = EmbeddedServer(Path(tempfile.mkdtemp()) / "data").start()
    migrate.upgrade(url)
    store = Store.open(url)
    rng = np.random.default_rng(0)
    vecs = (rng.normal(size=(n, d)) * 1000).astype(np.float32)
    corpus = store.register_corpus(f"bench-{time.time()}", content_hash=str(time.time()))
    ids = store.add_sentences(corpus, [f"s{i}" for i in range(n)])

    def batch() -> EmbeddingBatch:
        return EmbeddingBatch(ids, np.full(n, 2, np.int32), np.arange(n, dtype=np.int32),
                              np.full(n, -1, np.int32), np.full(n, -1, np.int32),
                              np.arange(n, dtype=np.int64), {1: vecs})

    # latentlens: numpy-encoded binary COPY (normalisation included)
    info = store.ensure_layers(store.register_model(f"bench-np-{time.time()}", hidden_size=d, num_layers=2), [1])
    t, c = time.perf_counter(), time.process_time()
    store.write_embeddings(info, batch())
    t_np, c_np = time.perf_counter() - t, time.process_time() - c

    # pgvector-python: binary COPY with one write_row per row
    info2 = store.ensure_layers(store.register_model(f"bench-row-{time.time()}", hidden_size=d, num_layers=2), [1])
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    with psycopg.connect(url) as conn:
        register_vector(conn)
        t, c = time.perf_counter(), time.process_time()
        with conn.cursor().copy(
            "COPY token_embedding (model_id, layer, sentence_id, position, token_id, prefix_hash, embedding) "
            "FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int4", "int4", "int8", "int4", "int4", "int8", "halfvec"])
            for i in range(n):
                copy.write_row([info2.id, 1, int(ids[i]), 2, i, i, HalfVector(unit[i])])
        conn.commit()
        t_row, c_row = time.perf_counter() - t, time.process_time() - c

    print(f"rows={n} dim={d}")
    # Wall time is bounded by the server (WAL, primary-key index); client CPU is
    # what an ingest's writer thread takes away from the model's forward passes.
    print(f"{'':24} {'rows/s (wall)':>14} {'client CPU s':>13}")
    print(f"{'numpy binary COPY':24} {n / t_np:14.0f} {c_np:13.2f}")
    print(f"{'pgvector write_row COPY':24} {n / t_row:14.0f} {c_row:13.2f}")
    print(f"wall speed-up {t_row / t_np:.2f}x, client CPU saved {c_row / max(c_np, 1e-9):.1f}x")
    store.close()


if __name__ == "__main__":
    main()
