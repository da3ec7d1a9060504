"""The reference library's index layout: reading and checking its files.

The reference library (``latentlens`` 0.1.0, ``ContextualIndex``) keeps an
index as a directory::

    metadata.json                  {"layers": [...], "hidden_dim": D}
    layer_N/embeddings_cache.pt    {"embeddings": Tensor [n, D],
                                    "metadata": [{"token_str", "token_id", "caption", "position"}, ...]}

A ``.pt`` is opened with ``torch.load(weights_only=True, mmap=True)`` (a file
that needs arbitrary unpickling is refused: unpickling runs code), so the
embeddings stay on disk until a chunk is read.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

from latentlens.errors import MODELS_EXTRA, InputError
from latentlens.torchfile import load_weights_only

CACHE_FILE = "embeddings_cache.pt"
LAYER_DIR = re.compile(r"^layer_(\d+)$")


def layer_files(directory: Path) -> dict[int, Path]:
    """layer number -> its embeddings_cache.pt, for every layer_N folder that has one."""
    if not directory.is_dir():
        raise InputError(f"{directory} is not a directory")
    found = {}
    for p in directory.iterdir():
        m = LAYER_DIR.match(p.name)
        if m and (p / CACHE_FILE).is_file():
            found[int(m.group(1))] = p / CACHE_FILE
    if not found:
        raise InputError(
            f"no layer_N/{CACHE_FILE} files in {directory} (expected the reference layout: "
            f"metadata.json and layer_N/{CACHE_FILE})"
        )
    return dict(sorted(found.items()))


def read_metadata(directory: Path) -> dict:
    """metadata.json as a dict ({} if absent); its "layers", if present, as sorted ints."""
    path = directory / "metadata.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path} must hold a JSON object ({{\"layers\": [...], \"hidden_dim\": D}})")
    try:
        if meta.get("layers") is not None:
            meta["layers"] = sorted({int(x) for x in meta["layers"]})
        if meta.get("hidden_dim") is not None:
            meta["hidden_dim"] = int(meta["hidden_dim"])
    except (TypeError, ValueError):
        raise InputError(f"{path}: \"layers\" must be a list of layer numbers and \"hidden_dim\" a number") from None
    return meta


def check_layer_file(path: Path, again: str = "copy it again") -> None:
    """Cheap checks of one cache file before any layer is imported: not empty and, for the
    zip format torch.save writes, a readable zip directory (a truncated copy has none)."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes): {again}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"{path} is truncated or corrupt ({e}): {again}") from None


def load_layer_file(path: Path) -> tuple[Any, list[dict]]:
    """(embeddings tensor [n, D], metadata rows) of one cache file, safely and lazily."""
    import torch

    obj = load_weights_only(path, mmap=True)
    if not isinstance(obj, dict) or "embeddings" not in obj or "metadata" not in obj:
        raise InputError(f"{path} is not a reference cache (a dict with 'embeddings' and 'metadata')")
    emb, meta = obj["embeddings"], obj["metadata"]
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
        raise InputError(f"{path}: 'embeddings' must be a 2-D tensor")
    if not isinstance(meta, list) or len(meta) != emb.shape[0]:
        raise InputError(f"{path}: 'metadata' must be a list with one row per embedding ({emb.shape[0]})")
    return emb, meta



def existing_layers(directory: Path) -> list[int]:
    """The layers a directory already holds ([] if none, or no directory)."""
    try:
        return list(layer_files(directory))
    except InputError:
        return []


def require(module: str, why: str) -> None:
    """InputError naming the 'models' extra unless ``module`` can be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"{why} needs '{module}': {MODELS_EXTRA} (see the README)")
