"""What each image patch means: visual tokens searched in the contextual index.

The index must come from the SAME vision-language model's language model
(``llens ingest <vlm> corpus.txt`` stores it under the VLM's name): visual
tokens live in that LLM's hidden space, nowhere else.

For every visual layer v (0 = projector output, l = hidden_states[l] at the
image tokens) each selected patch's vector is searched in the chosen stored
text layers and the per-layer top-k lists merge by cosine, like a text
query (latentlens.query.Lens.neighbors). All visual layers and patches go in
one search call: one scan per stored layer, whatever the grid size.

``methods`` adds the baselines (LogitLens, EmbeddingLens) for the same
visual tokens; they need only the VLM, so with LatentLens left out no store
is read (``lens`` may be None and ``model`` any loadable VLM).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from latentlens.errors import EmptyResult, InputError, ModelMismatch, UnknownModel
from latentlens.lenses import VOCAB_METHODS, VocabHit, parse_methods, token_text
from latentlens.store.types import check_k, check_layer_range
from latentlens.vlm.geometry import Patch

if TYPE_CHECKING:
    from latentlens.query import Lens, Neighbour
    from latentlens.search import Mode
    from latentlens.vlm.base import VisionLanguageModel


@dataclass
class PatchResult:
    patch_idx: int
    row: int
    col: int
    box: tuple[float, float, float, float]
    neighbours: list[Neighbour]
    search: dict[int, str] | None = None  # searched layer -> path that answered
    lenses: dict[str, list[VocabHit]] | None = None  # baseline method -> top-k vocabulary tokens
    contexts: list[Neighbour] | None = None  # top-k distinct contexts (latentlens.query.distinct_contexts)

    def distinct(self) -> list[Neighbour]:
        """What tables and the report show: each context once, with the layers it was found in."""
        if self.contexts is not None:
            return self.contexts
        from latentlens.query import distinct_contexts

        return distinct_contexts(self.neighbours)

    def words(self, method: str = "latentlens", k: int | None = None) -> list[str]:
        """The top-k words of one method, as a judge reads them (whole words, in rank order)."""
        if method == "latentlens":
            ws = [n.word for n in self.neighbours]
        else:
            ws = [h.word for h in (self.lenses or {}).get(method, [])]
        return ws[:k] if k is not None else ws

    def to_dict(self) -> dict:
        d = {
            "patch_idx": self.patch_idx, "row": self.row, "col": self.col, "box": list(self.box),
            "neighbours": [n.to_dict() for n in self.neighbours],
            "search": None if self.search is None else {str(x): p for x, p in self.search.items()},
        }
        if self.contexts is not None:
            d["contexts"] = [n.to_dict() for n in self.contexts]
        if self.lenses is not None:
            d["lenses"] = {m: [h.to_dict() for h in hits] for m, hits in self.lenses.items()}
        return d


@dataclass
class VisualLayerResult:
    visual_layer: int
    patches: list[PatchResult]

    def to_dict(self) -> dict:
        return {"visual_layer": self.visual_layer, "patches": [p.to_dict() for p in self.patches]}


@dataclass
class ImageQueryResult:
    """Neighbours of the selected patches of one image, per visual layer."""

    model: str
    image_size: tuple[int, int]  # (w, h) of the original image
    grid: tuple[int, int]  # (rows, cols) of visual tokens
    layers: list[VisualLayerResult]
    prompt: str = ""
    searched_layers: list[int] = field(default_factory=list)
    k: int = 5
    canvas_size: tuple[int, int] | None = None  # (w, h) the vision tower saw
    patches: list[Patch] = field(default_factory=list)  # the whole grid, selected or not
    methods: list[str] = field(default_factory=lambda: ["latentlens"])
    provenance: dict | None = None

    def layer(self, visual_layer: int) -> VisualLayerResult:
        for vl in self.layers:
            if vl.visual_layer == visual_layer:
                return vl
        have = ", ".join(str(v.visual_layer) for v in self.layers)
        raise InputError(f"visual layer {visual_layer} is not in this result (have: {have})")

    @property
    def visual_layers(self) -> list[int]:
        return [vl.visual_layer for vl in self.layers]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "image_size": list(self.image_size),
            "grid": list(self.grid),
            "canvas_size": list(self.canvas_size) if self.canvas_size else None,
            "prompt": self.prompt,
            "k": self.k,
            "methods": list(self.methods),
            "provenance": self.provenance,
            "searched_layers": list(self.searched_layers),
            "grid_patches": [[p.idx, p.row, p.col, *p.box] for p in self.patches],
            "layers": [vl.to_dict() for vl in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ImageQueryResult:
        """The inverse of ``to_dict`` (a saved analysis renders without the model)."""
        from latentlens.lenses import VocabHit
        from latentlens.query import Neighbour

        def neighbour(n: dict) -> Neighbour:
            return Neighbour(**{k: v for k, v in n.items() if k != "word"})

        layers = [
            VisualLayerResult(vl["visual_layer"], [
                PatchResult(
                    p["patch_idx"], p["row"], p["col"], tuple(p["box"]),
                    [neighbour(n) for n in p["neighbours"]],
                    {int(k): v for k, v in p["search"].items()} if p.get("search") else None,
                    {m: [VocabHit(h["token"], h["token_id"], h["score"]) for h in hits]
                     for m, hits in p["lenses"].items()} if p.get("lenses") else None,
                    [neighbour(n) for n in p["contexts"]] if p.get("contexts") is not None else None,
                ) for p in vl["patches"]
            ]) for vl in d["layers"]
        ]
        return cls(
            model=d["model"], image_size=tuple(d["image_size"]), grid=tuple(d["grid"]), layers=layers,
            prompt=d.get("prompt", ""), searched_layers=list(d.get("searched_layers", [])), k=d.get("k", 5),
            canvas_size=tuple(d["canvas_size"]) if d.get("canvas_size") else None,
            patches=[Patch(int(g[0]), int(g[1]), int(g[2]), tuple(g[3:7])) for g in d.get("grid_patches", [])],
            methods=list(d.get("methods", ["latentlens"])), provenance=d.get("provenance"),
        )

    def table_rows(self, *, distinct: bool = False, sentence: Any = None) -> list[dict]:
        """One row per (visual layer, patch, method, neighbour), the sentence with the token in [[ ]].

        Baseline rows hold the vocabulary token's score in ``similarity``
        (probability for logitlens, cosine for embeddinglens) and no sentence.
        ``distinct``: each context once (``layer`` lists every layer it was
        found in, ``similarity`` is its best); ``sentence``: how a neighbour's
        sentence is written (default: marked with [[ ]], whole).
        """
        rows = []
        for vl in self.layers:
            for p in vl.patches:
                at = {"visual_layer": vl.visual_layer, "patch": p.patch_idx, "row": p.row, "col": p.col}
                for rank, n in enumerate(p.distinct() if distinct else p.neighbours, 1):
                    layer: Any = n.layer
                    if distinct:
                        layer = ",".join(str(x) for x in (n.found_in or [n.layer]))
                    rows.append({
                        **at, "method": "latentlens", "rank": rank, "token": word_of(n), "word": n.word,
                        "similarity": n.similarity, "layer": layer,
                        "sentence": sentence(n) if sentence else n.marked_sentence(),
                    })
                for method, hits in (p.lenses or {}).items():
                    for rank, h in enumerate(hits, 1):
                        rows.append({**at, "method": method, "rank": rank, "token": h.word, "word": h.word,
                                     "similarity": h.score, "layer": None, "sentence": ""})
        return rows


TABLE_COLUMNS = ("visual_layer", "patch", "row", "col", "method", "rank", "token", "word", "similarity",
                 "layer", "sentence")


def word_of(n: Neighbour) -> str:
    """The matched token as it reads in its sentence (falls back to the vocab token)."""
    if n.char_start is not None and n.char_end is not None and n.char_end > n.char_start:
        text = n.sentence[n.char_start: n.char_end].strip()
        if text:
            return text
    return token_text(n.token)


_PAIR = re.compile(r"^\s*(-?\d+)\s*,\s*(-?\d+)\s*$")


def parse_patches(spec: str | Sequence[int] | None) -> str | list[tuple[int, int]] | list[int]:
    """Check a --patches value before any model runs: "all", "center", [(r, c)...] or [idx...]."""
    if spec is None:
        return "all"
    if isinstance(spec, str):
        word = spec.strip().lower()
        if word in ("", "all"):
            return "all"
        if word in ("center", "centre"):
            return "center"
        pairs = []
        for part in spec.split(";"):
            if not part.strip():
                continue
            m = _PAIR.match(part)
            if not m:
                raise InputError(f"bad patch {part.strip()!r}: use 'all', 'center' or 'row,col;row,col'")
            pairs.append((int(m.group(1)), int(m.group(2))))
        if not pairs:
            raise InputError("no patches selected")
        return pairs
    return [int(i) for i in spec]


def select_patches(
    spec: str | Sequence[int] | None, grid: tuple[int, int], *, sample: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Patch indices (row-major) for ``spec``: "all", "center", "r,c;r,c" or a list of indices.

    "center" is the patch(es) nearest the canvas centre: 1, 2 or 4 of them.
    ``sample`` then keeps N of those at random (``seed`` makes it repeatable).
    """
    rows, cols = grid
    n = rows * cols
    parsed = parse_patches(spec)
    if parsed == "all":
        chosen = list(range(n))
    elif parsed == "center":
        rs = sorted({(rows - 1) // 2, rows // 2})
        cs = sorted({(cols - 1) // 2, cols // 2})
        chosen = [r * cols + c for r in rs for c in cs]
    elif parsed and isinstance(parsed[0], tuple):
        chosen = []
        for r, c in cast("list[tuple[int, int]]", parsed):  # parse_patches never mixes pairs and indices
            if not (0 <= r < rows and 0 <= c < cols):
                raise InputError(f"patch {r},{c} is outside the {rows}x{cols} grid (rows 0..{rows - 1}, cols 0..{cols - 1})")
            chosen.append(r * cols + c)
    else:
        chosen = list(cast("list[int]", parsed))
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise InputError(f"patch index {bad[0]} is outside the {rows}x{cols} grid (0..{n - 1})")
    chosen = sorted(dict.fromkeys(chosen))
    if not chosen:
        raise InputError("no patches selected")
    if sample is not None:
        if sample < 1:
            raise InputError("--sample must be at least 1")
        if sample < len(chosen):
            chosen = sorted(random.Random(seed).sample(chosen, sample))
    return chosen


def query_image(
    lens: Lens | None,
    model: str,
    image: Any,
    *,
    visual_layers: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    k: int = 5,
    patches: str | Sequence[int] | None = "all",
    sample: int | None = None,
    seed: int = 0,
    prompt: str | None = None,
    resolution: int | str | tuple[int, int] | None = None,
    mode: Mode = "auto",
    exact: bool | None = None,
    device: str | None = None,
    dtype: str = "float32",
    vlm: VisionLanguageModel | None = None,
    methods: str | Sequence[str] = ("latentlens",),
) -> ImageQueryResult:
    """Nearest contextual neighbours (and/or the baselines) of an image's visual tokens.

    ``model`` names both the stored index and the VLM to load (pass ``vlm``
    to reuse a loaded one). ``visual_layers`` default to the model's stored
    layers; ``layers`` (the stored layers searched) default to all of them.
    """
    from latentlens.vlm.base import DEFAULT_PROMPT
    from latentlens.vlm.extract import extract_visual_tokens, load_image

    k = check_k(k)
    methods = parse_methods(methods)
    latent = "latentlens" in methods
    if latent and lens is None:
        raise InputError("LatentLens needs the store: pass a Lens")
    info = None
    if lens is not None:
        try:
            info = lens.store.get_model(model)
        except UnknownModel:
            if latent:
                raise
    searched: list[int] = []
    if latent:
        assert info is not None  # a Lens was given and get_model either found the model or raised
        if info.row_count == 0:
            raise EmptyResult(f"model '{info.name}' has no rows yet: run `llens ingest {info.name} corpus.txt`")
        from latentlens.search import validate_layers

        searched = validate_layers(info, layers)  # fail fast, before loading the VLM
    if visual_layers is None:
        if info is None:
            raise InputError(f"'{model}' is not in the store: choose the visual layers (--visual-layers)")
        visual_layers = info.layer_numbers
    if not list(visual_layers):
        raise InputError("no visual layers chosen")
    if info is not None:
        visual_layers = check_layer_range(visual_layers, info.num_layers, info.name, visual=True)
    if vlm is None and info is not None:
        info.require_source()  # imported without --source: its name is no checkpoint to load
    parse_patches(patches)  # a typo fails before the model loads
    if sample is not None and sample < 1:
        raise InputError("--sample must be at least 1")
    img = load_image(image)
    vlm = vlm or load_vlm_for(info, model, dtype=dtype, device=device)
    if info is not None and (vlm.hidden_size != info.hidden_size or vlm.num_layers != info.num_layers):
        raise ModelMismatch(
            f"the stored '{info.name}' has hidden size {info.hidden_size} and {info.num_layers} layers, "
            f"the loaded VLM's language model {vlm.hidden_size} and {vlm.num_layers}: "
            "ingest the VLM itself (its text side) under this name"
        )
    visual_layers = check_layer_range(visual_layers, vlm.num_layers, vlm.name or model, visual=True)
    vt = extract_visual_tokens(vlm, img, layers=visual_layers, prompt=prompt or DEFAULT_PROMPT,
                               resolution=resolution)
    chosen = select_patches(patches, vt.grid, sample=sample, seed=seed)
    out, provenance = describe_patches(lens, info, vlm, vt, chosen, visual_layers, searched=searched, k=k,
                                       mode=mode, exact=exact, methods=methods)
    return ImageQueryResult(
        model=info.name if info is not None else model, image_size=img.size, grid=vt.grid, layers=out,
        prompt=vt.prompt, searched_layers=searched, k=k, canvas_size=vt.canvas_size, patches=vt.patches,
        methods=methods, provenance=provenance,
    )


def describe_patches(
    lens: Lens | None, info: Any, vlm: VisionLanguageModel, vt: Any, chosen: Sequence[int],
    visual_layers: Sequence[int], *, searched: Sequence[int], k: int, mode: Mode = "auto",
    exact: bool | None = None, methods: Sequence[str] = ("latentlens",),
) -> tuple[list[VisualLayerResult], dict | None]:
    """Each method's top-k for the ``chosen`` patches of extracted visual tokens ``vt``, per visual
    layer, and the answer's provenance (the search's, or the model's alone for the baselines).

    All visual layers and patches go in one LatentLens search (exact: visual
    tokens are out of distribution for HNSW); the baselines read the same vectors.
    """
    from latentlens.lenses import VocabularyLens

    found = None
    if "latentlens" in methods:
        if lens is None:
            raise InputError("LatentLens needs the store: pass a Lens")
        queries = np.concatenate([vt.vectors[v][list(chosen)] for v in visual_layers])
        found = lens.neighbors(queries, info.name, layers=list(searched), k=k, mode=mode, exact=exact,
                               query_kind="visual")
    vocab = [m for m in methods if m in VOCAB_METHODS]
    out: list[VisualLayerResult] = []
    for i, v in enumerate(visual_layers):
        extra = VocabularyLens.of(vlm).methods(vocab, vt.vectors[v][list(chosen)], v, k) if vocab else None
        vl_patches = []
        for j, p in enumerate(chosen):
            r = found[i * len(chosen) + j] if found is not None else None
            patch = vt.patches[p]
            vl_patches.append(PatchResult(
                patch.idx, patch.row, patch.col, patch.box, r.neighbours if r else [],
                r.search if r else None, extra[j] if extra else None, r.contexts if r else None,
            ))
        out.append(VisualLayerResult(v, vl_patches))
    if found:
        return out, found[0].provenance
    from latentlens.query import baseline_provenance

    return out, baseline_provenance(vlm)


def load_vlm_for(info: Any, model: str, *, dtype: str, device: str | None) -> VisionLanguageModel:
    """The VLM ``llens ingest`` recorded for ``info`` (a local dir is stored under its name), or ``model``."""
    from latentlens.vlm.extract import load_vlm

    if info is None:
        return load_vlm(model, dtype=dtype, device=device)
    info.require_source()
    source, revision = info.checkpoint()
    return load_vlm(source, dtype=dtype, device=device, revision=revision)
