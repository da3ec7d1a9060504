"""The query API: nearest contextual neighbours of any hidden state.

    import latentlens
    lens = latentlens.connect()
    for r in lens.neighbors(vectors, "HuggingFaceTB/SmolLM2-135M", k=5):
        print(r.index, [(n.token, round(n.similarity, 3), n.layer) for n in r.neighbours])

Like the reference library's ``ContextualIndex.search``, each query is
searched in every chosen stored (contextual) layer and the per-layer top-k
lists are merged globally by cosine; every neighbour carries its layer.

Search modes (``mode``; see latentlens.search for the policy and its costs):

* ``"auto"`` (default): each layer's batch goes where it is cheapest,
  exact scan or HNSW, and only in-distribution queries may take HNSW; out-
  of-distribution ones (visual tokens) are always answered exactly.
* ``"exact"``: always exact (``exact=True`` is the same).
* ``"ann"``: HNSW wherever a layer has an index, no fallback (``exact=False``).

Every result says which path answered it, per searched layer (``search``).

Baselines (``methods``): ``query_text`` and ``query_vectors`` can also read
each hidden state through LogitLens and EmbeddingLens (latentlens.lenses);
those need only the model, and ``text_lenses`` / ``vector_lenses`` run them
without any database.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from latentlens.errors import EmptyResult, InputError
from latentlens.lenses import (
    VOCAB_METHODS,
    VocabHit,
    VocabularyLens,
    expand_word,
    parse_methods,
    token_text,
)
from latentlens.search import (
    DEFAULT_OOD_THRESHOLD,
    CostModel,
    LayerSearch,
    Mode,
    QueryKind,
    Searcher,
    validate_layers,
)
from latentlens.store import ContextColumns, KnnResult, ModelInfo, Store
from latentlens.store.types import SPAN_UNKNOWN, check_k, unit_queries

if TYPE_CHECKING:
    from latentlens.scan import ScanEngine


@dataclass
class Neighbour:
    """One stored token context near a query."""

    token: str | None
    token_id: int
    similarity: float
    layer: int
    sentence_id: int
    sentence: str
    position: int
    char_start: int | None
    char_end: int | None
    found_in: list[int] | None = None  # a distinct context: every searched layer it was found in

    @property
    def word(self) -> str:
        """The whole word this token sits in within its sentence (``h«iker»`` -> ``hiker``)."""
        return expand_word(self.sentence, self.char_start, self.char_end) or token_text(self.token)

    def to_dict(self) -> dict:
        d = {**asdict(self), "word": self.word}
        if self.found_in is None:
            del d["found_in"]
        return d

    def marked_sentence(self, left: str = "[[", right: str = "]]") -> str:
        """The sentence with this token marked, where its span is known."""
        if self.char_start is None or self.char_end is None:
            return self.sentence
        s = self.sentence
        return f"{s[: self.char_start]}{left}{s[self.char_start: self.char_end]}{right}{s[self.char_end:]}"


@dataclass
class QueryResult:
    """Neighbours of query vector ``index`` (its token position for text queries)."""

    index: int
    neighbours: list[Neighbour]
    per_layer: dict[int, list[Neighbour]] | None = None
    query_token: str | None = None
    query_layer: int | None = None
    search: dict[int, str] | None = None  # searched layer -> path that answered ("scan", "ann", "sql")
    lenses: dict[str, list[VocabHit]] | None = None  # baseline method -> its top-k vocabulary tokens
    provenance: dict | None = None  # model revision, corpora, runs, indexes, search paths, who, when
    contexts: list[Neighbour] | None = None  # top-k distinct contexts (see distinct_contexts)

    def distinct(self) -> list[Neighbour]:
        """What tables show: each context once, with the layers it was found in."""
        return self.contexts if self.contexts is not None else distinct_contexts(self.neighbours)

    def to_dict(self) -> dict:
        d = {
            "index": self.index,
            "query_token": self.query_token,
            "query_layer": self.query_layer,
            "search": None if self.search is None else {str(x): p for x, p in self.search.items()},
            "neighbours": [n.to_dict() for n in self.neighbours],
            "per_layer": None if self.per_layer is None else {
                str(layer): [n.to_dict() for n in ns] for layer, ns in self.per_layer.items()
            },
        }
        if self.contexts is not None:
            d["contexts"] = [n.to_dict() for n in self.contexts]
        if self.lenses is not None:
            d["lenses"] = {m: [h.to_dict() for h in hits] for m, hits in self.lenses.items()}
        if self.provenance is not None:
            d["provenance"] = self.provenance
        return d


def distinct_contexts(neighbours: Sequence[Neighbour], k: int | None = None) -> list[Neighbour]:
    """Each (sentence, position) once, best cosine first, with every layer it was found in.

    The same sentence stored at two text layers is one context: merged lists
    otherwise read "water (L2), water (L1), towards (L1), towards (L2)".
    """
    best: dict[tuple[int, int, str], Neighbour] = {}
    layers: dict[tuple[int, int, str], list[int]] = {}
    for n in sorted(neighbours, key=lambda n: -n.similarity):
        key = (n.sentence_id, n.position, n.sentence)
        if key not in best:
            best[key] = n
        layers.setdefault(key, []).extend(n.found_in or [n.layer])
    out = [replace(n, found_in=sorted(set(layers[key]))) for key, n in best.items()]
    return out[:k] if k is not None else out


# --------------------------------------------------------------------------


class Lens:
    """Query a store: neighbours of vectors, texts (and, via latentlens.vlm, images)."""

    def __init__(
        self, store: Store, *, cache_dir: Any = None, scan_dtype: str | None = None,
        ood_threshold: float = DEFAULT_OOD_THRESHOLD, use_cache: bool = True, scan_device: str | None = None,
    ):
        self.store = store
        self.searcher = Searcher(
            store, scan_args={"cache_root": cache_dir, "dtype": scan_dtype, "use_cache": use_cache,
                              "device": scan_device},
            ood_threshold=ood_threshold,
        )
        self._models: dict[str, Any] = {}

    @classmethod
    def connect(cls, database_url: str | None = None, **kw: Any) -> Lens:
        """Open the configured database (see latentlens.config) for querying."""
        return cls(Store.open(database_url), **kw)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Lens:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def share(self, models: dict[str, Any], costs: CostModel | None = None) -> CostModel:
        """Use ``models`` (loaded language models by stored name) and ``costs`` (a search cost
        model) held by the caller, so Lenses of one process (a server's requests) load each
        model once and learn costs together; returns the cost model now in use."""
        self._models = models
        if costs is not None:
            self.searcher.costs = costs
        return self.searcher.costs

    @property
    def scan(self) -> ScanEngine:
        """The exact-scan engine (its leaf cache can be warmed: ``lens.scan.warm(info)``)."""
        return self.searcher.scan

    # ---- models -----------------------------------------------------------

    def models(self) -> list[dict]:
        """Every model with its layers (rows, version, index), total rows and corpora."""
        out = []
        for info in self.store.list_models():
            out.append({
                "model": info.name,
                "hidden_size": info.hidden_size,
                "num_layers": info.num_layers,
                "architecture": info.architecture,
                "rows": info.row_count,
                "layers": [
                    {"layer": li.layer, "rows": li.row_count, "version": li.version, "index": li.index_kind}
                    for li in info.layers
                ],
                "corpora": self.store.model_corpora(info),
            })
        return out

    def _model(self, model: str | ModelInfo) -> ModelInfo:
        # always fresh: row counts and versions decide cache validity
        return self.store.get_model(model.name if isinstance(model, ModelInfo) else model)

    # ---- vectors ----------------------------------------------------------

    def neighbors(
        self,
        vectors: Any,
        model: str | ModelInfo,
        *,
        layers: Sequence[int] | None = None,
        k: int = 5,
        per_layer: bool = False,
        mode: Mode = "auto",
        exact: bool | None = None,
        ef_search: int | None = None,
        query_kind: QueryKind = "auto",
    ) -> list[QueryResult]:
        """Top-k stored contexts of each vector [N, D] (or [D]), merged across layers by cosine.

        ``mode`` is auto / exact / ann (``exact=True`` / ``False`` are the same as
        the last two); ``query_kind="visual"`` sends every query to the exact scan.
        """
        # fresh (row counts and versions decide cache validity), with the server's ANN support
        info, ann = self.store.search_model(model)
        chosen = validate_layers(info, layers)
        q = unit_queries(vectors, info.hidden_size, info.name)
        k = check_k(k)
        found = self.searcher.search(info, chosen, q, k, mode=_mode(mode, exact), query_kind=query_kind,
                                     ef_search=ef_search, ann_supported=ann)
        with _collector_paused():
            return self._assemble(info, found, k, per_layer, q.shape[0])

    neighbours = neighbors

    def search_layer(
        self, model: str | ModelInfo, layer: int, vectors: Any, k: int = 10, *,
        mode: Mode = "auto", exact: bool | None = None, ef_search: int | None = None,
    ) -> LayerSearch:
        """Raw top-k of one layer (arrays, no sentences) and the path taken: for recall checks and tools."""
        info = self._model(model)
        validate_layers(info, [layer])
        q = unit_queries(vectors, info.hidden_size, info.name)
        return self.searcher.search(info, [layer], q, check_k(k), mode=_mode(mode, exact),
                                    ef_search=ef_search)[layer]

    def _assemble(
        self, info: ModelInfo, found: dict[int, LayerSearch], k: int, per_layer: bool, nq: int
    ) -> list[QueryResult]:
        """QueryResults of the layers' answers: merged top-k, distinct contexts (and per layer),
        each with the provenance of the answer.

        Merge and distinct picks run over whole arrays (_Merged), and every neighbour's
        sentence, token and span come from one Store.answer_columns call (each sentence's
        text once, with the provenance in the same round trip): per-neighbour Python in the
        merge, per-key rows and dict lookups cost a third of a warm image's (576 queries x 8
        layers) search (profiled).
        """
        by_layer: dict[int, KnnResult] = {layer: ls.result for layer, ls in found.items()}
        m = _Merged(by_layer, k)
        pq, pj = np.nonzero(m.picked)  # merged top-k, by query then rank
        cq, cj, found_in = m.distinct()
        parts = [(pq, pj), (cq, cj)]
        if per_layer:
            for layer, res in sorted(by_layer.items()):
                lq, lr = np.nonzero(np.isfinite(res.similarity))
                parts.append((lq, m.index_of(layer, lq, lr)))
        # (layer, sentence, position) of every neighbour built below, each distinct key looked up once
        allq = np.concatenate([q for q, _ in parts])
        allj = np.concatenate([j for _, j in parts])
        keys = np.stack([m.layer[allq, allj], m.sentence_id[allq, allj], m.position[allq, allj]], axis=1)
        uniq, inverse = _unique_rows(keys)
        token_id = np.zeros(len(uniq), dtype=np.int64)
        token_id[inverse] = m.token_id[allq, allj]  # the leaves' ids: their texts asked with the rest
        span = np.full((2, len(uniq)), SPAN_UNKNOWN, dtype=np.int32)  # known where a cached leaf read them
        span[0, inverse] = m.char_start[allq, allj]
        span[1, inverse] = m.char_end[allq, allj]
        cc, prov = self.store.answer_columns(info, uniq[:, 0], uniq[:, 1], uniq[:, 2], token_id, sorted(found),
                                             {layer: ls.paths for layer, ls in found.items()}, spans=span)
        built: list[list[Neighbour]] = []
        lo = 0
        for q, j in parts:
            hi = lo + len(q)
            built.append(m.neighbours(q, j, inverse[lo:hi], cc))
            lo = hi
        ns_all, ctx_all = built[0], built[1]
        for n, layers in zip(ctx_all, found_in, strict=True):
            n.found_in = layers
        p_off = _offsets(pq, nq)
        c_off = _offsets(cq, nq)
        l_offs = [(layer, _offsets(q, nq), ns) for layer, (q, _), ns
                  in zip(sorted(by_layer) if per_layer else [], parts[2:], built[2:], strict=True)]
        path_rows = list(zip(*(found[layer].paths for layer in sorted(found)), strict=True)) if found else []
        layers_sorted = sorted(found)
        out = []
        for qi in range(nq):
            pl = None
            if per_layer:
                pl = {layer: ns[off[qi]:off[qi + 1]] for layer, off, ns in l_offs}
            paths = dict(zip(layers_sorted, path_rows[qi], strict=True)) if found else {}
            out.append(QueryResult(index=qi, neighbours=ns_all[p_off[qi]:p_off[qi + 1]], per_layer=pl,
                                   search=paths, contexts=ctx_all[c_off[qi]:c_off[qi + 1]], provenance=prov))
        return out

    # ---- text -------------------------------------------------------------

    def language_model(self, model: str | ModelInfo, *, lens_heads: bool = False) -> Any:
        """The stored model, loaded once per Lens (torch and transformers imported here only).

        ``lens_heads`` keeps its LM head for the baselines; without it an untied
        head (a vocabulary x hidden matrix) is not held in memory.
        """
        info = self._model(model)
        lm = self._models.get(info.name)
        if lm is None or (lens_heads and lm.heads is None):
            try:
                from latentlens.models import load_from_store
            except ImportError as e:
                raise InputError(f"running models needs the model adapters (latentlens.models): {e}") from e
            lm = self._models[info.name] = load_from_store(info, lens_heads=lens_heads)
        return lm

    def hidden_states(self, model: str | ModelInfo, text: str | Sequence[str], layers: Sequence[int] | None = None):
        """Run the stored model on ``text``: a TextStates (token_ids, tokens, spans, vectors {layer: [T, D]}).

        A list of texts gives a list of TextStates.
        """
        info = self._model(model)
        if layers is None:
            layers = info.layer_numbers or list(range(info.num_layers + 1))
        info.check_layer_range(layers)
        texts = [text] if isinstance(text, str) else list(text)
        states = self.language_model(info).hidden_states(texts, list(layers))
        return states[0] if isinstance(text, str) else states

    def query_text(
        self,
        model: str | ModelInfo,
        text: str,
        *,
        token: str | None = None,
        query_layers: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        k: int = 5,
        per_layer: bool = False,
        mode: Mode = "auto",
        exact: bool | None = None,
        ef_search: int | None = None,
        methods: str | Sequence[str] = ("latentlens",),
    ) -> list[QueryResult]:
        """Neighbours of each token of ``text`` (or those matching ``token``), at each query layer.

        ``query_layers`` picks which hidden states of the text are used (default:
        every stored layer); results come grouped by query layer, then token.
        ``methods`` adds the baselines (``"all"``, or any of latentlens,
        logitlens, embeddinglens): their top-k tokens land in ``result.lenses``.
        """
        info = self._model(model)
        if query_layers is None:
            query_layers = info.layer_numbers
            if not query_layers:
                raise EmptyResult(f"model '{info.name}' has no stored layers yet: run `llens ingest`")
        methods = parse_methods(methods)
        k = check_k(k)

        def search(qvecs: np.ndarray) -> list[QueryResult]:
            return self.neighbors(qvecs, info, layers=layers, k=k, per_layer=per_layer, mode=mode,
                                  exact=exact, ef_search=ef_search)

        info.check_layer_range(query_layers)
        lm = self.language_model(info, lens_heads=any(m in VOCAB_METHODS for m in methods))
        return text_lenses(lm, text, query_layers=query_layers, token=token, k=k,
                           methods=methods, search=search if "latentlens" in methods else None)

    def query_vectors(
        self,
        vectors: Any,
        model: str | ModelInfo,
        *,
        methods: str | Sequence[str] = ("latentlens",),
        query_layer: int | None = None,
        layers: Sequence[int] | None = None,
        k: int = 5,
        per_layer: bool = False,
        mode: Mode = "auto",
        exact: bool | None = None,
        ef_search: int | None = None,
    ) -> list[QueryResult]:
        """``neighbors`` plus the baselines: ``query_layer`` says which layer the vectors come from
        (LogitLens applies the final norm below the last layer)."""
        methods = parse_methods(methods)
        info = self._model(model)
        found = (self.neighbors(vectors, info, layers=layers, k=k, per_layer=per_layer, mode=mode,
                                exact=exact, ef_search=ef_search)
                 if "latentlens" in methods else None)
        if not any(m in VOCAB_METHODS for m in methods):
            return found or []
        return vector_lenses(self.language_model(info, lens_heads=True), vectors, query_layer=query_layer, k=k,
                             methods=methods, found=found)

    # ---- output -------------------------------------------------------------

    @staticmethod
    def to_dataframe(results: Sequence[QueryResult]):
        """One row per (query, neighbour) as a pandas DataFrame."""
        try:
            import pandas as pd
        except ImportError as e:
            raise InputError("to_dataframe needs pandas: pip install pandas") from e
        return pd.DataFrame(flat_rows(results))


def text_lenses(
    lm: Any, text: str, *, query_layers: Sequence[int], token: str | None = None, k: int = 5,
    methods: Sequence[str] = ("latentlens",), search: Any = None,
) -> list[QueryResult]:
    """Each selected token of ``text`` at each query layer, through ``methods``.

    ``lm`` is a loaded LanguageModel; ``search`` (query vectors -> QueryResults)
    answers LatentLens and is None when only the baselines run (no store).
    """
    query_layers = [int(x) for x in query_layers]
    st = lm.hidden_states([text], query_layers)[0]
    positions = select_tokens(st.tokens, st.spans, text, token)
    vocab = [m for m in methods if m in VOCAB_METHODS]
    blocks = [np.asarray(st.vectors[ql], dtype=np.float32)[positions] for ql in query_layers]
    # one search per stored layer for all (query layer, token) vectors
    found = search(np.concatenate(blocks)) if search is not None else None
    results: list[QueryResult] = []
    prov = found[0].provenance if found else baseline_provenance(lm)
    i = 0
    for ql, block in zip(query_layers, blocks):
        extra = VocabularyLens.of(lm).methods(vocab, block, ql, k) if vocab else [None] * len(positions)
        for p, lens_hits in zip(positions, extra):
            r = found[i] if found is not None else QueryResult(index=int(p), neighbours=[])
            r.index, r.query_token, r.query_layer = int(p), st.tokens[p], int(ql)
            r.lenses = lens_hits
            r.provenance = prov
            results.append(r)
            i += 1
    return results


def vector_lenses(
    lm: Any, vectors: Any, *, query_layer: int | None, k: int = 5,
    methods: Sequence[str] = ("logitlens", "embeddinglens"), found: list[QueryResult] | None = None,
) -> list[QueryResult]:
    """The baselines of raw vectors (attached to ``found``, LatentLens results, when given)."""
    vocab = [m for m in methods if m in VOCAB_METHODS]
    if "logitlens" in vocab and query_layer is None:
        raise InputError(
            "LogitLens needs the layer the vectors come from (--query-layer L): below the last "
            "layer it applies the model's final norm first"
        )
    layer = lm.num_layers if query_layer is None else int(query_layer)
    hits = VocabularyLens.of(lm).methods(vocab, vectors, layer, k)
    prov = baseline_provenance(lm)
    out = found if found is not None else [QueryResult(index=i, neighbours=[], provenance=prov)
                                           for i in range(len(hits))]
    for r, h in zip(out, hits):
        r.lenses = h
        r.query_layer = query_layer if query_layer is not None else r.query_layer
    return out


def stored_model(model: str, database_url: str | None = None) -> ModelInfo | None:
    """The store's record of ``model``, or None when the store does not know it or cannot be reached."""
    from latentlens.errors import DatabaseUnavailable, SchemaOutOfDate, UnknownModel

    try:
        with Store.open(database_url) as store:
            return store.get_model(model)
    except (UnknownModel, DatabaseUnavailable, SchemaOutOfDate):
        return None


def baseline_language_model(model: str, database_url: str | None = None) -> tuple[Any, ModelInfo | None]:
    """The language model the baselines read, with the store's record of it if any.

    A local path loads as given and the store is never opened; a name is
    looked up in the store (if it answers) for the source ``llens ingest``
    recorded; anything else loads as given (a hub id).
    """
    from pathlib import Path

    stored = None if Path(model).expanduser().exists() else stored_model(model, database_url)
    if stored is not None:
        from latentlens.models import load_from_store

        return load_from_store(stored), stored
    from latentlens.models import load_language_model

    return load_language_model(model), None


def baseline_vlm_source(model: str, visual_layers: Sequence[int] | None, database_url: str | None = None
                        ) -> tuple[str, list[int]]:
    """(source to load, visual layers) for the baselines of an image: as baseline_language_model."""
    from pathlib import Path

    stored = None if Path(model).expanduser().exists() else stored_model(model, database_url)
    if stored is not None:
        stored.require_source()
    if visual_layers is None and stored is not None:
        visual_layers = stored.layer_numbers
    if not visual_layers:
        raise InputError("choose the visual layers (--visual-layers): without latentlens the model is "
                         "loaded as given and has no stored layers to default to")
    source = ((stored.params or {}).get("source") or stored.name) if stored is not None else model
    return source, list(visual_layers)


def baseline_provenance(model: Any) -> dict:
    """Provenance of an answer computed from the model alone (the baselines, no store)."""
    import datetime
    import getpass

    from latentlens import __version__

    params = model.store_params() if hasattr(model, "store_params") else {}
    return {
        "latentlens_version": __version__, "database": None, "by": getpass.getuser(),
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model": {"name": getattr(model, "name", None), "revision": params.get("revision") or getattr(model, "revision", None),
                  "source": params.get("source") or getattr(model, "name", None)},
        "corpora": [], "layers": {}, "search": None,
    }


class _Merged:
    """Every layer's [Q, k] answer merged per query, best cosine first: [Q, L * k] arrays.

    The order is merge_layers' (a stable sort by cosine over the layers in ascending order,
    ties kept in layer order); ``picked`` marks the merged top-k (finite cosines only).
    """

    def __init__(self, by_layer: dict[int, KnnResult], k: int):
        self.layers = sorted(by_layer)
        self.k = k
        res = [by_layer[x] for x in self.layers]

        def flat(name: str) -> np.ndarray:
            # a layer whose search read no char spans (None: ANN, SQL) counts as SPAN_UNKNOWN
            a = np.stack([x if (x := getattr(r, name)) is not None
                          else np.full(r.position.shape, SPAN_UNKNOWN, dtype=np.int32) for r in res])  # [L, Q, k]
            return a.transpose(1, 0, 2).reshape(a.shape[1], -1)

        sims = flat("similarity")
        nq = sims.shape[0]
        self.order = np.argsort(-sims, axis=1, kind="stable")
        self.similarity = np.take_along_axis(sims, self.order, axis=1)
        self.finite = np.isfinite(self.similarity)
        li, self.rank = np.divmod(self.order, k)
        self.layer = np.asarray(self.layers, dtype=np.int64)[li] if nq else li
        self.sentence_id = np.take_along_axis(flat("sentence_id"), self.order, axis=1)
        self.position = np.take_along_axis(flat("position"), self.order, axis=1)
        self.token_id = np.take_along_axis(flat("token_id"), self.order, axis=1)
        # char spans the searches read with their rows (SPAN_UNKNOWN where they did not)
        self.char_start = np.take_along_axis(flat("char_start"), self.order, axis=1)
        self.char_end = np.take_along_axis(flat("char_end"), self.order, axis=1)
        self.picked = self.finite.copy()
        self.picked[:, k:] = False
        self._where: np.ndarray | None = None

    def index_of(self, layer: int, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Merged columns of layer ``layer``'s rank ``r`` answers of queries ``q``."""
        if self._where is None:  # where each layer's (query, rank) landed in the merged order
            self._where = np.argsort(self.order, axis=1)
        return self._where[q, self.layers.index(layer) * self.k + r]

    def distinct(self) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """Per query its first k distinct (sentence, position) in the merged order: (query,
        column of the first occurrence) by query then column, and for each the layers it was
        found in (sorted, each once)."""
        q, j = np.nonzero(self.finite)
        sid, pos, lay = self.sentence_id[q, j], self.position[q, j], self.layer[q, j]
        o = _lexsort((lay, pos, sid, q))  # by query, context, then layer
        q, j, sid, pos, lay = q[o], j[o], sid[o], pos[o], lay[o]
        n = len(q)
        new = np.ones(n, dtype=bool)
        new[1:] = (q[1:] != q[:-1]) | (sid[1:] != sid[:-1]) | (pos[1:] != pos[:-1])
        starts = np.flatnonzero(new)
        if n == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, []
        first = np.minimum.reduceat(j, starts)
        run_q = q[starts]
        # layers of each run, each once (a layer's top-k holds a context at most once; anyway)
        once = new.copy()
        once[1:] |= lay[1:] != lay[:-1]
        found = lay[once].tolist()
        run_of = np.cumsum(new)[once] - 1
        seg = np.searchsorted(run_of, np.arange(len(starts) + 1))
        # runs in merged order per query; the first k of each query
        ro = _lexsort((first, run_q))
        rq = run_q[ro]
        rank = np.arange(len(ro)) - np.searchsorted(rq, rq)
        keep = ro[rank < self.k]
        found_in = [found[a:b] for a, b in zip(seg[keep].tolist(), seg[keep + 1].tolist(), strict=True)]
        return run_q[keep], first[keep], found_in

    def neighbours(self, q: np.ndarray, j: np.ndarray, ctx: np.ndarray, cc: ContextColumns) -> list[Neighbour]:
        """Neighbour objects of merged entries (q, j), whose context is ``cc``'s row ``ctx``."""
        ctx_l = ctx.tolist()
        token, sentence, cs, ce = cc.token, cc.sentence, cc.char_start, cc.char_end
        return [
            Neighbour(token=token[c], token_id=t, similarity=s, layer=layer, sentence_id=sid,
                      sentence=sentence[c], position=p, char_start=cs[c], char_end=ce[c])
            for t, s, layer, sid, p, c in zip(
                self.token_id[q, j].tolist(), self.similarity[q, j].tolist(), self.layer[q, j].tolist(),
                self.sentence_id[q, j].tolist(), self.position[q, j].tolist(), ctx_l, strict=True)
        ]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector held off while an answer's objects are built.

    They form no cycles, yet an image's answer (576 queries x 8 layers: ~11k Neighbours)
    set off collections of everything the process holds: ~7 ms of an ~80 ms assembly, and
    a full collection now and then (~100 ms) in a process that keeps earlier answers.
    Where another thread already paused it, that thread turns it back on.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _packed(cols: Sequence[np.ndarray]) -> np.ndarray | None:
    """Integer columns packed into one int64 per entry that orders as the columns do, the first
    most significant; None where one is negative or they need more than 63 bits."""
    widths = []
    for c in cols:
        if len(c) and int(c.min()) < 0:
            return None
        widths.append(int(c.max()).bit_length() if len(c) else 0)
    if sum(widths) > 63:
        return None
    key = np.zeros(len(cols[0]) if cols else 0, dtype=np.int64)
    for c, w in zip(cols, widths, strict=True):
        key <<= w
        key |= c.astype(np.int64, copy=False)
    return key


def _lexsort(keys: Sequence[np.ndarray]) -> np.ndarray:
    """np.lexsort(keys) (the last key primary, stable): one stable argsort of the keys packed
    (_packed) where they fit. An image's answer sorts ~46k entries by 4 keys: 8.8 -> 1.0 ms."""
    key = _packed(list(reversed(keys)))
    return np.lexsort(keys) if key is None else np.argsort(key, kind="stable")


def _unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(rows, axis=0, return_inverse=True) of an [N, C] integer array (sorted rows, and
    each row's index among them), by one 1-d unique of the packed rows where they fit: an image's
    ~11k (layer, sentence, position) keys 8.9 -> 0.3 ms."""
    if not len(rows):
        return rows, np.zeros(0, dtype=np.int64)
    key = _packed([rows[:, j] for j in range(rows.shape[1])])
    if key is None:
        uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
        return uniq, inverse.reshape(-1)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return rows[first], inverse.reshape(-1)


def _offsets(q: np.ndarray, nq: int) -> list[int]:
    """Where each query's entries start in ``q`` (sorted query numbers), and the end: [nq + 1]."""
    return np.searchsorted(q, np.arange(nq + 1)).tolist()


def _mode(mode: Mode, exact: bool | None) -> Mode:
    """``exact=True/False`` (the older spelling) override ``mode``."""
    if exact is None:
        return mode
    return "exact" if exact else "ann"


def select_tokens(tokens: Sequence[str], spans: Sequence[Any], text: str, token: str | None) -> list[int]:
    """Positions of the query tokens: those with characters in the text (not BOS or other
    special tokens, whose states are outliers), or those whose text is ``token``."""

    def has_chars(i: int) -> bool:
        span = spans[i] if i < len(spans) else None
        return span is not None and span[0] is not None and span[0] >= 0

    def text_of(i: int) -> str:
        return text[spans[i][0]: spans[i][1]] if has_chars(i) else tokens[i]

    if token is None:
        return [i for i in range(len(tokens)) if has_chars(i)] or list(range(len(tokens)))
    want = token.strip().lower()

    hits = [i for i in range(len(tokens)) if text_of(i).strip().lower() == want
            or tokens[i].strip().lstrip("Ġ▁").lower() == want]
    if not hits:
        shown = ", ".join(repr(t) for t in tokens[:40])
        raise InputError(f"token '{token}' is not one of the text's tokens ({shown})")
    return hits


def flat_rows(results: Sequence[QueryResult]) -> list[dict]:
    """(query, method, neighbour) rows: the CSV / DataFrame form.

    Baseline rows carry the vocabulary token and its score in ``similarity``
    (a probability for logitlens, a cosine for embeddinglens) and no sentence.
    """
    rows = []
    for r in results:
        head = {"query_index": r.index, "query_token": r.query_token, "query_layer": r.query_layer}
        groups: list[tuple[int | None, list[Neighbour]]] = [(None, r.neighbours)]
        if r.per_layer is not None:
            groups = list(r.per_layer.items())
        for searched, ns in groups:
            for rank, n in enumerate(ns, 1):
                rows.append({"method": "latentlens", **head, "searched_layer": searched, "rank": rank,
                             **n.to_dict()})
        for method, hits in (r.lenses or {}).items():
            for rank, h in enumerate(hits, 1):
                rows.append({"method": method, **head, "searched_layer": None, "rank": rank,
                             "token": h.token, "word": h.word, "token_id": h.token_id,
                             "similarity": h.score})
    return rows




def load_vectors(path: str, key: str | None = None) -> np.ndarray:
    """Query vectors [N, D] or [D] from .npy, .pt/.pth (weights_only) or .safetensors.

    A file holding several arrays needs ``key`` (the error lists the keys).
    Every way a file can be unusable is an InputError naming the file and the
    problem: unreadable or truncated, needing arbitrary unpickling (refused,
    never run), not floating point (integers, booleans, text, complex numbers:
    vectors are hidden states, so an integer array is taken as a mistake, e.g.
    token ids), not 1-D or 2-D, empty, or NaN/infinite or beyond float32's
    range. Returns float32 (an all-zero vector is refused by the query itself).
    """
    from pathlib import Path

    from latentlens.errors import LatentLensError
    from latentlens.store.types import check_vector_values
    from latentlens.torchfile import error_line as first

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".npz", ".pt", ".pth", ".bin", ".safetensors"):
        raise InputError(f"unknown vector file type '{suffix}' (use .npy, .npz, .pt or .safetensors)")
    if not p.is_file():
        raise InputError(f"vector file not found: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"{p} is empty (0 bytes)")
    try:
        if suffix == ".npy":
            arrays: Any = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        elif suffix in (".pt", ".pth", ".bin"):
            from latentlens.torchfile import load_weights_only

            arrays = load_weights_only(p, hint="save a plain tensor (torch.save(tensor, path)), or numpy "
                                               "arrays with np.save as .npy")
        else:
            from safetensors.torch import load_file

            arrays = load_file(str(p))
    except LatentLensError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():  # an object array, or not a .npy at all
            raise InputError(f"{p} holds Python objects, not numbers: refused (reading it would unpickle, "
                             "which can run code)") from None
        raise InputError(f"cannot read vectors from {p}: {first(e)}") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (truncated archives, bad headers: any failure is a bad file)
        raise InputError(f"cannot read vectors from {p}: {first(e)}") from None
    if isinstance(arrays, dict):
        names = sorted(str(n) for n in arrays)
        if key is None and len(arrays) == 1:
            key = names[0]
        if key is None or key not in arrays:
            if key is not None:
                raise InputError(f"{p} has no array '{key}' (it has: {', '.join(names)})")
            raise InputError(f"{p} holds several arrays: choose one with --key ({', '.join(names)})")
        arrays = arrays[key]
    what = f"{p}" + (f" ['{key}']" if key is not None else "")
    if hasattr(arrays, "detach"):  # bfloat16 has no numpy twin: floats go through float32
        t = arrays.detach().cpu()
        arrays = t.float().numpy() if t.is_floating_point() else t.numpy()
    if not isinstance(arrays, np.ndarray):
        raise InputError(f"{what} does not hold an array or tensor (found {type(arrays).__name__})")
    kind = arrays.dtype.kind
    if kind in "US":
        raise InputError(f"{what} holds text ({arrays.dtype}), not vectors")
    if kind != "f":
        desc = {"i": "integer", "u": "integer", "b": "boolean", "c": "complex", "V": "record"}.get(kind, "non-numeric")
        raise InputError(f"{what} holds {desc} values ({arrays.dtype}), not floating-point vectors (hidden "
                         "states); if they are vectors, save them as float32 (a.astype('float32'))")
    if arrays.ndim not in (1, 2):
        raise InputError(f"{what} holds an array of shape {arrays.shape}: expected [N, D] or [D]")
    if arrays.size == 0:
        raise InputError(f"{what} holds no vectors (shape {arrays.shape})")
    rows = arrays.reshape(1, -1) if arrays.ndim == 1 else arrays
    # NaN/inf is garbage whatever the use; an all-zero vector is refused by the query (unit_queries)
    check_vector_values(rows, f"{what}: vector", zeros=False)
    with np.errstate(over="ignore"):
        out = arrays.astype(np.float32, copy=False)
    if arrays.dtype.itemsize > 4 and not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out.reshape(len(rows), -1)).all(axis=1))[0])
        raise InputError(f"{what}: vector {bad} has values beyond float32's range (|x| > 3.4e38)")
    return out


__all__ = [
    "Lens", "Neighbour", "QueryResult", "baseline_language_model", "baseline_vlm_source", "flat_rows",
    "load_vectors", "select_tokens", "stored_model", "text_lenses", "validate_layers", "vector_lenses",
]
