"""The query API: nearest contextual neighbours of any hidden state.

    import latentlens
    lens = latentlens.connect()
    for r in lens.neighbors(vectors, "HuggingFaceTB/SmolLM2-135M", k=5):
        print(r.index, [(n.token, round(n.similarity, 3), n.layer) for n in r.neighbours])

Like the reference library's ``ContextualIndex.search``, each query is
searched in every chosen stored (contextual) layer and the per-layer top-k
lists are merged globally by cosine; every neighbour carries its layer.

Search modes (``exact``):

* ``True``: exact scan of a local fp16 copy of each leaf (latentlens.scan).
  Exact for every query distribution.
* ``None`` (default, "auto"): where a leaf has an ANN index and the server
  can use it, HNSW answers first; queries whose best HNSW similarity is below
  ``ood_threshold`` (0.5: text tokens score ~0.9, visual tokens ~0.1-0.3, where
  HNSW recall collapses) are answered again by the exact scan. Leaves without
  an index are scanned exactly. So out-of-distribution queries are exact and
  in-distribution ones get HNSW's recall at ``ef_search``.
* ``False``: HNSW where an index exists, no fallback (fastest, approximate);
  exact scan elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from latentlens.errors import EmptyResult, InputError, UnknownLayer
from latentlens.store import KnnResult, ModelInfo, Store

if TYPE_CHECKING:
    import torch

    from latentlens.scan import ScanEngine

DEFAULT_OOD_THRESHOLD = 0.5


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

    def to_dict(self) -> dict:
        return asdict(self)

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

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "query_token": self.query_token,
            "query_layer": self.query_layer,
            "neighbours": [n.to_dict() for n in self.neighbours],
            "per_layer": None if self.per_layer is None else {
                str(layer): [n.to_dict() for n in ns] for layer, ns in self.per_layer.items()
            },
        }


# --------------------------------------------------------------------------


class Lens:
    """Query a store: neighbours of vectors, texts (and, via latentlens.vlm, images)."""

    def __init__(
        self, store: Store, *, cache_dir: Any = None, scan_dtype: str | None = None,
        ood_threshold: float = DEFAULT_OOD_THRESHOLD, use_cache: bool = True,
    ):
        self.store = store
        self.ood_threshold = ood_threshold
        self._scan_args = {"cache_root": cache_dir, "dtype": scan_dtype, "use_cache": use_cache}
        self._scan: ScanEngine | None = None
        self._models: dict[str, Any] = {}
        self.last_modes: dict[int, str] = {}

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

    @property
    def scan(self) -> ScanEngine:
        if self._scan is None:
            from latentlens.scan import ScanEngine

            self._scan = ScanEngine(self.store, **self._scan_args)
        return self._scan

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
        exact: bool | None = None,
        ef_search: int | None = None,
    ) -> list[QueryResult]:
        """Top-k stored contexts of each vector [N, D] (or [D]), merged across layers by cosine."""
        info = self._model(model)
        chosen = search_layers(info, layers)
        from latentlens.scan import normalize_queries

        q = normalize_queries(vectors, info.hidden_size, info.name)
        if k < 1:
            raise InputError("k must be at least 1")
        by_layer = {layer: self._search_layer(info, layer, q, k, exact, ef_search) for layer in chosen}
        return self._assemble(info, by_layer, k, per_layer, q.shape[0])

    neighbours = neighbors

    def search_layer(
        self, model: str | ModelInfo, layer: int, vectors: Any, k: int = 10, *,
        exact: bool | None = None, ef_search: int | None = None,
    ) -> KnnResult:
        """Raw top-k of one layer (arrays, no sentences): for recall checks and tools."""
        info = self._model(model)
        search_layers(info, [layer])
        from latentlens.scan import normalize_queries

        return self._search_layer(info, layer, normalize_queries(vectors, info.hidden_size, info.name),
                                  k, exact, ef_search)

    def _search_layer(
        self, info: ModelInfo, layer: int, q: torch.Tensor, k: int, exact: bool | None, ef_search: int | None
    ) -> KnnResult:
        li = info.layer(layer)
        use_ann = not exact and li.index_kind is not None and self.store.ann_supported()
        if not use_ann:
            self.last_modes[layer] = "scan"
            return self.scan.search(info, layer, q, k, version=(li.row_count, li.version))
        res = self.store.knn(info, layer, q.numpy(), k, ef_search=ef_search)
        self.last_modes[layer] = "ann"
        if exact is None:
            low = np.flatnonzero(~(res.similarity[:, 0] >= self.ood_threshold))
            if len(low):
                self.last_modes[layer] = "ann+scan" if len(low) < len(q) else "scan"
                fix = self.scan.search(info, layer, q[low], k, version=(li.row_count, li.version))
                for name in ("similarity", "sentence_id", "position", "token_id"):
                    getattr(res, name)[low] = getattr(fix, name)
        return res

    def _assemble(
        self, info: ModelInfo, by_layer: dict[int, KnnResult], k: int, per_layer: bool, nq: int
    ) -> list[QueryResult]:
        layers = sorted(by_layer)
        sims = np.stack([by_layer[x].similarity for x in layers])  # [L, Q, k]
        flat = sims.transpose(1, 0, 2).reshape(nq, -1)  # [Q, L*k]
        order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
        wanted: set[tuple[int, int, int]] = set()
        picks: list[list[tuple[int, int]]] = []
        for qi in range(nq):
            row = []
            for j in order[qi]:
                li, r = divmod(int(j), k)
                if np.isfinite(flat[qi, j]):
                    row.append((li, r))
                    res = by_layer[layers[li]]
                    wanted.add((layers[li], int(res.sentence_id[qi, r]), int(res.position[qi, r])))
            picks.append(row)
        if per_layer:
            for layer in layers:
                res = by_layer[layer]
                ok = np.isfinite(res.similarity)
                for qi, r in zip(*np.nonzero(ok), strict=True):
                    wanted.add((layer, int(res.sentence_id[qi, r]), int(res.position[qi, r])))
        ctx = self.store.contexts(info, sorted(wanted))

        def neighbour(layer: int, qi: int, r: int) -> Neighbour:
            res = by_layer[layer]
            key = (layer, int(res.sentence_id[qi, r]), int(res.position[qi, r]))
            c = ctx.get(key)
            return Neighbour(
                token=c.token if c else None, token_id=int(res.token_id[qi, r]),
                similarity=float(res.similarity[qi, r]), layer=layer, sentence_id=key[1],
                sentence=c.sentence if c else "", position=key[2],
                char_start=c.char_start if c else None, char_end=c.char_end if c else None,
            )

        out = []
        for qi in range(nq):
            ns = [neighbour(layers[li], qi, r) for li, r in picks[qi]]
            pl = None
            if per_layer:
                pl = {
                    layer: [neighbour(layer, qi, r) for r in range(k) if np.isfinite(by_layer[layer].similarity[qi, r])]
                    for layer in layers
                }
            out.append(QueryResult(index=qi, neighbours=ns, per_layer=pl))
        return out

    # ---- text -------------------------------------------------------------

    def language_model(self, model: str | ModelInfo) -> Any:
        """The stored model, loaded once per Lens (torch and transformers imported here only)."""
        info = self._model(model)
        lm = self._models.get(info.name)
        if lm is None:
            try:
                from latentlens.models import load_from_store
            except ImportError as e:
                raise InputError(f"running models needs the model adapters (latentlens.models): {e}") from e
            lm = self._models[info.name] = load_from_store(info)
        return lm

    def hidden_states(self, model: str | ModelInfo, text: str | Sequence[str], layers: Sequence[int] | None = None):
        """Run the stored model on ``text``: a TextStates (token_ids, tokens, spans, vectors {layer: [T, D]}).

        A list of texts gives a list of TextStates.
        """
        info = self._model(model)
        if layers is None:
            layers = info.layer_numbers or list(range(info.num_layers + 1))
        bad = [x for x in layers if x < 0 or x > info.num_layers]
        if bad:
            raise UnknownLayer(f"layer {bad[0]} is out of range for '{info.name}' (0 .. {info.num_layers})")
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
        exact: bool | None = None,
        ef_search: int | None = None,
    ) -> list[QueryResult]:
        """Neighbours of each token of ``text`` (or those matching ``token``), at each query layer.

        ``query_layers`` picks which hidden states of the text are used (default:
        every stored layer); results come grouped by query layer, then token.
        """
        info = self._model(model)
        if query_layers is None:
            query_layers = info.layer_numbers
            if not query_layers:
                raise EmptyResult(f"model '{info.name}' has no stored layers yet: run `llens ingest`")
        st = self.hidden_states(info, text, query_layers)
        positions = select_tokens(st.tokens, st.spans, text, token)
        results: list[QueryResult] = []
        # one search per stored layer for all (query layer, token) vectors
        qvecs = np.concatenate([np.asarray(st.vectors[ql], dtype=np.float32)[positions] for ql in query_layers])
        found = self.neighbors(qvecs, info, layers=layers, k=k, per_layer=per_layer, exact=exact,
                               ef_search=ef_search)
        i = 0
        for ql in query_layers:
            for p in positions:
                r = found[i]
                r.index, r.query_token, r.query_layer = int(p), st.tokens[p], int(ql)
                results.append(r)
                i += 1
        return results

    # ---- output -------------------------------------------------------------

    @staticmethod
    def to_dataframe(results: Sequence[QueryResult]):
        """One row per (query, neighbour) as a pandas DataFrame."""
        try:
            import pandas as pd
        except ImportError as e:
            raise InputError("to_dataframe needs pandas: pip install pandas") from e
        return pd.DataFrame(flat_rows(results))


def search_layers(info: ModelInfo, layers: Sequence[int] | None) -> list[int]:
    """Validate the chosen stored layers (default: all with rows); clear errors naming what exists."""
    have = ", ".join(f"{li.layer} ({li.row_count} rows)" for li in info.layers) or "none"
    if info.row_count == 0:
        raise EmptyResult(f"model '{info.name}' has no rows yet (stored layers: {have}): run `llens ingest`")
    if layers is None:
        return [li.layer for li in info.layers if li.row_count > 0]
    chosen = sorted(set(int(x) for x in layers))
    if not chosen:
        raise InputError("no layers chosen")
    for layer in chosen:
        if info.layer(layer).row_count == 0:
            raise EmptyResult(f"layer {layer} of model '{info.name}' has no rows (stored layers: {have})")
    return chosen


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
    """(query, neighbour) rows: the CSV / DataFrame form."""
    rows = []
    for r in results:
        groups = [(None, r.neighbours)]
        if r.per_layer is not None:
            groups = list(r.per_layer.items())
        for searched, ns in groups:
            for rank, n in enumerate(ns, 1):
                rows.append({
                    "query_index": r.index, "query_token": r.query_token, "query_layer": r.query_layer,
                    "searched_layer": searched, "rank": rank, **n.to_dict(),
                })
    return rows




def load_vectors(path: str, key: str | None = None) -> np.ndarray:
    """Query vectors [N, D] or [D] from .npy, .pt/.pth (weights_only) or .safetensors.

    A file holding several arrays needs ``key`` (the error lists the keys).
    """
    from pathlib import Path

    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arrays: Any = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        elif suffix in (".pt", ".pth", ".bin"):
            import torch

            try:
                arrays = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 (any unpickling failure is a bad file)
                raise InputError(f"cannot read {p} as a weights-only torch file: {str(e).splitlines()[0]}") from None
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            arrays = load_file(str(p))
        else:
            raise InputError(f"unknown vector file type '{suffix}' (use .npy, .npz, .pt or .safetensors)")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read vectors from {p}: {e}") from None
    if isinstance(arrays, dict):
        names = sorted(str(n) for n in arrays)
        if key is None and len(arrays) == 1:
            key = names[0]
        if key is None or key not in arrays:
            raise InputError(f"{p} holds several arrays: choose one with --key ({', '.join(names)})")
        arrays = arrays[key]
    if hasattr(arrays, "detach"):
        arrays = arrays.detach().float().cpu().numpy()
    if not isinstance(arrays, np.ndarray):
        raise InputError(f"{p} does not hold an array or tensor (found {type(arrays).__name__})")
    if arrays.ndim not in (1, 2):
        raise InputError(f"{p} holds an array of shape {arrays.shape}: expected [N, D] or [D]")
    return arrays.astype(np.float32, copy=False)


__all__ = [
    "Lens", "Neighbour", "QueryResult", "flat_rows", "load_vectors", "search_layers", "select_tokens",
]
