"""Run a language model over a corpus and store its contextual token embeddings.

What is stored (the reference method, made exact and resumable):

* for each sentence, the tokenizer's normal encoding is fed (a BOS only if
  the tokenizer adds one; see latentlens.models.base); ``position`` is the
  index as fed, positions below ``skip_positions`` (default 2) are skipped
  and a BOS is never stored;
* prefix deduplication: in a causal LM equal token prefixes give equal
  hidden states, so each prefix (hashed with blake2b-64 over its int32 ids,
  ``prefix_hash`` below) is stored once per model, at its first occurrence
  in corpus order; prefixes already stored for the model (by any run) are
  skipped too;
* at most ``max_contexts_per_token`` contexts per token id, first come first
  served in corpus order, decided once for all layers and enforced by the
  store's ``token_quota`` across runs and concurrent writers;
* one row per kept context and layer, L2-normalised float32 -> halfvec.

How it runs: sentences are tokenized and deduplicated up front (numpy, in
corpus order), then processed in windows of ``window_batches`` batches,
sorted by length within a window to cut padding. Forward threads run the
model (two windows at once on a CPU, one torch thread each: forward_streams),
the main thread hands their rows over in corpus order, and a writer thread
with its own connection writes chunks of rows through a bounded queue. Each chunk commits together with the
run's progress (``resume_ordinal``), so a killed run resumes exactly: every
sentence below ``resume_ordinal`` is covered by committed rows, nothing
above it is. Shards (``--shard i/n``) split sentences by a hash of their
first stored prefix, so sentences that could share a stored prefix always
land in the same shard and dedup stays exact across concurrent shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg

from latentlens.corpus import Corpus
from latentlens.errors import InputError, LatentLensError, ModelMismatch, UnknownModel
from latentlens.store import CorpusInfo, EmbeddingBatch, ModelInfo, RunInfo, Store
from latentlens.store.types import check_layer_range

DEFAULT_SKIP_POSITIONS = 2
DEFAULT_MAX_CONTEXTS = 50
STALE_HEARTBEAT_S = 600
Echo = Callable[[str], None]


# --------------------------------------------------------------------------
# small pure helpers (tested on their own)


def default_layers(num_layers: int) -> list[int]:
    """The reference's grid: 1, 2, 4, 8, 16, 24 (those below n), n-2, n-1."""
    base = [x for x in (1, 2, 4, 8, 16, 24) if x < num_layers]
    top = [x for x in (num_layers - 2, num_layers - 1) if x >= 0]
    return sorted(set(base + top))


def resolve_layers(spec: str | Sequence[int] | None, num_layers: int, model: str = "model") -> list[int]:
    """None -> default_layers; 'all' -> 0..n; '0,3,7' or a list -> checked, sorted, unique."""
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        return default_layers(num_layers)
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(range(num_layers + 1))
        try:
            spec = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise InputError(f"--layers expects 'all' or comma-separated integers, got {spec!r}") from None
    return check_layer_range(spec, num_layers, model)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'1/4' -> (1, 4); None -> (0, 1)."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"--shard expects i/n (e.g. 0/2), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def prefix_hashes(token_ids: np.ndarray) -> np.ndarray:
    """int64 hash of every prefix: h[p] = blake2b-64 of token_ids[:p+1] as little-endian int32."""
    data = np.asarray(token_ids, dtype="<i4").tobytes()
    h = hashlib.blake2b(digest_size=8)
    out = bytearray()
    for i in range(0, len(data), 4):
        h.update(data[i: i + 4])
        out += h.copy().digest()
    return np.frombuffer(bytes(out), dtype="<i8").astype(np.int64)


def shard_of(token_ids: np.ndarray, first_stored: int, num_shards: int) -> int:
    """Shard of a sentence: a hash of its shortest storable prefix (ids[:first_stored+1])."""
    if num_shards == 1:
        return 0
    key = np.asarray(token_ids[: first_stored + 1], dtype="<i4").tobytes()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % num_shards


def stored_dtype(info: ModelInfo | None) -> str | None:
    """The forward dtype of a model's stored rows (None: no rows yet)."""
    if info is None or info.row_count == 0:
        return None
    return (info.params or {}).get("dtype") or info.dtype or "float32"


def choose_dtype(requested: str, stored: str | None, device: str | None = None,
                 *, bf16_units: bool | None = None) -> str:
    """The forward dtype of an ingest: ``requested`` unless it is "auto"; for "auto", the
    dtype of the model's stored rows if it has some (rows of one name stay one dtype),
    else bfloat16 on a CPU with bfloat16 units and float32 elsewhere (auto_dtype)."""
    from latentlens.models.loading import AUTO, auto_dtype

    if requested != AUTO:
        return requested
    return stored or auto_dtype(device, bf16_units=bf16_units)


def dtype_for(database_url: str | None, name: str, requested: str, device: str | None = None) -> str:
    """choose_dtype for model ``name`` in the store at ``database_url`` (before loading it)."""
    from latentlens.models.loading import AUTO

    if requested != AUTO:
        return requested
    with Store.open(database_url) as store:
        try:
            info: ModelInfo | None = store.get_model(name)
        except UnknownModel:
            info = None
    return choose_dtype(requested, stored_dtype(info), device)


# --------------------------------------------------------------------------
# options and results


@dataclass
class IngestOptions:
    layers: str | Sequence[int] | None = None
    skip_positions: int = DEFAULT_SKIP_POSITIONS
    max_contexts_per_token: int | None = DEFAULT_MAX_CONTEXTS
    batch_size: int = 32
    max_length: int | None = None
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    build_index: bool = True
    #: ANN index builds at once, one leaf each on its own connection (see build_leaves)
    index_jobs: int = 2
    #: HNSW ef_construction of those builds (None: llens_build_index's 64). Lower builds faster
    #: and needs a higher ef_search for the same recall (each index's is measured, recorded)
    index_ef_construction: int | None = None
    window_batches: int = 8
    queue_chunks: int = 16
    #: windows computed at once, one torch thread each (None: 2 on a CPU, 1 on a GPU; see forward_streams)
    forward_streams: int | None = None
    progress: bool = True

    def run_params(self, layers: list[int], dtype: str) -> dict:
        """What identifies a run's output (batch size, device, progress don't)."""
        return {
            "layers": layers,
            "skip_positions": self.skip_positions,
            "max_contexts_per_token": self.max_contexts_per_token,
            "max_length": self.max_length,
            "limit": self.limit,
            "dtype": dtype,
        }


@dataclass
class IngestResult:
    run: RunInfo
    model: str
    corpus: str
    resumed: bool = False
    already_done: bool = False
    notices: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        r = self.run
        return {
            "run": r.id, "model": self.model, "corpus": self.corpus, "status": r.status,
            "shard": f"{r.shard}/{r.num_shards}", "layers": r.layers,
            "sentences_done": r.sentences_done, "sentences_total": r.sentences_total,
            "rows_written": r.rows_written, "tokens_seen": r.tokens_seen,
            "duration_s": round(r.duration_s, 1), "resumed": self.resumed,
            "already_done": self.already_done, "counters": r.counters,
        }


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# entry points


def ingest(
    lm: Any,
    corpus: Corpus,
    *,
    database_url: str | None = None,
    store: Store | None = None,
    corpus_name: str | None = None,
    options: IngestOptions | None = None,
    echo: Echo = _stderr,
) -> IngestResult:
    """Ingest ``corpus`` with the loaded LanguageModel ``lm`` (store name ``lm.name``).

    Finds and continues an unfinished run of the same model, corpus,
    parameters and shard; returns at once if such a run is already done.
    """
    opts = options or IngestOptions()
    own = store is None
    store = store or Store.open(database_url)
    try:
        layers = resolve_layers(opts.layers, lm.num_layers, lm.name)
        if opts.skip_positions < 0:
            raise InputError("--skip-positions must be >= 0")
        if opts.max_contexts_per_token is not None and opts.max_contexts_per_token < 1:
            raise InputError("--max-contexts-per-token must be >= 1")
        with contextlib.suppress(UnknownModel):  # imported without --source: not this checkpoint's rows
            store.get_model(lm.name).require_source()
        info = store.register_model(lm.name, **lm.store_registration())
        _check_same_model(info, lm, layers)
        info = store.ensure_layers(info, layers)
        store.set_vocabulary(info, lm.vocabulary())
        cinfo, sentence_ids = _register_corpus(store, corpus, corpus_name)
        params = opts.run_params(layers, lm.store_params().get("dtype") or "float32")
        shard, nshards = opts.shard
        runs = store.find_runs(info, cinfo, params=params, shard=shard, num_shards=nshards)
        run = runs[0] if runs else None
        if run is not None and run.status == "done":
            return IngestResult(run, info.name, cinfo.name, already_done=True)
        texts = corpus.texts[: opts.limit] if opts.limit else corpus.texts
        return _execute(store, lm, info, cinfo, run, texts, sentence_ids[: len(texts)], layers, params,
                        opts, echo, counters0={"lines": corpus.lines, "blank_lines": corpus.blank,
                                               "duplicate_lines": corpus.duplicates})
    finally:
        if own:
            store.close()


def resume(
    run_id: int,
    *,
    database_url: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    build_index: bool = True,
    progress: bool = True,
    echo: Echo = _stderr,
    lm: Any = None,
    index_jobs: int = 2,
    index_ef_construction: int | None = None,
) -> IngestResult:
    """Continue run ``run_id`` from the store alone (model source and sentences come from there)."""
    from latentlens.models import load_from_store

    with Store.open(database_url) as store:
        run = store.get_run(run_id)
        if run.kind == "import":
            origin = (run.params.get("origin") or {})
            where = origin.get("hub_repo") or origin.get("imported_from") or "INDEX"
            raise InputError(f"run {run_id} is an import: resume it with `llens import-index {where} "
                             f"--model {run.model}` (rows already stored are skipped)")
        info = store.get_model(run.model)
        cinfo = store.get_corpus(run.corpus)
        if run.status == "done":
            return IngestResult(run, info.name, cinfo.name, already_done=True)
        p = run.params
        opts = IngestOptions(
            layers=p["layers"], skip_positions=p["skip_positions"],
            max_contexts_per_token=p["max_contexts_per_token"], max_length=p["max_length"],
            limit=p["limit"], shard=(run.shard, run.num_shards), batch_size=batch_size,
            build_index=build_index, progress=progress, index_jobs=index_jobs,
            index_ef_construction=index_ef_construction,
        )
        if lm is None:
            lm = load_from_store(info, dtype=p.get("dtype") or "float32", device=device, lens_heads=False)
        ids, _ords, texts = store.corpus_sentences(cinfo)
        if opts.limit:
            ids, texts = ids[: opts.limit], texts[: opts.limit]
        return _execute(store, lm, info, cinfo, run, texts, ids, list(p["layers"]), dict(p), opts, echo,
                        counters0={})


# --------------------------------------------------------------------------
# internals


def _register_corpus(store: Store, corpus: Corpus, name: str | None) -> tuple[CorpusInfo, np.ndarray]:
    h = corpus.content_hash
    info = None if name else store.find_corpus_by_hash(h)
    if info is None:
        try:
            info = store.register_corpus(name or corpus.name, content_hash=h, source=corpus.source,
                                         params={"format": corpus.format, **corpus.params})
        except InputError:
            if name:
                raise
            raise InputError(
                f"a different corpus is already registered as '{corpus.name}': "
                "give this one a name with --corpus-name"
            ) from None
    if info.sentence_count == len(corpus):
        ids, ords = store.corpus_ids(info)  # ids and ordinals only: the texts are known
        if len(ids) == len(corpus) and np.array_equal(ords, np.arange(len(corpus))):
            return info, ids
    parts = []
    step = 50_000
    for lo in range(0, len(corpus), step):
        chunk = corpus.texts[lo: lo + step]
        parts.append(store.add_sentences(info, chunk, range(lo, lo + len(chunk))))
    return store.get_corpus(info.name), np.concatenate(parts)


def _check_same_model(info: ModelInfo, lm: Any, layers: list[int]) -> None:
    """Rows of one store name must come from one model, with the same layers for every context."""
    mine, theirs = lm.store_params(), info.params or {}
    if theirs.get("source") and (theirs.get("source"), theirs.get("gguf_file")) != (
            mine.get("source"), mine.get("gguf_file")):
        src = theirs["source"] + (f" ({theirs['gguf_file']})" if theirs.get("gguf_file") else "")
        raise ModelMismatch(
            f"model '{info.name}' is stored from {src}, not from {mine.get('source')}: "
            "use --name to store this one under another name"
        )
    if info.bos_token_id != lm.bos_token_id:
        raise ModelMismatch(f"model '{info.name}' is stored with another tokenizer (BOS differs): use --name")
    have = sorted(li.layer for li in info.layers if li.row_count > 0)
    if have and have != sorted(layers):
        raise ModelMismatch(
            f"model '{info.name}' already stores layers {','.join(map(str, have))}; every context "
            f"must have the same layers: ingest with --layers {','.join(map(str, have))} or use --name"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _run_is_live(run: RunInfo) -> bool:
    if run.status != "running":
        return False
    if run.hostname == socket.gethostname() and run.pid:
        return run.pid != os.getpid() and _pid_alive(run.pid)
    import datetime as dt

    age = dt.datetime.now(dt.timezone.utc) - run.heartbeat_at
    return age.total_seconds() < STALE_HEARTBEAT_S


@dataclass
class _Plan:
    """Every pending sentence of this shard, tokenized, with its kept (deduplicated) rows."""

    sent_ord: np.ndarray  # ordinal of each pending sentence
    sent_id: np.ndarray
    seqs: list[np.ndarray]
    lengths: np.ndarray
    truncated: np.ndarray  # bool per sentence
    # kept rows, in (sentence, position) order
    row_sent: np.ndarray  # index into the pending sentences
    row_pos: np.ndarray
    row_tok: np.ndarray
    row_span: np.ndarray
    row_hash: np.ndarray
    candidates: np.ndarray  # candidate positions per sentence (before dedup)
    total_in_shard: int
    # rows of each sentence already known to be over the per-token cap (not kept, not run)
    over_cap: np.ndarray | None = None
    # tokens of each sentence the forward needs: up to its last kept row (causal: nothing after it counts)
    run_lengths: np.ndarray | None = None


def _plan(lm: Any, texts: Sequence[str], sentence_ids: np.ndarray, opts: IngestOptions,
          start_ordinal: int, stored: np.ndarray,
          quota: tuple[np.ndarray, np.ndarray] | None = None) -> _Plan:
    """Tokenize, shard, deduplicate; with the cap, also drop the rows it refuses for sure.

    ``quota``: (token ids, contexts stored) from Store.token_quota when the run started.
    A row is refused at write time when its token has ``max_contexts_per_token``
    contexts stored; that count is at least the quota read here plus this run's rows
    planned before it (each of those is either granted, or refused because the token is
    full), so a row whose rank says over the cap is refused whatever else runs: it is
    counted as over_cap without being computed, and each sentence is run only up to its
    last kept row (SmolLM2 over 3,000 sentences of concepts.txt: 40% of the rows, 4.6%
    of the tokens). Which rows are stored does not change (tested)."""
    shard, nshards = opts.shard
    first = max(opts.skip_positions, lm.first_position)
    encs = lm.encode(texts, opts.max_length)
    in_shard = np.array([shard_of(e.token_ids, first, nshards) == shard for e in encs], dtype=bool)
    ords = np.arange(len(texts))
    pending = np.flatnonzero(in_shard & (ords >= start_ordinal))
    seqs = [encs[i].token_ids for i in pending]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    cand_n = np.maximum(lengths - first, 0)
    row_sent = np.repeat(np.arange(len(pending)), cand_n)
    if len(row_sent):
        offs = np.repeat(np.cumsum(cand_n) - cand_n, cand_n)
        row_pos = (np.arange(len(row_sent)) - offs + first).astype(np.int64)
        row_tok = np.concatenate([s[first:] for s in seqs])
        row_span = np.concatenate([encs[i].spans[first:] for i in pending]).astype(np.int32)
        row_hash = np.concatenate([prefix_hashes(s)[first:] for s in seqs])
    else:
        row_pos = row_tok = row_hash = np.zeros(0, dtype=np.int64)
        row_span = np.zeros((0, 2), dtype=np.int32)
    keep = np.zeros(len(row_hash), dtype=bool)
    if len(row_hash):
        _, first_idx = np.unique(row_hash, return_index=True)
        keep[first_idx] = True
        if len(stored):
            keep &= ~np.isin(row_hash, stored)
    over_cap = np.zeros(len(pending), dtype=np.int64)
    cap = opts.max_contexts_per_token
    if cap is not None and quota is not None and keep.any():
        idx = np.flatnonzero(keep)
        tok = row_tok[idx]
        order = np.argsort(tok, kind="stable")  # corpus order within each token
        st = tok[order]
        first_of = np.r_[0, np.flatnonzero(st[1:] != st[:-1]) + 1]
        sizes = np.diff(np.r_[first_of, len(st)])
        rank = np.empty(len(idx), dtype=np.int64)
        rank[order] = np.arange(len(st)) - np.repeat(first_of, sizes)
        q_tok, q_used = quota
        used = np.zeros(len(idx), dtype=np.int64)
        if len(q_tok):
            srt = np.argsort(q_tok)
            pos = np.clip(np.searchsorted(q_tok[srt], tok), 0, len(q_tok) - 1)
            hit = q_tok[srt][pos] == tok
            used[hit] = q_used[srt][pos[hit]]
        refused = idx[rank + used >= cap]
        keep[refused] = False
        over_cap = np.bincount(row_sent[refused], minlength=len(pending)).astype(np.int64)
    run_lengths = lengths.copy()
    if len(row_sent):
        kept_sent = row_sent[keep]
        last = np.full(len(pending), -1, dtype=np.int64)
        np.maximum.at(last, kept_sent, row_pos[keep])
        run_lengths = np.where(last >= 0, last + 1, 0)
    return _Plan(
        sent_ord=ords[pending], sent_id=sentence_ids[pending], seqs=seqs, lengths=lengths,
        truncated=np.array([encs[i].truncated for i in pending], dtype=bool),
        row_sent=row_sent[keep], row_pos=row_pos[keep], row_tok=row_tok[keep],
        row_span=row_span[keep], row_hash=row_hash[keep], candidates=cand_n,
        total_in_shard=int(in_shard.sum()), over_cap=over_cap, run_lengths=run_lengths,
    )


@dataclass
class _Chunk:
    batch: EmbeddingBatch
    resume_ordinal: int
    sentences: int
    tokens: int
    counters: dict


class _Writer(threading.Thread):
    """Writes chunks in order, each with its run progress, on its own connection."""

    def __init__(self, url: str, info: ModelInfo, run: RunInfo, cap: int | None, counters: dict,
                 on_progress: Callable[[_Chunk, int], None]):
        super().__init__(name="llens-writer", daemon=True)
        self.url, self.info, self.run_id, self.cap = url, info, run.id, cap
        self.counters = dict(counters)
        self.queue: queue.Queue[_Chunk | None] = queue.Queue()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.on_progress = on_progress

    def run(self) -> None:
        try:
            with Store.open(self.url, upgrade=False) as store:
                while not self.stop.is_set():
                    chunk = self.queue.get()
                    if chunk is None:
                        return
                    self._write(store, chunk)
        except psycopg.errors.UniqueViolation:
            self.error = ModelMismatch(
                f"another ingest wrote the same contexts of '{self.info.name}' at the same time "
                "(same model and corpus, other parameters): run them one after the other"
            )
            self.stop.set()
        except BaseException as e:  # handed to the main thread
            self.error = e
            self.stop.set()

    def _write(self, store: Store, chunk: _Chunk) -> None:
        totals = dict(self.counters)

        def on_commit(conn: Any, n: int) -> None:
            for k, v in chunk.counters.items():
                totals[k] = totals.get(k, 0) + v
            totals["over_cap"] = totals.get("over_cap", 0) + len(chunk.batch) - n
            Store.advance_run(conn, self.run_id, resume_ordinal=chunk.resume_ordinal,
                              sentences=chunk.sentences, tokens=chunk.tokens, rows=n, counters=totals)

        n = store.write_embeddings(self.info, chunk.batch, max_contexts_per_token=self.cap,
                                   on_commit=on_commit)
        self.counters = totals
        self.on_progress(chunk, n)


class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        self.t0 = time.monotonic()
        self.tokens = 0
        self.rows = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="sent", file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, chunk: _Chunk, n: int) -> None:
        self.tokens += chunk.tokens
        self.rows += n
        if self.bar is not None:
            dt = max(time.monotonic() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens / dt:,.0f} tok/s, {self.rows:,} rows", refresh=False)
            self.bar.update(chunk.sentences)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _execute(store: Store, lm: Any, info: ModelInfo, cinfo: CorpusInfo, run: RunInfo | None,
             texts: Sequence[str], sentence_ids: np.ndarray, layers: list[int], params: dict,
             opts: IngestOptions, echo: Echo, counters0: dict) -> IngestResult:
    host, pid = socket.gethostname(), os.getpid()
    shard, nshards = opts.shard
    resumed = run is not None
    if run is not None and _run_is_live(run):
        raise InputError(
            f"run {run.id} (same model, corpus, parameters and shard) is still running "
            f"(pid {run.pid} on {run.hostname}); wait for it or stop it first"
        )
    stored = store.prefix_hashes(info)
    quota = store.token_quota(info) if opts.max_contexts_per_token is not None else None
    if opts.progress and len(texts) >= 20_000:
        echo(f"Tokenizing and deduplicating {len(texts):,} sentences...")
    plan = _plan(lm, texts, sentence_ids, opts, run.resume_ordinal if run else 0, stored, quota)
    if run is None:
        run = store.create_run(info, cinfo, layers=layers, params=params, shard=shard, num_shards=nshards,
                               sentences_total=plan.total_in_shard, hostname=host, pid=pid)
        with store.transaction() as conn:
            Store.advance_run(conn, run.id, resume_ordinal=0, sentences=0, tokens=0, rows=0,
                              counters=counters0)
        run = store.get_run(run.id)
    elif not store.claim_run(run, hostname=host, pid=pid, sentences_total=plan.total_in_shard):
        raise InputError(f"run {run.id} was just taken over by another process")
    else:
        echo(f"Resuming run {run.id} at sentence {run.sentences_done:,} of {plan.total_in_shard:,}.")
    indexed: list[int] = []
    if opts.build_index:
        # the index is rebuilt at the end: inserting every row into HNSW first is wasted work
        indexed = [li.layer for li in store.get_model(info.name).layers if li.index_kind and li.layer in layers]
        if indexed:
            store.drop_index(info, indexed)
            echo(f"Dropped the ANN indexes of layers {','.join(map(str, indexed))} while loading; "
                 "they are rebuilt at the end (queries meanwhile use exact search).")
    progress = _Progress(opts.progress, plan.total_in_shard, run.sentences_done,
                         f"ingest {info.name}" + (f" [{shard}/{nshards}]" if nshards > 1 else ""))
    writer = _Writer(store.url, info, run, opts.max_contexts_per_token, run.counters, progress.update)
    writer.start()
    try:
        _compute(lm, plan, layers, opts, writer)
        writer.queue.put(None)
        while writer.is_alive():
            writer.join(0.2)
        if writer.error is not None:
            raise writer.error
        # exactly one shard of a sharded run sees every shard done: that one builds
        last_shard = store.finish_run(run.id, "done")
    except KeyboardInterrupt:
        _stop_writer(writer)
        store.finish_run(run.id, "interrupted", "interrupted by the user")
        _tell_stopped(echo, run, "was interrupted", indexed)
        raise
    except BaseException as e:
        _stop_writer(writer)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:
            store.finish_run(run.id, "failed", msg)
        except Exception:  # noqa: BLE001 - the database is gone: its heartbeat ages out; keep the cause
            raise e from None
        _tell_stopped(echo, run, "failed", indexed)
        raise
    finally:
        progress.close()
    result = IngestResult(store.get_run(run.id), info.name, cinfo.name, resumed=resumed)
    ann = opts.build_index and store.ann_supported()
    if ann and last_shard:
        # the build analyzes each leaf too (llens_build_index), before its swap
        result.notices.extend(_build_index(store, info, layers, result.run, opts.progress, echo,
                                           jobs=opts.index_jobs, ef_construction=opts.index_ef_construction))
    else:
        # planner statistics: without them the planner never picks the HNSW index
        store.analyze(info, layers)
        if not opts.build_index and ann:  # rows went into the indexes as they were: is their recall still true?
            grown = store.refresh_recall(info, layers)
            if grown:
                result.notices.append(f"Measured the recall of the ANN indexes of layers "
                                      f"{','.join(map(str, grown))} again (their leaves grew).")
        if opts.build_index:
            result.notices.append(
                "ANN index deferred: other shards are still running; the last shard to finish builds it."
                if ann else
                "ANN index skipped: this server's pgvector cannot build indexes on this CPU; queries use "
                "exact search (build later with `llens index build` on a capable server).")
    for n in result.notices:
        echo(n)
    return result


def _stop_writer(writer: _Writer) -> None:
    writer.stop.set()
    writer.queue.put(None)
    writer.join(60)


def _put(writer: _Writer, chunk: _Chunk, limit: int) -> None:
    """Bounded hand-off: wait while the writer is behind (backpressure), fail fast if it died."""
    while writer.queue.qsize() >= limit:
        if writer.error is not None or not writer.is_alive():
            break
        time.sleep(0.01)
    if writer.error is not None:
        raise writer.error
    if not writer.is_alive():
        raise LatentLensError("the database writer stopped unexpectedly")
    writer.queue.put(chunk)


def forward_streams(requested: int | None, device: Any, threads: int) -> tuple[int, int]:
    """(windows computed at once, torch threads each) for the ingest forward.

    Why: on a CPU, torch's intra-op threads wait for each other at every op (HF
    decoders run hundreds of small ops a batch) and stall whenever another process
    takes one of the cores; two windows at once on one thread each keep both cores
    busy (256 SmolLM2 sentences, 2-core Xeon at load ~5: 6-13 s instead of 43-90 s;
    docs/ingest.md). The rows are bitwise those of a one-thread run (tested). A GPU
    runs one stream. ``requested``: None for that default, else that many streams."""
    if requested is None:
        requested = 1 if getattr(device, "type", "cpu") != "cpu" else min(2, threads)
    n = max(1, int(requested))
    return n, max(1, threads // n)


def _compute(lm: Any, plan: _Plan, layers: list[int], opts: IngestOptions, writer: _Writer) -> None:
    import torch

    n_sent = len(plan.seqs)
    bs = max(1, opts.batch_size)
    window = bs * max(1, opts.window_batches)
    # kept rows of each sentence are the contiguous range [row_lo[s], row_hi[s])
    row_lo = np.searchsorted(plan.row_sent, np.arange(n_sent), side="left")
    row_hi = np.searchsorted(plan.row_sent, np.arange(n_sent), side="right")
    dim = lm.hidden_size
    stop = threading.Event()
    fed = plan.run_lengths if plan.run_lengths is not None else plan.lengths
    over = plan.over_cap if plan.over_cap is not None else np.zeros(n_sent, dtype=np.int64)

    def forward_window(w0: int) -> tuple[int, int, int, dict[int, np.ndarray]]:
        """The kept rows of sentences [w0, w0 + window) at every layer, as float32."""
        w1 = min(n_sent, w0 + window)
        r0, r1 = int(row_lo[w0]) if w0 < n_sent else 0, int(row_hi[w1 - 1])
        out = {layer: np.empty((r1 - r0, dim), dtype=np.float32) for layer in layers}
        work = [s for s in range(w0, w1) if row_hi[s] > row_lo[s]]
        work.sort(key=lambda s: fed[s])
        for b0 in range(0, len(work), bs):
            if stop.is_set():  # the main thread stopped (error, Ctrl-C): nobody reads this window
                break
            sents = work[b0: b0 + bs]
            states, start = lm.forward([plan.seqs[s][: fed[s]] for s in sents], layers)
            bi = np.concatenate([np.full(row_hi[s] - row_lo[s], j) for j, s in enumerate(sents)])
            dst = np.concatenate([np.arange(row_lo[s], row_hi[s]) for s in sents]) - r0
            col = plan.row_pos[dst + r0] + start[bi]
            dev = states[layers[0]].device
            bi_t, col_t = torch.from_numpy(bi).to(dev), torch.from_numpy(col).to(dev)
            for layer in layers:  # gather only the kept rows, as float32, on the host
                out[layer][dst] = states[layer][bi_t, col_t].float().cpu().numpy()
            del states
        return w0, w1, r0, out

    def emit(w0: int, w1: int, r0: int, out: dict[int, np.ndarray]) -> None:
        for c0 in range(w0, w1, bs):
            c1 = min(w1, c0 + bs)
            a, b = int(row_lo[c0]) - r0, int(row_hi[c1 - 1]) - r0
            sl = slice(a + r0, b + r0)
            batch = EmbeddingBatch(
                sentence_id=plan.sent_id[plan.row_sent[sl]].astype(np.int64),
                position=plan.row_pos[sl].astype(np.int32),
                token_id=plan.row_tok[sl].astype(np.int32),
                char_start=plan.row_span[sl, 0].astype(np.int32),
                char_end=plan.row_span[sl, 1].astype(np.int32),
                prefix_hash=plan.row_hash[sl].astype(np.int64),
                vectors={layer: out[layer][a:b] for layer in layers},
            )
            cand = int(plan.candidates[c0:c1].sum())
            refused = int(over[c0:c1].sum())  # over the cap for sure: never computed (_plan)
            counters = {
                "truncated": int(plan.truncated[c0:c1].sum()),
                "too_short": int((plan.candidates[c0:c1] == 0).sum()),
                "prefix_duplicates": cand - len(batch) - refused,
                "candidates": cand,
                "over_cap": refused,
            }
            _put(writer, _Chunk(batch, int(plan.sent_ord[c1 - 1]) + 1, c1 - c0,
                                int(plan.lengths[c0:c1].sum()), counters), opts.queue_chunks)

    starts = list(range(0, n_sent, window))
    threads = torch.get_num_threads()
    streams, per_stream = forward_streams(opts.forward_streams, getattr(lm, "device", None), threads)
    if streams == 1 or len(starts) < 2:
        for w0 in starts:
            emit(*forward_window(w0))
        return
    # windows are computed `streams` at a time, each on one thread of its own, and
    # handed to the writer in corpus order (what resume_ordinal needs)
    from concurrent.futures import Future, ThreadPoolExecutor

    torch.set_num_threads(per_stream)
    pool = ThreadPoolExecutor(streams, thread_name_prefix="llens-forward",
                              initializer=torch.set_num_threads, initargs=(per_stream,))
    try:
        ahead = iter(starts)
        running: list[Future] = [pool.submit(forward_window, w0) for _, w0 in zip(range(streams), ahead)]
        while running:
            done = running.pop(0).result()
            nxt = next(ahead, None)
            if nxt is not None:
                running.append(pool.submit(forward_window, nxt))
            emit(*done)
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(threads)


def _tell_stopped(echo: Echo, run: RunInfo, how: str, dropped: list[int]) -> None:
    """Say what a stopped run leaves undone about indexes, and how to finish it."""
    if run.num_shards > 1:
        echo(f"Shard {run.shard}/{run.num_shards} (run {run.id}) {how}: the ANN indexes are built when every "
             f"shard is done; resume it with `llens ingest --resume {run.id}`.")
    elif dropped:
        echo(f"Run {run.id} {how}: the ANN indexes of layers {','.join(map(str, dropped))} (dropped for "
             f"loading) are rebuilt when it finishes; resume it with `llens ingest --resume {run.id}`.")


def _build_index(store: Store, info: ModelInfo, layers: list[int], run: RunInfo, progress: bool,
                 echo: Echo, jobs: int = 2, ef_construction: int | None = None) -> list[str]:
    bar = IndexBuildProgress(enabled=progress, layers=layers, jobs=jobs)
    try:
        build_leaves(store, info, layers, bar, jobs, ef_construction=ef_construction)
    except BaseException:
        bar.close()
        echo(f"The rows of run {run.id} are stored, but its ANN index build did not finish: "
             f"run `llens index build {info.name}`.")
        raise
    bar.close()
    notices = [f"Built ANN indexes for layers {','.join(map(str, layers))}."]
    if not store.may_calibrate():
        notices.append(f"Their recall is not measured: only the database's owner records it (`llens index "
                       f"calibrate {info.name}` as the owner).")
    return notices


def build_leaves(store: Store, info: ModelInfo, layers: Sequence[int], progress: Any = None,
                 jobs: int = 2, **build: Any) -> list[int]:
    """Store.build_index for ``layers``, ``jobs`` leaves at a time, each on its own connection;
    ``build``: build_index's keywords (m, ef_construction, kind, maintenance_work_mem).

    Why: one HNSW build leaves cores idle in its serial phases (parts of the graph
    build, ANALYZE, the swap, the recall calibration); two leaves at once took 7.6 s a
    leaf against 11.7 s one after the other (35k x 576-d, 2-core Xeon: docs/ingest.md).
    Every layer is checked before any build starts; an error in one build or an interrupt
    cancels the builds still running (each is one transaction: nothing half-built stays).
    Where no second connection opens (a full server), the leaves are built one by one."""
    todo = list(layers)
    store.check_build(info, todo, build.get("kind"))
    jobs = max(1, min(jobs, len(todo)))
    stores: list[Store] = []
    try:
        for _ in range(jobs if jobs > 1 else 0):
            stores.append(store.sibling())
    except LatentLensError:
        pass  # no more connections: as many builds at once as opened (one: here)
    if len(stores) < 2:
        for st in stores:
            st.close()
        return store.build_index(info, todo, progress=progress, **build)
    pending: queue.Queue[int] = queue.Queue()
    for layer in todo:
        pending.put(layer)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def report(ev: Any) -> None:
        if progress is not None:
            with lock:
                progress(ev)

    def cancel_all() -> None:  # stop the running CREATE INDEX statements
        for st in stores:
            with contextlib.suppress(Exception):
                st.conn.cancel()

    def work(st: Store) -> None:
        try:
            while not errors:
                try:
                    layer = pending.get_nowait()
                except queue.Empty:
                    return
                st.build_index(info, [layer], progress=report, **build)
        except BaseException as e:  # handed to the calling thread
            with lock:
                first = not errors
                errors.append(e)
            if first:
                cancel_all()

    try:
        threads = [threading.Thread(target=work, args=(st,), name=f"llens-index-{i}", daemon=True)
                   for i, st in enumerate(stores)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except BaseException:
            errors.append(KeyboardInterrupt())
            cancel_all()
            for t in threads:
                t.join(30)
            raise
    finally:
        for st in stores:
            with contextlib.suppress(Exception):
                st.close()
    if errors:
        raise errors[0]
    return todo


class IndexBuildProgress:
    """A progress bar per index build, fed by Store.build_index's IndexProgress events."""

    def __init__(self, *, enabled: bool, layers: Sequence[int], jobs: int = 1):
        self.enabled, self.layers = enabled, list(layers)
        self.bar: Any = None
        self.layer: int | None = None
        #: builds run at once (build_leaves' ``jobs``): one bar counting finished layers
        self.parallel = min(jobs, len(self.layers)) > 1
        self.done: set[int] = set()

    def __call__(self, ev: Any) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.parallel:
            if self.bar is None:
                self.bar = tqdm(desc=f"index {len(self.layers)} layers", total=len(self.layers), unit="layer",
                                file=sys.stderr, dynamic_ncols=True, leave=False)
            if ev.finished:
                self.done.add(ev.layer)
            self.bar.set_postfix_str(f"layer {ev.layer}: {ev.phase}", refresh=False)
            self.bar.n = len(self.done)
            self.bar.refresh()
            return
        if ev.layer != self.layer:
            self.close()
            self.layer = ev.layer
            n = self.layers.index(ev.layer) + 1 if ev.layer in self.layers else 0
            self.bar = tqdm(desc=f"index layer {ev.layer} ({n}/{len(self.layers)})", total=ev.total or None,
                            unit=ev.unit, file=sys.stderr, dynamic_ncols=True, leave=False)
        if ev.total and self.bar.total != ev.total:
            self.bar.total = ev.total
        self.bar.unit = ev.unit
        self.bar.set_postfix_str(ev.phase, refresh=False)
        self.bar.n = ev.total if ev.finished else ev.done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
