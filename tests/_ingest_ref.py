"""An independent, slow, obvious computation of what `llens ingest` must store.

One sentence at a time, unpadded, straight through the decoder stack with
``output_hidden_states=True`` (no position_ids, no batching, no windows),
then the documented rules in plain Python: skip positions, never the BOS,
prefix dedup in corpus order (blake2b of the int32 ids), first-come cap
per token id. Used to check the fast pipeline row by row.
"""

from __future__ import annotations

import hashlib

import numpy as np
import psycopg
import torch


def prefix_hash(ids) -> int:
    data = np.asarray(ids, dtype="<i4").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def expected_rows(lm, texts, layers, *, skip=2, cap=50, max_length=None):
    """{(ordinal, position): (token_id, prefix_hash, span, {layer: unit vector})} in corpus order."""
    seen: set[int] = set()
    per_token: dict[int, int] = {}
    out = {}
    first = max(skip, 1 if lm.bos_token_id is not None else 0)
    for o, text in enumerate(texts):
        enc = lm.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = enc["input_ids"][: max_length] if max_length else enc["input_ids"]
        if len(ids) <= first:
            continue
        with torch.inference_mode():
            hs = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for p in range(first, len(ids)):
            h = prefix_hash(ids[: p + 1])
            if h in seen:
                continue
            seen.add(h)
            tok = ids[p]
            if cap is not None and per_token.get(tok, 0) >= cap:
                continue
            per_token[tok] = per_token.get(tok, 0) + 1
            vecs = {}
            for layer in layers:
                v = hs[layer][0, p].float().numpy()
                vecs[layer] = v / np.linalg.norm(v)
            out[(o, p)] = (tok, h, tuple(enc["offset_mapping"][p]), vecs)
    return out


def stored_rows(url: str, model: str, layer: int):
    """{(ordinal, position): (token_id, prefix_hash, (char_start, char_end), vector)} of one leaf."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT s.ordinal, e.position, e.token_id, e.prefix_hash, e.char_start, e.char_end,
                   e.embedding::text
              FROM token_embedding e JOIN model m ON m.id = e.model_id
              JOIN sentence s ON s.id = e.sentence_id
             WHERE m.name = %s AND e.layer = %s
            """,
            (model, layer),
        ).fetchall()
    return {
        (o, p): (t, h, (cs, ce), np.array(v.strip("[]").split(","), dtype=np.float32))
        for o, p, t, h, cs, ce, v in rows
    }


def compare(url: str, model: str, expected, layers, min_cos: float = 0.999) -> None:
    for layer in layers:
        got = stored_rows(url, model, layer)
        assert set(got) == set(expected), (
            f"layer {layer}: {len(got)} stored vs {len(expected)} expected; "
            f"missing {sorted(set(expected) - set(got))[:5]}, extra {sorted(set(got) - set(expected))[:5]}"
        )
        worst = 1.0
        for key, (tok, h, span, vecs) in expected.items():
            g = got[key]
            assert g[0] == tok and g[1] == h, key
            assert g[2] == span, (key, g[2], span)
            worst = min(worst, float(np.dot(g[3], vecs[layer]) / np.linalg.norm(g[3])))
        assert worst >= min_cos, f"layer {layer}: worst cosine {worst}"
