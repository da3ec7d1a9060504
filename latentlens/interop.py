"""Import and export the reference LatentLens index layout.

The reference library (``latentlens`` 0.1.0, ``ContextualIndex``) keeps an
index as a directory::

    metadata.json                  {"layers": [...], "hidden_dim": D}
    layer_N/embeddings_cache.pt    {"embeddings": Tensor [n, D],
                                    "metadata": [{"token_str", "token_id", "caption", "position"}, ...]}

Import streams each layer: the ``.pt`` is opened with
``torch.load(weights_only=True, mmap=True)`` (a file that needs arbitrary
unpickling is refused: unpickling runs code), the embeddings stay on disk
and are normalised and written in chunks, so memory is one chunk plus the
row metadata, not a multiple of the layer. Re-import is idempotent: rows
whose (sentence, position) is already stored are skipped. Before anything is
written, every layer ``metadata.json`` lists (or ``layers`` chose) must have
its file, and each file must be non-empty with a readable zip directory, so a
missing or truncated layer imports nothing.

Export writes the same layout from the store (one layer in memory at a time,
float16 as stored), loadable by ``ContextualIndex.from_directory``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentlens.errors import DimensionMismatch, InputError, ModelMismatch, UnknownModel
from latentlens.store import EmbeddingBatch, ModelInfo, Store
from latentlens.store.types import KEY_DTYPE

CACHE_FILE = "embeddings_cache.pt"
LAYER_DIR = re.compile(r"^layer_(\d+)$")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class ImportReport:
    model: str
    corpus: str
    hidden_size: int
    layers: dict[int, dict] = field(default_factory=dict)  # layer -> rows, written, skipped, spans
    sentences: int = 0

    def to_dict(self) -> dict:
        return {"model": self.model, "corpus": self.corpus, "hidden_size": self.hidden_size,
                "sentences": self.sentences, "layers": {str(k): v for k, v in self.layers.items()}}


# --------------------------------------------------------------------------
# reading the reference layout


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


def _read_metadata(directory: Path) -> dict:
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


def check_layer_file(path: Path) -> None:
    """Cheap checks of one cache file before any layer is imported: not empty and, for the
    zip format torch.save writes, a readable zip directory (a truncated copy has none)."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"{path} is truncated or corrupt ({e}): copy it again") from None


def load_layer_file(path: Path) -> tuple[Any, list[dict]]:
    """(embeddings tensor [n, D], metadata rows) of one cache file, safely and lazily."""
    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e).lower() and "zipfile" not in str(e).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if m is None:  # not a pickle at all: a damaged or foreign file
            why = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
            raise InputError(f"{path} is truncated or not a torch file "
                             f"({why.group(1).strip() if why else 'unreadable pickle'})") from None
        raise InputError(
            f"refusing to load {path}: it needs arbitrary unpickling ({m.group(1)}; only tensors, "
            f"dicts, lists, strings and numbers are read), which can run code. Re-save it with plain types."
        ) from None
    except (EOFError, struct.error):
        raise InputError(f"{path} is truncated (the file ends early)") from None
    except (OSError, RuntimeError, KeyError, IndexError, ValueError) as e:
        first = str(e).splitlines()[0].split(". This is an internal miniz error")[0] if str(e) else type(e).__name__
        raise InputError(f"cannot read {path}: {first}") from None
    if not isinstance(obj, dict) or "embeddings" not in obj or "metadata" not in obj:
        raise InputError(f"{path} is not a reference cache (a dict with 'embeddings' and 'metadata')")
    emb, meta = obj["embeddings"], obj["metadata"]
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
        raise InputError(f"{path}: 'embeddings' must be a 2-D tensor")
    if not isinstance(meta, list) or len(meta) != emb.shape[0]:
        raise InputError(f"{path}: 'metadata' must be a list with one row per embedding ({emb.shape[0]})")
    return emb, meta


def _caption_hash(captions: Sequence[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def prefix_hash(caption: str, position: int) -> int:
    """Deterministic int64 for (caption, position): equal prefixes of equal captions agree."""
    d = hashlib.blake2b(f"{position}\0{caption}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little", signed=True)


def find_span(caption: str, token: str) -> tuple[int, int]:
    """Character span of ``token`` in ``caption`` where it is unambiguous, else (-1, -1).

    The reference stores no offsets; a token whose text occurs once (as a
    whole word if it starts with a space, else anywhere) is located, others
    stay unknown rather than risk marking the wrong occurrence.
    """
    t = token.strip()
    if not t:
        return -1, -1
    if token[:1].isspace():
        hits = [m.start() for m in re.finditer(r"(?<!\w)" + re.escape(t), caption)]
    else:
        hits = [m.start() for m in re.finditer(re.escape(t), caption)]
    if len(hits) == 1:
        return hits[0], hits[0] + len(t)
    return -1, -1


# --------------------------------------------------------------------------
# import


def import_index(
    store: Store,
    directory: str | Path,
    model: str,
    *,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    corpus_name: str | None = None,
    layers: Sequence[int] | None = None,
    chunk_rows: int = 16384,
    progress: Progress | None = None,
) -> ImportReport:
    """Load a reference-layout index directory into the store as ``model``."""
    directory = Path(directory)
    files = layer_files(directory)
    meta_json = _read_metadata(directory)
    listed = meta_json.get("layers")
    have = ", ".join(map(str, files))
    if layers is not None:
        missing = sorted(set(layers) - set(files))
        if missing:
            raise InputError(f"{directory} has no layer {missing[0]} (it has {have})")
        files = {x: files[x] for x in sorted(set(layers))}
    elif listed is not None:
        missing = [x for x in listed if x not in files]
        if missing:  # e.g. a copy that stopped early: refuse before anything is stored
            raise InputError(
                f"{directory} is incomplete: metadata.json lists layer {missing[0]} but "
                f"{directory / f'layer_{missing[0]}' / CACHE_FILE} is missing (found layers {have}); "
                "copy the missing files, or import only the present ones with --layers"
            )
    for path in files.values():
        check_layer_file(path)  # a truncated file fails here, not after other layers were written
    first_layer = next(iter(files))
    emb, meta = load_layer_file(files[first_layer])
    dim = int(emb.shape[1])
    declared = meta_json.get("hidden_dim")
    if declared is not None and int(declared) != dim:
        raise DimensionMismatch(f"metadata.json says hidden_dim {declared}, layer {first_layer} has {dim}")
    if hidden_size is not None and hidden_size != dim:
        raise DimensionMismatch(f"--hidden-size {hidden_size} given, the index has {dim} dimensions")
    info = _model_for_import(store, model, dim, num_layers, max(files), directory)
    info = store.ensure_layers(info, list(files))
    corpus = store.register_corpus(
        corpus_name or directory.resolve().name,
        content_hash="reference-index:" + _caption_hash(_unique(m.get("caption", "") for m in meta)),
        source=str(directory.resolve()),
    )
    report = ImportReport(model=info.name, corpus=corpus.name, hidden_size=dim)
    for layer, path in files.items():
        if layer != first_layer:
            emb, meta = load_layer_file(path)
            if int(emb.shape[1]) != dim:
                raise DimensionMismatch(f"layer {layer} has {emb.shape[1]} dimensions, layer {first_layer} has {dim}")
        report.layers[layer] = _import_layer(store, info, corpus, layer, emb, meta, chunk_rows, progress)
        del emb, meta
        store.analyze(info, [layer])  # planner statistics for the loaded leaf
    report.sentences = store.get_corpus(corpus.name).sentence_count
    return report


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _model_for_import(
    store: Store, name: str, dim: int, num_layers: int | None, top_layer: int, directory: Path
) -> ModelInfo:
    try:
        info = store.get_model(name)
    except UnknownModel:
        return store.register_model(
            name, hidden_size=dim, num_layers=num_layers or top_layer, architecture="imported",
            params={"imported_from": str(directory.resolve())},
        )
    if info.hidden_size != dim:
        raise ModelMismatch(f"model '{name}' has hidden size {info.hidden_size}, the index has {dim}")
    return info


def _import_layer(store, info, corpus, layer, emb, meta, chunk_rows, progress) -> dict:
    n = len(meta)
    try:
        captions = [str(m.get("caption", "")) for m in meta]
        tokens = [str(m.get("token_str", "")) for m in meta]
        token_ids = np.array([int(m.get("token_id", -1)) for m in meta], dtype=np.int32)
        positions = np.array([int(m["position"]) for m in meta], dtype=np.int32)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"layer {layer}: metadata rows need token_str, token_id, caption, position ({e!r})") from None
    uniq = _unique(captions)
    ids = store.add_sentences(corpus, uniq)
    sid_of = dict(zip(uniq, ids.tolist(), strict=True))
    sentence_id = np.array([sid_of[c] for c in captions], dtype=np.int64)
    vocab = {int(t): s for t, s in zip(token_ids.tolist(), tokens, strict=True) if t >= 0}
    store.add_tokens(info, list(vocab), list(vocab.values()))
    # keep the first row of each (sentence, position), minus rows already stored
    keys = np.empty(n, dtype=[("sentence_id", "<i8"), ("position", "<i4")])
    keys["sentence_id"], keys["position"] = sentence_id, positions
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(n, dtype=bool)
    keep[first] = True
    have = store.layer_keys(info, layer)
    if len(have):
        keep &= ~np.isin(keys, have)
    todo = np.flatnonzero(keep)
    span_memo: dict[tuple[str, str], tuple[int, int]] = {}
    spans_found = 0
    written = 0
    for lo in range(0, len(todo), chunk_rows):
        idx = todo[lo: lo + chunk_rows]
        cs = np.empty(len(idx), dtype=np.int32)
        ce = np.empty(len(idx), dtype=np.int32)
        ph = np.empty(len(idx), dtype=np.int64)
        for j, i in enumerate(idx.tolist()):
            key = (captions[i], tokens[i])
            span = span_memo.get(key)
            if span is None:
                span = span_memo[key] = find_span(*key)
            cs[j], ce[j] = span
            ph[j] = prefix_hash(captions[i], int(positions[i]))
        spans_found += int((cs >= 0).sum())
        vecs = emb[idx].float().numpy()  # one chunk leaves the memory map at a time
        if not np.isfinite(vecs).all():
            raise InputError(f"layer {layer} has NaN or infinite values near row {int(idx[0])}")
        written += store.write_embeddings(info, EmbeddingBatch(
            sentence_id[idx], positions[idx], token_ids[idx], cs, ce, ph, {layer: vecs},
        ))
        if progress is not None:
            progress(f"layer {layer}", min(lo + chunk_rows, len(todo)), len(todo))
    return {"rows": n, "written": written, "skipped": n - written, "spans_found": spans_found}


# --------------------------------------------------------------------------
# export


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
    all_layers = sorted(set(done) | set(_existing_layers(directory)))
    (directory / "metadata.json").write_text(json.dumps(
        {"layers": all_layers, "hidden_dim": info.hidden_size, "model": info.name,
         "exported_by": "latentlens-db"}, indent=2))
    return {"model": info.name, "directory": str(directory), "hidden_dim": info.hidden_size,
            "layers": {str(k): v for k, v in done.items()}}


def _existing_layers(directory: Path) -> list[int]:
    try:
        return list(layer_files(directory))
    except InputError:
        return []


def _sentences(store: Store, ids: np.ndarray, chunk: int = 50_000) -> dict[int, str]:
    out: dict[int, str] = {}
    for lo in range(0, len(ids), chunk):
        out.update(store.sentences(ids[lo: lo + chunk].tolist()))
    return out


__all__ = ["ImportReport", "export_index", "find_span", "import_index", "layer_files", "load_layer_file", "prefix_hash"]
