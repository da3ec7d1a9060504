"""Synthetic stored rows for query, scan and interop tests (no model needed)."""

from __future__ import annotations

import hashlib

import numpy as np

from latentlens.store import EmbeddingBatch, Store

WORDS = ["a", "brown", "dog", "on", "the", "grass", "red", "cat", "sat", "mat", "blue", "sky", "over", "hill"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        s = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))
        if s not in out:
            out.append(s)
    return out


def spans(text: str) -> list[tuple[int, int]]:
    out, i = [], 0
    for w in text.split(" "):
        out.append((i, i + len(w)))
        i += len(w) + 1
    return out


def fill(store: Store, name: str, *, dim: int = 32, layers=(0, 4, 8), n_sentences: int = 60,
         seed: int = 0, corpus: str | None = None) -> dict:
    """Register a model with vocabulary WORDS and write clustered vectors for every word.

    Returns {"vectors": {layer: [N, D] float32 as written}, "keys": [(sentence_id, position)],
    "tokens": [...], "texts": [...]}.
    """
    rng = np.random.default_rng(seed)
    info = store.register_model(name, hidden_size=dim, num_layers=max(layers), architecture="synthetic")
    info = store.ensure_layers(info, list(layers))
    store.set_vocabulary(info, WORDS)
    texts = sentences(n_sentences, seed)
    c = store.register_corpus(corpus or f"corpus-{name}",
                              content_hash=hashlib.sha256("\n".join(texts).encode()).hexdigest())
    ids = store.add_sentences(c, texts)
    centres = {layer: rng.normal(size=(len(WORDS), dim)).astype(np.float32) for layer in layers}
    sid, pos, tok, cs, ce = [], [], [], [], []
    for s_id, t in zip(ids, texts, strict=True):
        for p, (w, (a, b)) in enumerate(zip(t.split(" "), spans(t), strict=True)):
            sid.append(int(s_id))
            pos.append(p + 1)  # position 0 would be BOS
            tok.append(WORDS.index(w))
            cs.append(a)
            ce.append(b)
    n = len(sid)
    tok_a = np.array(tok, dtype=np.int32)
    vectors = {layer: (centres[layer][tok_a] + 0.6 * rng.normal(size=(n, dim))).astype(np.float32)
               for layer in layers}
    batch = EmbeddingBatch(
        sentence_id=np.array(sid, dtype=np.int64), position=np.array(pos, dtype=np.int32), token_id=tok_a,
        char_start=np.array(cs, dtype=np.int32), char_end=np.array(ce, dtype=np.int32),
        prefix_hash=np.arange(n, dtype=np.int64) + seed * 1_000_000, vectors=vectors,
    )
    store.write_embeddings(info, batch)
    return {"vectors": vectors, "sentence_id": batch.sentence_id, "position": batch.position,
            "token_id": tok_a, "texts": texts, "info": store.get_model(name)}


def brute_force(vectors: dict, queries: np.ndarray, k: int, layers=None):
    """Reference answer: [(layer, row, sim)] per query, merged across layers (float16-stored rows)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = []
    cands = []
    for layer in sorted(layers or vectors):
        v = vectors[layer] / np.linalg.norm(vectors[layer], axis=1, keepdims=True)
        v = v.astype(np.float16).astype(np.float32)
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        cands.append((layer, q @ v.T))
    for qi in range(len(q)):
        allc = [(float(s[qi, r]), layer, r) for layer, s in cands for r in np.argsort(-s[qi])[:k]]
        allc.sort(key=lambda x: -x[0])
        out.append(allc[:k])
    return out
