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

The reference's pre-built indices live on the Hugging Face Hub in the same
layout (``McGill-NLP/contextual_embeddings-qwen2.5-vl-7b``, ...): a hub id is
fetched with ``huggingface_hub.snapshot_download`` (only ``metadata.json`` and
the chosen layers' files, into its cache, resumable, with its token and
``HF_HUB_OFFLINE`` handling), then imported from the cached snapshot like a
directory; the model record keeps the repository and resolved commit.

``source`` ties imported rows to a loadable checkpoint: it is recorded as the
model's ``params["source"]`` (what ``llens ingest`` records), so text and image
queries of the model load that checkpoint, and its config gives the number of
layers (which an image query checks against the VLM).

Export writes the same layout from the store (one layer in memory at a time,
float16 as stored), loadable by ``ContextualIndex.from_directory``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from psycopg.types.json import Jsonb

from latentlens.errors import (
    MODELS_EXTRA,
    DimensionMismatch,
    InputError,
    LatentLensError,
    ModelMismatch,
    UnknownModel,
)
from latentlens.store import EmbeddingBatch, ModelInfo, Store
from latentlens.store.types import KEY_DTYPE
from latentlens.torchfile import load_weights_only

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
    origin: dict = field(default_factory=dict)  # imported_from (+ hub_repo, hub_revision, hub_commit)
    source: str | None = None  # the loadable checkpoint recorded for the model, if any

    def to_dict(self) -> dict:
        return {"model": self.model, "corpus": self.corpus, "hidden_size": self.hidden_size,
                "sentences": self.sentences, "layers": {str(k): v for k, v in self.layers.items()},
                "origin": self.origin, "source": self.source}


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
# where an index comes from: a directory or a hub repository


# owner/name as the Hub spells them: letters, digits, '-', '_', '.'; no '--' or '..'; <= 96 each
_HUB_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")


def locate_index(spec: str) -> tuple[str, str]:
    """("dir", path) for an existing directory; ("hub", repo id) for ``owner/name`` that is
    no path here; anything else is an InputError naming both forms."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{spec} is a file: give an index directory (metadata.json and "
                             f"layer_N/{CACHE_FILE}) or a hub repository id (owner/name)")
        return "dir", str(p)
    if HUB_ID.match(spec) and "--" not in spec and ".." not in spec:
        return "hub", spec
    raise InputError(f"{spec} is neither a directory here nor a hub repository id (owner/name, "
                     "e.g. McGill-NLP/contextual_embeddings-qwen2.5-vl-7b)")


@dataclass
class HubIndex:
    """A reference index fetched from the Hub: the local snapshot of one commit."""

    repo_id: str
    revision: str  # as asked for: a branch, tag or commit ("main" by default)
    commit: str  # what it resolved to
    path: Path  # the snapshot folder in the huggingface_hub cache
    layers: list[int]  # the layers whose files were fetched

    @property
    def uri(self) -> str:
        return f"hf://{self.repo_id}@{self.commit}"

    def provenance(self) -> dict:
        return {"imported_from": self.uri, "hub_repo": self.repo_id, "hub_revision": self.revision,
                "hub_commit": self.commit}


def _require(module: str, why: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"{why} needs '{module}': {MODELS_EXTRA} (see the README)")


def hub_layer_pattern(layer: int) -> str:
    return f"layer_{layer}/{CACHE_FILE}"


def fetch_hub_index(
    repo_id: str,
    *,
    layers: Sequence[int] | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    endpoint: str | None = None,
    progress: bool = True,
) -> HubIndex:
    """Fetch ``metadata.json`` and the chosen layers' files of a reference index on the Hub.

    First ``metadata.json`` alone, which resolves ``revision`` to a commit and caches the
    repository's file list; the chosen layers (default: those metadata.json lists, else
    every layer_N file) are checked against that list before anything large is fetched,
    then downloaded at that same commit. huggingface_hub does the rest: its cache
    (``HF_HOME`` / ``HF_HUB_CACHE``, or ``cache_dir``), resuming an interrupted file, the
    token (``HF_TOKEN`` or ``hf auth login``), ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``
    (then only the cache is read). Every failure is one InputError or LatentLensError line.
    """
    _require("torch", "importing an index (its layer files are PyTorch files)")  # before gigabytes arrive
    _require("huggingface_hub", "importing an index from the hub")
    from huggingface_hub import snapshot_download

    kw: dict[str, Any] = {"cache_dir": str(cache_dir) if cache_dir is not None else None, "endpoint": endpoint}
    asked = revision or "main"
    wanted: list[str] = ["metadata.json"]
    first: Path | None = None
    try:
        with _hub_bars(False):
            first = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["metadata.json"],
                                           force_download=force_download, **kw))
        commit = first.name  # snapshots/<commit>
        in_repo = _hub_layer_files(repo_id, commit, cache_dir)  # None: not known (offline, no listing cached)
        listed = _read_metadata(first).get("layers") if first.is_dir() else None
        have = ", ".join(map(str, sorted(in_repo))) if in_repo else "none"
        if layers is not None:
            chosen = sorted(set(layers))
            missing = [x for x in chosen if in_repo is not None and x not in in_repo]
            if missing:
                raise InputError(f"{repo_id} has no layer {missing[0]} at {asked} (its layers: {have})")
        elif listed is not None:
            chosen = listed
            missing = [x for x in chosen if in_repo is not None and x not in in_repo]
            if missing:
                raise InputError(f"{repo_id} is incomplete: its metadata.json lists layer {missing[0]} but it has no "
                                 f"{hub_layer_pattern(missing[0])} (its layers: {have}); choose --layers")
        elif in_repo:
            chosen = sorted(in_repo)
        else:
            raise InputError(f"{repo_id} has no metadata.json and no layer_N/{CACHE_FILE} files at {asked}"
                             + ("" if in_repo is not None else " in the cache: choose --layers"))
        wanted += [hub_layer_pattern(x) for x in chosen]
        with _hub_bars(progress):
            path = Path(snapshot_download(repo_id, revision=commit, allow_patterns=wanted,
                                          force_download=force_download, **kw))
    except LatentLensError:
        raise
    except Exception as e:
        raise _hub_error(e, repo_id, asked, cache_dir, wanted, first) from None
    return HubIndex(repo_id=repo_id, revision=asked, commit=commit, path=path, layers=chosen)


def _hub_layer_files(repo_id: str, commit: str, cache_dir) -> set[int] | None:
    """Layers with a layer_N/embeddings_cache.pt in the repository's cached file list, or None."""
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:  # an older huggingface_hub: no check before the download
        return None
    try:
        files = get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)
    except Exception:  # CachedRepoTreeNotFoundError: offline, never listed
        return None
    out = set()
    for f in files:
        parts = f.path.split("/")
        m = LAYER_DIR.match(parts[0])
        if m and parts[1:] == [CACHE_FILE]:
            out.add(int(m.group(1)))
    return out


class _hub_bars:
    """huggingface_hub's progress bars (bytes, files) on or off for one call."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        self.was_off = are_progress_bars_disabled()
        if not self.on:
            disable_progress_bars()

    def __exit__(self, *exc):
        from huggingface_hub.utils import enable_progress_bars

        if not self.on and not self.was_off:
            enable_progress_bars()


def _hub_error(e: Exception, repo_id: str, revision: str, cache_dir, wanted: list[str],
               snapshot: Path | None) -> LatentLensError:
    """One line for what snapshot_download raised (``snapshot``: the commit's cached folder, once known)."""
    from huggingface_hub import constants
    from huggingface_hub import errors as he

    cache = str(cache_dir or constants.HF_HUB_CACHE)
    offline = bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())
    login = "log in with `hf auth login` or set HF_TOKEN"

    from latentlens.db import first_line

    if isinstance(e, he.GatedRepoError):
        return InputError(f"{repo_id} is gated on the hub: accept its conditions on its page, then {login}")
    if isinstance(e, he.RevisionNotFoundError):
        return InputError(f"{repo_id} has no revision '{revision}' on the hub")
    if isinstance(e, he.RepositoryNotFoundError):
        return InputError(f"no repository {repo_id} on the hub, and no directory of that name here "
                          f"(a private repository needs a login: {login})")
    if isinstance(e, he.LocalEntryNotFoundError):  # offline or unreachable, and not (all) in the cache
        snap = getattr(e, "snapshot_path", None) or snapshot  # IncompleteSnapshotError knows it
        if snap is not None and Path(snap).is_dir():
            gone = [w for w in wanted if not (Path(snap) / w).exists()] or wanted
            why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
            more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
            return InputError(f"{why} and {repo_id} (revision {revision}) is only partly in the Hugging Face cache "
                              f"({cache}): {gone[0]}{more} missing; "
                              + ("unset HF_HUB_OFFLINE to download them" if offline else "try again when online"))
        if offline:
            return InputError(f"HF_HUB_OFFLINE is set and {repo_id} (revision {revision}) is not in the Hugging Face "
                              f"cache ({cache}): unset HF_HUB_OFFLINE to download it")
        cause = e.__cause__ or e.__context__
        return LatentLensError(f"cannot reach the hub to fetch {repo_id} ({first_line(cause or e)}) and it is not "
                               f"in the Hugging Face cache ({cache})")
    if isinstance(e, he.HfHubHTTPError):
        return LatentLensError(f"the hub refused {repo_id}: {first_line(e)}")
    if isinstance(e, OSError):  # disk full, a size check that failed
        return LatentLensError(f"downloading {repo_id} failed: {first_line(e)}")
    if isinstance(e, ValueError):
        return InputError(f"cannot fetch {repo_id}: {first_line(e)}")
    raise e


def import_hub_index(store: Store, repo_id: str, model: str, *, layers: Sequence[int] | None = None,
                     revision: str | None = None, cache_dir: str | Path | None = None,
                     force_download: bool = False, endpoint: str | None = None, progress: Progress | None = None,
                     download_progress: bool = True, **kw: Any) -> ImportReport:
    """fetch_hub_index + import_index (``kw``: its other arguments, e.g. ``source``)."""
    source = kw.pop("source", None)
    if isinstance(source, str):  # read its config before the download: a wrong source fails fast
        source = resolve_source(source, read_config=kw.get("num_layers") is None)
    hub = fetch_hub_index(repo_id, layers=layers, revision=revision, cache_dir=cache_dir,
                          force_download=force_download, endpoint=endpoint, progress=download_progress)
    return import_index(store, hub.path, model, layers=hub.layers, progress=progress, source=source, hub=hub, **kw)


# --------------------------------------------------------------------------
# the checkpoint an index was built from


@dataclass
class SourceModel:
    """A loadable checkpoint, as ``llens ingest`` records it (params source, gguf_file)."""

    given: str
    source: str
    gguf_file: str | None = None
    hidden_size: int | None = None  # from its config (None: not read)
    num_layers: int | None = None

    def params(self) -> dict:
        out = {"source": self.source}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        return out

    @property
    def default_name(self) -> str:
        """The store name ``llens ingest`` gives this checkpoint."""
        from latentlens.models.loading import default_name

        return default_name(self.source, self.gguf_file)


def resolve_source(source: str, *, read_config: bool = True) -> SourceModel:
    """A hub id, local model dir or ``.gguf`` file; with ``read_config``, its hidden size and
    number of layers (of the language model, for a VLM) from its config."""
    from latentlens.models.loading import _split_source

    src, gguf = _split_source(source, None)
    out = SourceModel(given=source, source=src, gguf_file=gguf)
    if not read_config:
        return out
    _require("transformers", "reading --source's config")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(src, **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:
        msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise InputError(f"cannot read the config of --source {source} ({msg}): check the name, "
                         "or give --num-layers to import without reading it") from None
    text = cfg
    try:
        from latentlens.models.adapters import adapter_for_config

        text = adapter_for_config(cfg).text_config(cfg)
    except Exception:  # an architecture without an adapter yet: transformers' own answer
        text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    hidden, n = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise InputError(f"the config of --source {source} gives no number of layers: give --num-layers")
    out.hidden_size = int(hidden) if isinstance(hidden, int) else None
    out.num_layers = n
    return out


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
    source: str | SourceModel | None = None,
    hub: HubIndex | None = None,
) -> ImportReport:
    """Load a reference-layout index directory into the store as ``model``.

    ``source`` (a hub id, local model dir or ``.gguf``, or a resolved
    :class:`SourceModel`) is recorded as the checkpoint that queries of the model
    load; unless ``num_layers`` is given its config is read for the number of
    layers and must have the index's hidden size. ``hub`` (what
    :func:`fetch_hub_index` returned for ``directory``) records where the files
    came from: the corpus is named after the repository and both the corpus and
    a new model record keep its id and resolved commit.
    """
    _require("torch", "importing an index (its layer files are PyTorch files)")
    directory = Path(directory)
    if isinstance(source, str):
        source = resolve_source(source, read_config=num_layers is None)
    if source is not None and num_layers is None:
        num_layers = source.num_layers
    again = "copy it again" if hub is None else (
        f"it came from {hub.repo_id} at commit {hub.commit}: fetch it afresh with --force-download")
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
        check_layer_file(path, again)  # a truncated file fails here, not after other layers were written
    first_layer = next(iter(files))
    emb, meta = load_layer_file(files[first_layer])
    dim = int(emb.shape[1])
    declared = meta_json.get("hidden_dim")
    if declared is not None and int(declared) != dim:
        raise DimensionMismatch(f"metadata.json says hidden_dim {declared}, layer {first_layer} has {dim}")
    if hidden_size is not None and hidden_size != dim:
        raise DimensionMismatch(f"--hidden-size {hidden_size} given, the index has {dim} dimensions")
    if source is not None and source.hidden_size is not None and source.hidden_size != dim:
        raise DimensionMismatch(f"--source {source.given} has hidden size {source.hidden_size}, "
                                f"the index has {dim} dimensions: it was built from another model")
    origin = hub.provenance() if hub is not None else {"imported_from": str(directory.resolve())}
    info = _model_for_import(store, model, dim, num_layers, max(files), origin, source)
    info = store.ensure_layers(info, list(files))
    corpus = store.register_corpus(
        corpus_name or (hub.repo_id if hub is not None else directory.resolve().name),
        content_hash="reference-index:" + _caption_hash(_unique(m.get("caption", "") for m in meta)),
        source=origin["imported_from"],
        params={k: v for k, v in origin.items() if k != "imported_from"},
    )
    report = ImportReport(model=info.name, corpus=corpus.name, hidden_size=dim, origin=origin,
                          source=(info.params or {}).get("source"))
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
    store: Store, name: str, dim: int, num_layers: int | None, top_layer: int, origin: dict,
    source: SourceModel | None,
) -> ModelInfo:
    loadable = source.params() if source is not None else {}
    try:
        info = store.get_model(name)
    except UnknownModel:
        return store.register_model(
            name, hidden_size=dim, num_layers=num_layers or max(top_layer, 1), architecture="imported",
            params={**origin, **loadable},
        )
    if info.hidden_size != dim:
        raise ModelMismatch(f"model '{name}' has hidden size {info.hidden_size}, the index has {dim}")
    if source is None:
        return info
    theirs = info.params or {}
    if theirs.get("source") and (theirs.get("source"), theirs.get("gguf_file")) != (
            source.source, source.gguf_file):
        raise ModelMismatch(f"model '{name}' is stored from {theirs['source']}, not from {source.source}: "
                            "import under another --model name")
    guessed = info.architecture == "imported" and not theirs.get("source")  # num_layers was the top layer
    stored_top = max(info.layer_numbers, default=0)
    if num_layers is not None and info.num_layers != num_layers and not (guessed and num_layers >= stored_top):
        raise ModelMismatch(f"model '{name}' is registered with {info.num_layers} layers, "
                            f"{source.given} has {num_layers}: import under another --model name")
    if not theirs.get("source"):  # imported before without one: record it now
        with store.transaction() as conn:
            conn.execute("UPDATE model SET params = coalesce(params, '{}'::jsonb) || %s, "
                         "num_layers = coalesce(%s, num_layers) WHERE id = %s",
                         (Jsonb(loadable), num_layers if guessed else None, info.id))
        info = store.get_model(name)
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


__all__ = [
    "HubIndex", "ImportReport", "SourceModel", "export_index", "fetch_hub_index", "find_span", "import_hub_index",
    "import_index", "layer_files", "load_layer_file", "locate_index", "prefix_hash", "resolve_source",
]
