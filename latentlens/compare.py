"""Two views of one image side by side: two visual layers, two methods, or two models.

Per patch of the left view: each side's top-k words and their overlap (the
words both lists hold, compared as lower-cased whole words; LatentLens lists
are distinct contexts, so a word found in two text layers counts once). Two
models rarely share a grid: the right patch is the queried one whose box
holds the left patch's centre, else the nearest by centre.

compare.html is one offline file like report.html: the image with the left
view's grid, each cell shaded and labelled by its overlap; hover or click a
patch for the two lists, shared words marked. ``#patch=IDX`` selects one.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from latentlens.errors import InputError
from latentlens.report import METHOD_NAMES, _asset, _image_data_uri, _script_json, result_methods
from latentlens.vlm.query import ImageQueryResult, PatchResult


@dataclass
class Side:
    """One view: a result's visual layer read through one method."""

    result: ImageQueryResult
    visual_layer: int
    method: str = "latentlens"

    @property
    def label(self) -> str:
        where = " (projector output)" if self.visual_layer == 0 else ""
        return (f"{self.result.model} \u00b7 visual layer {self.visual_layer}{where} \u00b7 "
                f"{METHOD_NAMES.get(self.method, self.method)}")

    def check(self) -> Side:
        self.result.layer(self.visual_layer)  # raises InputError naming the layers there are
        if self.method not in result_methods(self.result):
            raise InputError(f"method '{self.method}' is not in the result of {self.result.model} "
                             f"(have: {', '.join(result_methods(self.result))})")
        return self


@dataclass
class PatchPair:
    patch_idx: int
    row: int
    col: int
    box: tuple[float, float, float, float]
    right_patch: int | None  # the right view's patch (another model: another grid)
    left: list[dict]
    right: list[dict]
    shared: list[str] = field(default_factory=list)

    @property
    def overlap(self) -> int:
        return len(self.shared)

    def to_dict(self) -> dict:
        return {"patch_idx": self.patch_idx, "row": self.row, "col": self.col, "box": list(self.box),
                "right_patch": self.right_patch, "left": self.left, "right": self.right, "shared": self.shared,
                "overlap": self.overlap}


@dataclass
class Comparison:
    left: Side
    right: Side
    k: int
    pairs: list[PatchPair]

    @property
    def grids(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(rows, cols) of visual tokens of view A's and view B's result."""
        return ((int(self.left.result.grid[0]), int(self.left.result.grid[1])),
                (int(self.right.result.grid[0]), int(self.right.result.grid[1])))

    @property
    def grid_note(self) -> str | None:
        """What to say where the two views have different grids (two models), else None."""
        (ar, ac), (br, bc) = self.grids
        if (ar, ac) == (br, bc):
            return None
        return (f"A's grid is {ar}x{ac} visual tokens, B's {br}x{bc}: B's list for a patch is that of B's patch "
                "under its centre.")

    @property
    def mean_overlap(self) -> float:
        """Mean shared words per compared patch (0..k)."""
        done = [p.overlap for p in self.pairs if p.left and p.right]
        return sum(done) / len(done) if done else 0.0

    def to_dict(self) -> dict:
        return {"left": self.left.label, "right": self.right.label, "k": self.k,
                "grids": [list(g) for g in self.grids], "mean_overlap": round(self.mean_overlap, 4), "patches": [p.to_dict() for p in self.pairs]}


def norm_word(word: str) -> str:
    return " ".join(word.split()).lower()


def top_words(p: PatchResult, method: str, k: int) -> list[dict]:
    """One patch's top-k under one method: {word, score[, layers]} (LatentLens: distinct contexts)."""
    if method == "latentlens":
        return [{"word": n.word, "score": round(float(n.similarity), 5), "layers": list(n.found_in or [n.layer])}
                for n in p.distinct()[:k]]
    return [{"word": h.word, "score": float(f"{float(h.score):.5g}")} for h in (p.lenses or {}).get(method, [])[:k]]


def shared_words(left: Sequence[dict], right: Sequence[dict]) -> list[str]:
    """Words in both lists, in the left list's order, each once."""
    have = {norm_word(h["word"]) for h in right}
    return list(dict.fromkeys(w for h in left if (w := norm_word(h["word"])) in have and w))


def _match(left: Sequence[PatchResult], right: Sequence[PatchResult], same_grid: bool) -> list[PatchResult | None]:
    if same_grid:
        by_idx = {p.patch_idx: p for p in right}
        return [by_idx.get(p.patch_idx) for p in left]
    out: list[PatchResult | None] = []
    for p in left:
        cx, cy = (p.box[0] + p.box[2]) / 2, (p.box[1] + p.box[3]) / 2
        inside = [q for q in right if q.box[0] <= cx < q.box[2] and q.box[1] <= cy < q.box[3]]
        if inside:
            out.append(inside[0])
            continue
        out.append(min(right, key=lambda q: math.hypot((q.box[0] + q.box[2]) / 2 - cx, (q.box[1] + q.box[3]) / 2 - cy),
                       default=None))
    return out


def paired_layer(layer: int, other: ImageQueryResult) -> int:
    """Another model's visual layer for ``layer``: the same number where its result has it, else its
    first (two models' layers differ in count; `llens report --compare` and the web app pair them so)."""
    return layer if layer in other.visual_layers else other.layers[0].visual_layer


def compare(left: Side, right: Side, k: int | None = None) -> Comparison:
    """Per left patch, both views' top-k words and the words they share (k: default the smaller result's k)."""
    left.check()
    right.check()
    k = k or min(left.result.k, right.result.k)
    if tuple(left.result.image_size) != tuple(right.result.image_size):
        raise InputError(f"the two results are of different images ({left.result.image_size[0]}x"
                         f"{left.result.image_size[1]} and {right.result.image_size[0]}x{right.result.image_size[1]})")
    lp = left.result.layer(left.visual_layer).patches
    rp = right.result.layer(right.visual_layer).patches
    same = left.result is right.result or (left.result.grid == right.result.grid
                                           and left.result.model == right.result.model)
    pairs = []
    for p, q in zip(lp, _match(lp, rp, same)):
        a = top_words(p, left.method, k)
        b = top_words(q, right.method, k) if q is not None else []
        pairs.append(PatchPair(p.patch_idx, p.row, p.col, tuple(float(x) for x in p.box),  # type: ignore[arg-type]
                               q.patch_idx if q is not None else None, a, b, shared_words(a, b)))
    return Comparison(left, right, k, pairs)


def parse_pair(spec: str, what: str) -> tuple[str, str]:
    """"A,B" -> (A, B): the two visual layers or methods of a comparison."""
    parts = [x.strip() for x in (spec or "").split(",") if x.strip()]
    if len(parts) != 2:
        raise InputError(f"{what}: give two, as A,B (got {spec!r})")
    return parts[0], parts[1]


def render_compare_html(comp: Comparison, img: Any, *, title: str | None = None) -> str:
    """compare.html: the left view's grid over the image, shaded by overlap; a patch's two lists side by side."""
    res = comp.left.result
    title = title or f"LatentLens comparison: {comp.left.label} vs {comp.right.label}"
    data = {"image_size": list(res.image_size), "k": comp.k, "left": comp.left.label, "right": comp.right.label,
            "patches": [p.to_dict() for p in comp.pairs]}
    e = html.escape
    compared = sum(1 for p in comp.pairs if p.left and p.right)
    summary = (f"{len(comp.pairs)} patches of a {res.image_size[0]}x{res.image_size[1]} image; per patch the top "
               f"{comp.k} words of each view and the words they share (mean {comp.mean_overlap:.2f} of {comp.k} "
               f"over {compared} patches).")
    if comp.grid_note:
        summary += " " + comp.grid_note
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>
{_asset("report.css")}
{_asset("compare.css")}
</style>
</head>
<body>
<header>
<h1>{e(title)}</h1>
<p id="summary"><span class="side-a">A</span> {e(comp.left.label)} &nbsp; <span class="side-b">B</span>
{e(comp.right.label)}.<br>{e(summary)}</p>
</header>
<div class="layout">
<div class="figure" id="figure">
<img id="image" alt="input image" src="{_image_data_uri(img)}">
<div id="overlay"></div>
</div>
<aside id="panel" aria-live="polite"></aside>
</div>
<div class="legend" id="legend">
<strong>Legend.</strong>
<ul>
<li>Each cell is a patch of view A; its label and shading: how many of its top {comp.k} words view B's list
for the same place holds too (another model's grid: B's patch under A's patch centre).</li>
<li>Words are compared as lower-cased whole words; LatentLens lists hold each context once, with the text
layers it was found in.</li>
<li>Link to a patch with <code>#patch=IDX</code>.</li>
</ul>
</div>
<script type="application/json" id="llens-data">{_script_json(data)}</script>
<script>
{_asset("compare.js")}
</script>
</body>
</html>
"""


def write_compare(comp: Comparison, img: Any, out_dir: Any, *, title: str | None = None) -> Any:
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.html"
    path.write_text(render_compare_html(comp, img, title=title), encoding="utf-8")
    return path
