"""Load a reference-layout index into the store, recorded as a run like an ingest.

Import streams each layer: the ``.pt`` stays memory-mapped, and its rows are
normalised and written in chunks, so memory is one chunk plus the row
metadata, not a multiple of the layer. Before anything is written, every layer
``metadata.json`` lists (or ``layers`` chose) must have its file, and each file
must be non-empty with a readable zip directory, so a missing or truncated
layer imports nothing.

An import is an ``ingest_run`` of kind 'import' (origin, content hash, layers
in its params; rows per layer and how tokens were placed in its counters), so
``llens runs``, ``llens models``, provenance and the web app show it and its
corpus as they show an ingest. Each chunk commits with the run's progress; a
killed import leaves a 'running' run whose process is gone, and running the
same import again takes it over and skips the rows already stored.

With ``source`` the rows become what ``llens ingest`` of that checkpoint would
have written: each caption is re-tokenized with its tokenizer (spans and
prefix hashes as ingest computes them, see :mod:`latentlens.interop.placement`),
the model is registered with its vocabulary, tokenizer and architecture, and
``token_quota`` counts the imported contexts, so a later ``llens ingest`` onto
the model applies the per-token cap and prefix dedup to them as to its own.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from psycopg.types.json import Jsonb

from latentlens.errors import DimensionMismatch, InputError, ModelMismatch, UnknownModel
from latentlens.interop.hub import HubIndex, fetch_hub_index
from latentlens.interop.placement import Placer
from latentlens.interop.reference import (
    CACHE_FILE,
    check_layer_file,
    layer_files,
    load_layer_file,
    read_metadata,
    require,
)
from latentlens.interop.source import SourceModel, resolve_source
from latentlens.store import CorpusInfo, EmbeddingBatch, ModelInfo, RunInfo, Store

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Echo = Callable[[str], None]


@dataclass
class ImportReport:
    model: str
    corpus: str
    hidden_size: int
    layers: dict[int, dict] = field(default_factory=dict)  # layer -> rows, written, skipped, spans
    sentences: int = 0
    origin: dict = field(default_factory=dict)  # imported_from (+ hub_repo, hub_revision, hub_commit)
    source: str | None = None  # the loadable checkpoint recorded for the model, if any
    run: int | None = None  # its ingest_run id (kind 'import')
    resumed: bool = False
    already_done: bool = False
    placement: dict = field(default_factory=dict)  # rows placed by tokenizer / by text / unplaced

    def to_dict(self) -> dict:
        return {"model": self.model, "corpus": self.corpus, "hidden_size": self.hidden_size,
                "sentences": self.sentences, "layers": {str(k): v for k, v in self.layers.items()},
                "origin": self.origin, "source": self.source, "run": self.run, "resumed": self.resumed,
                "already_done": self.already_done, "placement": self.placement}


def caption_hash(captions: Sequence[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _unique(items: Any) -> list:
    return list(dict.fromkeys(items))


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
    text: Any = None,
    echo: Echo | None = None,
) -> ImportReport:
    """Load a reference-layout index directory into the store as ``model``.

    ``source`` (a hub id, local model dir or ``.gguf``, or a resolved
    :class:`SourceModel`) is recorded as the checkpoint that queries of the model
    load, and its tokenizer places the tokens (``text``: an already loaded
    :class:`latentlens.models.base.TextSide`, e.g. in tests); unless
    ``num_layers`` is given its config is read for the number of layers and must
    have the index's hidden size. ``hub`` (what :func:`fetch_hub_index` returned
    for ``directory``) records where the files came from: the corpus is named
    after the repository and the run, corpus and a new model record keep its id
    and resolved commit. A finished import of the same files returns at once.
    """
    require("torch", "importing an index (its layer files are PyTorch files)")
    directory = Path(directory)
    if isinstance(source, str):
        source = resolve_source(source, read_config=num_layers is None)
    if source is not None and num_layers is None:
        num_layers = source.num_layers
    again = "copy it again" if hub is None else (
        f"it came from {hub.repo_id} at commit {hub.commit}: fetch it afresh with --force-download")
    files = layer_files(directory)
    meta_json = read_metadata(directory)
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
    if source is not None and text is None:
        from latentlens.models.loading import load_text_side

        text = load_text_side(source.source, gguf_file=source.gguf_file)
    origin = hub.provenance() if hub is not None else {"imported_from": str(directory.resolve())}
    info = _model_for_import(store, model, dim, num_layers, max(files), origin, source, text)
    info = store.ensure_layers(info, list(files))
    captions = _unique(str(m.get("caption", "")) for m in meta)
    content_hash = "reference-index:" + caption_hash(captions)
    corpus = store.register_corpus(
        corpus_name or (hub.repo_id if hub is not None else directory.resolve().name),
        content_hash=content_hash, source=origin["imported_from"],
        params={k: v for k, v in origin.items() if k != "imported_from"},
    )
    report = ImportReport(model=info.name, corpus=corpus.name, hidden_size=dim, origin=origin,
                          source=(info.params or {}).get("source"))
    params = {"origin": origin, "layers": list(files), "content_hash": content_hash,
              "placement": "text" if text is None else "tokenizer"}
    run, report.resumed = _claim(store, info, corpus, params, len(captions))
    report.run = run.id
    if run.status == "done":
        report.already_done = True
        report.sentences = corpus.sentence_count
        return report
    if report.resumed and echo is not None:
        echo(f"Resuming import run {run.id} ({run.rows_written:,} rows already stored).")
    if text is not None:
        store.set_vocabulary(info, text.vocabulary())  # the whole vocabulary, as ingest stores it
    placer = Placer(text)
    counters: dict[str, Any] = {"layers": {}, "placement": placer.counts, "source": report.source}
    try:
        for layer, path in files.items():
            if layer != first_layer:
                emb, meta = load_layer_file(path)
                if int(emb.shape[1]) != dim:
                    raise DimensionMismatch(f"layer {layer} has {emb.shape[1]} dimensions, "
                                            f"layer {first_layer} has {dim}")
            report.layers[layer] = _import_layer(store, info, corpus, run, layer, emb, meta, chunk_rows, progress,
                                                 placer, counters, counts_rows=layer == first_layer,
                                                 replace=text is not None)
            del emb, meta
            store.count_quota(info, layer)  # a later ingest's per-token cap counts these contexts
            store.analyze(info, [layer])  # planner statistics for the loaded leaf
        report.sentences = store.get_corpus(corpus.name).sentence_count
        with store.transaction() as conn:
            Store.advance_run(conn, run.id, resume_ordinal=report.sentences, sentences=report.sentences
                              - run.sentences_done, tokens=0, rows=0, counters=counters)
        store.finish_run(run.id, "done")
    except KeyboardInterrupt:
        store.finish_run(run.id, "interrupted", "interrupted by the user")
        raise
    except BaseException as e:
        try:
            store.finish_run(run.id, "failed", str(e).splitlines()[0] if str(e) else type(e).__name__)
        except Exception:  # noqa: BLE001 - the database is gone: keep the cause
            raise e from None
        raise
    report.placement = dict(placer.counts)
    refreshed = store.refresh_recall(info, list(files))  # an indexed leaf that grew is measured again
    if refreshed and echo is not None:
        echo(f"Measured the recall of the ANN indexes of layers {','.join(map(str, refreshed))} again "
             "(their leaves grew).")
    return report


def _claim(store: Store, info: ModelInfo, corpus: CorpusInfo, params: dict, total: int) -> tuple[RunInfo, bool]:
    """The run of this import: a new one, or the unfinished (or finished) one of the same files."""
    from latentlens.ingest import _run_is_live

    host, pid = socket.gethostname(), os.getpid()
    found = store.find_runs(info, corpus, params=params, shard=0, num_shards=1, kind="import")
    run = found[0] if found else None
    if run is None:
        return store.create_run(info, corpus, layers=params["layers"], params=params, sentences_total=total,
                                hostname=host, pid=pid, kind="import"), False
    if run.status == "done":
        return run, True
    if _run_is_live(run):
        raise InputError(f"import run {run.id} of the same files into '{info.name}' is still running "
                         f"(pid {run.pid} on {run.hostname}); wait for it or stop it first")
    if not store.claim_run(run, hostname=host, pid=pid, sentences_total=total):
        raise InputError(f"import run {run.id} was just taken over by another process")
    return store.get_run(run.id), True


def _model_for_import(
    store: Store, name: str, dim: int, num_layers: int | None, top_layer: int, origin: dict,
    source: SourceModel | None, text: Any,
) -> ModelInfo:
    loadable = source.params() if source is not None else {}
    tok: dict[str, Any] = {}  # what llens ingest registers of the checkpoint's tokenizer and config
    if text is not None:
        tok = {"architecture": text.architecture or "imported", "tokenizer_class": type(text.tokenizer).__name__,
               "bos_token_id": text.bos_token_id}
    try:
        info = store.get_model(name)
    except UnknownModel:
        return store.register_model(
            name, hidden_size=dim, num_layers=num_layers or max(top_layer, 1),
            **{"architecture": "imported", **tok}, params={**origin, **loadable},
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
    if text is not None and info.tokenizer_class and info.bos_token_id != tok["bos_token_id"]:
        raise ModelMismatch(f"model '{name}' is stored with another tokenizer (BOS differs): "
                            "import under another --model name")
    guessed = info.architecture == "imported" and not theirs.get("source")  # num_layers was the top layer
    stored_top = max(info.layer_numbers, default=0)
    if num_layers is not None and info.num_layers != num_layers and not (guessed and num_layers >= stored_top):
        raise ModelMismatch(f"model '{name}' is registered with {info.num_layers} layers, "
                            f"{source.given} has {num_layers}: import under another --model name")
    if not theirs.get("source"):  # imported before without one: record it now
        with store.transaction() as conn:
            conn.execute("UPDATE model SET params = coalesce(params, '{}'::jsonb) || %s, "
                         "num_layers = coalesce(%s, num_layers), architecture = coalesce(%s, architecture), "
                         "tokenizer_class = coalesce(%s, tokenizer_class), "
                         "bos_token_id = coalesce(%s, bos_token_id) WHERE id = %s",
                         (Jsonb(loadable), num_layers if guessed else None, tok.get("architecture"),
                          tok.get("tokenizer_class"), tok.get("bos_token_id"), info.id))
        info = store.get_model(name)
    return info


def _import_layer(store: Store, info: ModelInfo, corpus: CorpusInfo, run: RunInfo, layer: int, emb: Any,
                  meta: list[dict], chunk_rows: int, progress: Progress | None, placer: Placer,
                  counters: dict, counts_rows: bool, replace: bool = False) -> dict:
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
    replaced = 0
    if replace and len(have):  # rows stored without the tokenizer (or by a killed run): place them with it
        again = np.flatnonzero(np.isin(keys, have))
        again = again[np.isin(again, first)]
        for lo in range(0, len(again), chunk_rows):
            idx = again[lo: lo + chunk_rows]
            cs, ce, ph = placer.place([captions[i] for i in idx.tolist()], positions[idx], token_ids[idx],
                                      [tokens[i] for i in idx.tolist()])
            replaced += store.set_placement(info, layer, sentence_id[idx], positions[idx], cs, ce, ph)
    placer.prepare([captions[i] for i in todo], positions[todo], [tokens[i] for i in todo])
    out = {"rows": n, "written": 0, "skipped": n - len(todo), "spans_found": 0, "unplaced": 0, "placed_again": replaced}
    counters["layers"][str(layer)] = out
    if not len(todo):
        return out
    for lo in range(0, len(todo), chunk_rows):
        idx = todo[lo: lo + chunk_rows]
        cs, ce, ph = placer.place([captions[i] for i in idx.tolist()], positions[idx], token_ids[idx],
                                  [tokens[i] for i in idx.tolist()])
        vecs = emb[idx].float().numpy()  # one chunk leaves the memory map at a time
        if not np.isfinite(vecs).all():
            raise InputError(f"layer {layer} has NaN or infinite values near row {int(idx[0])}")
        found = int((cs >= 0).sum())

        def on_commit(conn: Any, written: int, found: int = found, chunk: int = len(idx)) -> None:
            out["written"] += written
            out["skipped"] += chunk - written
            out["spans_found"] += found
            out["unplaced"] += chunk - found
            # rows_written counts contexts, as an ingest's does: those of the first layer imported
            Store.advance_run(conn, run.id, resume_ordinal=0, sentences=0, tokens=0,
                              rows=written if counts_rows else 0, counters=counters)

        store.write_embeddings(info, EmbeddingBatch(
            sentence_id[idx], positions[idx], token_ids[idx], cs, ce, ph, {layer: vecs},
        ), on_commit=on_commit)
        if progress is not None:
            progress(f"layer {layer}", min(lo + chunk_rows, len(todo)), len(todo))
    return out


__all__ = ["ImportReport", "Progress", "caption_hash", "import_hub_index", "import_index"]
