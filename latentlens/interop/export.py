"""Write a stored model in the reference layout (one layer in memory at a time, float16
as stored), loadable by the reference's ``ContextualIndex.from_directory``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from latentlens.errors import InputError
from latentlens.interop.reference import CACHE_FILE, existing_layers
from latentlens.store import Store
from latentlens.store.types import KEY_DTYPE

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def export_index(
    store: Store,
    model: str,
    directory: str | Path,
    *,
    layers: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Write ``model`` in the reference layout; returns {"layers": {layer: rows}, "hidden_dim": D}."""
    import torch

    from latentlens.search import validate_layers

    info = store.get_model(model)
    chosen = validate_layers(info, layers)
    directory = Path(directory)
    if (directory / "metadata.json").exists() and not overwrite:
        raise InputError(f"{directory} already holds an index (metadata.json): choose another dir or overwrite")
    directory.mkdir(parents=True, exist_ok=True)
    done: dict[int, int] = {}
    for layer in chosen:
        n = info.layer(layer).row_count
        emb = torch.empty((n, info.hidden_size), dtype=torch.float16)
        keys = []
        filled = 0
        for k, v in store.iter_layer(info, layer):
            m = min(len(k), n - filled)
            if m < len(k):  # rows added since we read the count: export a consistent prefix
                k, v = k[:m], v[:m]
            emb[filled: filled + m] = torch.from_numpy(v)
            keys.append(k)
            filled += m
            if progress is not None:
                progress(f"layer {layer}", filled, n)
        kk = np.concatenate(keys) if keys else np.zeros(0, dtype=KEY_DTYPE)
        sentences = _sentences(store, np.unique(kk["sentence_id"]))
        vocab = store.token_texts(info, np.unique(kk["token_id"]).tolist())
        meta = [
            {"token_str": vocab.get(int(t), ""), "token_id": int(t), "caption": sentences.get(int(s), ""),
             "position": int(p)}
            for s, p, t in zip(kk["sentence_id"].tolist(), kk["position"].tolist(), kk["token_id"].tolist(),
                               strict=True)
        ]
        out = directory / f"layer_{layer}"
        out.mkdir(exist_ok=True)
        tmp = out / f".{CACHE_FILE}.{os.getpid()}.tmp"
        torch.save({"embeddings": emb[:filled], "metadata": meta}, tmp)
        os.replace(tmp, out / CACHE_FILE)
        done[layer] = filled
        del emb, meta
    all_layers = sorted(set(done) | set(existing_layers(directory)))
    (directory / "metadata.json").write_text(json.dumps(
        {"layers": all_layers, "hidden_dim": info.hidden_size, "model": info.name,
         "exported_by": "latentlens-db"}, indent=2))
    return {"model": info.name, "directory": str(directory), "hidden_dim": info.hidden_size,
            "layers": {str(k): v for k, v in done.items()}}



def _sentences(store: Store, ids: np.ndarray, chunk: int = 50_000) -> dict[int, str]:
    out: dict[int, str] = {}
    for lo in range(0, len(ids), chunk):
        out.update(store.sentences(ids[lo: lo + chunk].tolist()))
    return out
