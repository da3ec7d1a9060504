"""A visual report of an image query: an interactive HTML page and a PNG figure.

report.html is one self-contained file (image as base64, CSS, JS and data
inline; no network): the patch grid over the image, a visual-layer selector,
a tab per method of the result (LatentLens, LogitLens, EmbeddingLens), and per
patch that method's top-k: LatentLens neighbours with the matched token
highlighted in its sentence, the baselines' vocabulary tokens with their
probability (LogitLens) or cosine (EmbeddingLens).
``#patch=IDX&layer=V&method=M`` in the URL selects a view, so a link (or a
headless browser) can open it.

report.png is the image with each patch's top-1 word of one method on a dark
box, for papers and slides, and under it a line naming the model, the visual
layer and the method it shows (the PNG's Title and Description text chunks say
it too); on dense grids the most confident patches are labelled first and a
label that would overlap one already drawn is skipped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from latentlens.errors import InputError
from latentlens.lenses import SCORES, VOCAB_METHODS
from latentlens.vlm.geometry import Patch, as_box
from latentlens.vlm.query import ImageQueryResult, PatchResult, VisualLayerResult

METHOD_NAMES = {"latentlens": "LatentLens", "logitlens": "LogitLens", "embeddinglens": "EmbeddingLens"}

MAX_PNG_SIDE = 2048
MAX_HTML_IMAGE_SIDE = 1600
MIN_LABEL_CELL = 72  # upscale small images so a cell is at least this wide in the PNG
MAX_WORD_CHARS = 14


def write_report(
    result: ImageQueryResult, image: Any, out_dir: str | Path, *, png_layer: int | None = None,
    title: str | None = None, png_method: str | None = None,
) -> dict[str, Path]:
    """Write report.html and report.png into ``out_dir``; return their paths.

    ``png_method`` picks the method whose top-1 words label report.png
    (default: the first of ``result.methods`` that has any).
    """
    from latentlens.images import load_image

    img = load_image(image)
    if img.size != tuple(result.image_size):
        raise InputError(
            f"the image is {img.size[0]}x{img.size[1]} but the result was computed on a "
            f"{result.image_size[0]}x{result.image_size[1]} image"
        )
    if not result.layers:
        raise InputError("the result has no visual layers to report")
    vl = result.layer(png_layer) if png_layer is not None else result.layers[0]
    png_method = _png_method(result, vl, png_method)  # a bad choice fails before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path = out / "report.html"
    png_path = out / "report.png"
    html_path.write_text(render_html(result, img, title=title), encoding="utf-8")
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()  # what the picture shows, for tools and file browsers too
    meta.add_text("Title", title or f"LatentLens: {result.model}")
    meta.add_text("Description", png_caption(result, vl, png_method))
    render_png(result, img, png_layer, png_method=png_method).save(png_path, format="PNG", optimize=True,
                                                                    pnginfo=meta)
    return {"html": html_path, "png": png_path}


# ---------------------------------------------------------------------------
# HTML


def result_methods(result: ImageQueryResult) -> list[str]:
    """The result's methods, plus any a hand-built result holds without listing them."""
    have = set(result.methods or ())
    for vl in result.layers:
        for p in vl.patches:
            if p.neighbours:
                have.add("latentlens")
            have.update((p.lenses or {}).keys())
    return [m for m in METHOD_NAMES if m in have] or ["latentlens"]


def report_data(result: ImageQueryResult) -> dict:
    """The compact JSON the page's script reads (each sentence stored once, by index).

    Per visual layer, ``patches`` holds the LatentLens neighbours as
    distinct contexts (``word``: the whole word the matched ``token`` sits
    in; ``layers``: every text layer the context was found in, ``similarity``
    its best cosine) and ``lenses`` each
    baseline's vocabulary tokens with their ``score`` (probability for
    logitlens, cosine for embeddinglens), both keyed by patch index.
    """
    methods = result_methods(result)
    vocab = [m for m in methods if m in VOCAB_METHODS]
    sentences: dict[str, int] = {}
    layers = []
    for vl in result.layers:
        patches = {
            str(p.patch_idx): [
                {"word": n.word, "token": n.token, "similarity": round(float(n.similarity), 5),
                 "layer": n.layer, "layers": list(n.found_in or [n.layer]),
                 "s": sentences.setdefault(n.sentence, len(sentences)),
                 "char_start": n.char_start, "char_end": n.char_end}
                for n in p.distinct()
            ]
            for p in vl.patches
        }
        lenses = {
            m: {
                str(p.patch_idx): [
                    {"word": h.word, "token": h.token, "token_id": h.token_id, "score": _round_score(h.score)}
                    for h in (p.lenses or {}).get(m, [])
                ]
                for p in vl.patches
            }
            for m in vocab
        }
        layers.append({"visual_layer": vl.visual_layer, "patches": patches, "lenses": lenses})
    return {
        "model": result.model, "image_size": list(result.image_size), "grid": list(result.grid),
        "k": result.k, "prompt": result.prompt, "searched_layers": list(result.searched_layers),
        "methods": methods, "method_names": {m: METHOD_NAMES[m] for m in methods},
        "scores": {m: SCORES[m] for m in methods},
        "grid_patches": [[p.idx, p.row, p.col, *p.box] for p in _grid(result)],
        "sentences": list(sentences),
        "layers": layers,
    }


def _round_score(x: float) -> float:
    # probabilities can be tiny: keep 5 significant digits, not 5 decimals
    return float(f"{float(x):.5g}")


def top_hits(p: PatchResult, method: str) -> list[tuple[str, float]]:
    """(word, score) of one patch under one method, best first."""
    if method == "latentlens":
        return [(n.word, float(n.similarity)) for n in p.distinct()]
    return [(h.word, float(h.score)) for h in (p.lenses or {}).get(method, [])]


def _grid(result: ImageQueryResult) -> list[Patch]:
    """Every patch of the grid; a result built by hand may only know the queried ones."""
    if result.patches:
        return list(result.patches)
    return [Patch(p.patch_idx, p.row, p.col, as_box(p.box)) for p in result.layers[0].patches]


def _script_json(obj: Any) -> str:
    # safe inside <script>: no "</script>", "<!--" or "&" can appear literally
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _image_data_uri(img: Image.Image) -> str:
    # the grid is drawn in percentages, so a smaller copy keeps the file small
    if max(img.size) > MAX_HTML_IMAGE_SIDE:
        img = img.copy()
        img.thumbnail((MAX_HTML_IMAGE_SIDE, MAX_HTML_IMAGE_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if img.width * img.height > 256 * 256:
        img.save(buf, format="JPEG", quality=90)
        mime = "image/jpeg"
    else:
        img.save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _asset(name: str) -> str:
    # one part per joinpath: Python 3.10's Traversable takes one
    return (resources.files("latentlens") / "report_assets" / name).read_text(encoding="utf-8")


def render_html(result: ImageQueryResult, img: Image.Image, *, title: str | None = None) -> str:
    rows, cols = result.grid
    queried = len(result.layers[0].patches)
    methods = result_methods(result)
    title = title or f"LatentLens: {result.model}"
    described = []
    for m in methods:
        if m == "latentlens":
            described.append(f"LatentLens (contextual neighbours from text layers "
                             f"{', '.join(str(x) for x in result.searched_layers) or '-'})")
        else:
            described.append(f"{METHOD_NAMES[m]} ({SCORES[m]})")
    subtitle = (
        f"{img.width}x{img.height} image, {rows}x{cols} visual tokens, {queried} queried; "
        f"visual layers {', '.join(str(v) for v in result.visual_layers)}; "
        f"top {result.k} of {', '.join(described)}"
    )
    prompt = f" Prompt: \u201c{result.prompt}\u201d." if result.prompt else ""
    method_list = ", ".join(methods)
    e = html.escape
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>
{_asset("report.css")}
</style>
</head>
<body>
<header>
<h1>{e(title)}</h1>
<p id="summary">{e(subtitle)}.{e(prompt)}</p>
</header>
<div class="controls">
<label>Layer <select id="layer" aria-label="visual layer"></select></label>
<div class="tabs" id="methods" role="tablist" aria-label="method"></div>
<label><input type="checkbox" id="show-words" checked> show top-1 words</label>
</div>
<div class="layout">
<div class="figure" id="figure">
<img id="image" alt="input image" src="{_image_data_uri(img)}">
<div id="overlay" data-rows="{rows}" data-cols="{cols}"></div>
</div>
<aside id="panel" aria-live="polite"></aside>
</div>
<div class="legend" id="legend">
<strong>Legend.</strong>
<ul>
<li>Each cell is one visual token (the image patch it covers in the original image).
Its label is its top-1 word under the selected method:
<strong>LatentLens</strong>, the nearest neighbour among the contextual token embeddings of the
language model&#8217;s text index (the whole word the matched token sits in);
<strong>LogitLens</strong>, the most probable next token after the model&#8217;s final norm and LM head;
<strong>EmbeddingLens</strong>, the input-embedding row with the highest cosine.</li>
<li><span class="swatch"></span> shading: the top-1 score (cosine, or probability for LogitLens),
from the lowest to the highest in this visual layer (LatentLens cosines of visual tokens typically
reach only 0.1&ndash;0.3).</li>
<li>Dashed cells were not queried (see <code>--patches</code> / <code>--sample</code>).</li>
<li>Visual layer 0 is the projector output as it enters the language model; layer <em>l</em>
is the language model&#8217;s hidden state after block <em>l</em> at the image-token positions.</li>
<li>In each neighbour&#8217;s sentence the matched token is <mark>highlighted</mark>.
Link to a view with <code>#patch=IDX&amp;layer=V&amp;method=M</code>
(M: {e(method_list)}).</li>
</ul>
</div>
<script type="application/json" id="llens-data">{_script_json(report_data(result))}</script>
<script>
{_asset("report.js")}
</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------
# PNG


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _short(word: str) -> str:
    word = " ".join(word.split())
    return word if len(word) <= MAX_WORD_CHARS else word[: MAX_WORD_CHARS - 1] + "\u2026"


def _png_method(result: ImageQueryResult, vl: VisualLayerResult, png_method: str | None) -> str:
    """``png_method`` checked, or the first of the result's methods with any words at ``vl``."""
    methods = result_methods(result)
    if png_method is not None:
        m = png_method.strip().lower()
        if m not in methods:
            raise InputError(f"method '{png_method}' is not in this result (have: {', '.join(methods)})")
        return m
    for m in methods:
        if any(top_hits(p, m) for p in vl.patches):
            return m
    return methods[0]


def render_png(result: ImageQueryResult, img: Image.Image, png_layer: int | None = None, *,
               png_method: str | None = None) -> Image.Image:
    """The image, upscaled so labels are legible, with each patch's top-1 word and a caption
    naming the method and visual layer those words come from.

    ``png_method`` picks the method (default: the first of the result's
    methods that has words at this layer, LatentLens when it was asked).
    """
    vl = result.layer(png_layer) if png_layer is not None else result.layers[0]
    method = _png_method(result, vl, png_method)
    w, h = img.size
    rows, cols = result.grid
    cell_w = w / max(cols, 1)
    scale = min(MAX_PNG_SIDE / max(w, h), max(1.0, MIN_LABEL_CELL / cell_w))
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = img.resize((out_w, out_h), Image.Resampling.LANCZOS) if scale != 1 else img.copy()
    canvas = canvas.convert("RGBA")
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    # faint grid over every visible patch
    for p in _grid(result):
        x0, y0, x1, y1 = (v * scale for v in p.box)
        if x1 > x0 and y1 > y0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255, 70), width=1)
    cell_h_px = out_h / max(rows, 1)
    size = int(max(10, min(28, 0.3 * min(cell_h_px, cell_w * scale))))
    font = _font(size)
    pad = max(2, size // 5)
    placed: list[tuple[float, float, float, float]] = []
    tops = [(p, hits[0]) for p in vl.patches if (hits := top_hits(p, method))]
    for pr, (word, _score) in sorted(tops, key=lambda t: -t[1][1]):
        x0, y0, x1, y1 = (v * scale for v in pr.box)
        if not (x1 > x0 and y1 > y0):
            continue
        text = _short(word)
        if not text:
            continue
        bx0, by0, bx1, by1 = draw.textbbox((0, 0), text, font=font)
        tw, th = bx1 - bx0, by1 - by0
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        box = (cx - tw / 2 - pad, cy - th / 2 - pad, cx + tw / 2 + pad, cy + th / 2 + pad)
        if any(_overlaps(box, q) for q in placed):
            continue
        placed.append(box)
        draw.rounded_rectangle(box, radius=pad, fill=(0, 0, 0, 178))
        draw.text((cx - tw / 2 - bx0, cy - th / 2 - by0), text, font=font, fill=(255, 255, 255, 255))
    return _with_caption(Image.alpha_composite(canvas, layer).convert("RGB"), png_caption(result, vl, method))


def png_caption(result: ImageQueryResult, vl: VisualLayerResult, method: str) -> str:
    """What report.png shows: whose words, from which visual layer (a figure cut out of its page must say)."""
    where = "projector output" if vl.visual_layer == 0 else f"LLM layer {vl.visual_layer}"
    what = f"{METHOD_NAMES.get(method, method)} top-1 word per patch"
    if method == "latentlens" and result.searched_layers:
        what += f" (text layers {','.join(str(x) for x in result.searched_layers)})"
    return f"{result.model} \u00b7 visual layer {vl.visual_layer} ({where}) \u00b7 {what}"


def _with_caption(img: Image.Image, text: str) -> Image.Image:
    """``img`` with a white band under it holding ``text``, wrapped at its " \u00b7 " parts to fit."""
    size = int(max(11, min(22, img.width / 60)))
    font = _font(size)
    pad = max(4, size // 2)
    room = img.width - 2 * pad
    probe = ImageDraw.Draw(img)
    lines: list[str] = []
    for part in text.split(" \u00b7 "):
        joined = f"{lines[-1]} \u00b7 {part}" if lines else part
        if lines and probe.textlength(joined, font=font) <= room:
            lines[-1] = joined
        else:
            lines.append(part)
    for i, line in enumerate(lines):  # a part wider than the image is cut
        if probe.textlength(line, font=font) > room:
            while len(line) > 8 and probe.textlength(line + "\u2026", font=font) > room:
                line = line[:-1]
            lines[i] = line.rstrip() + "\u2026"
    step = int(size * 1.3)
    out = Image.new("RGB", (img.width, img.height + 2 * pad + step * len(lines)), (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((pad, img.height + pad + i * step), line, font=font, fill=(40, 40, 40))
    return out


def _overlaps(a: tuple[float, ...], b: tuple[float, ...], margin: float = 1.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])
