"""Where each visual token sits in the original image.

An image processor maps the original image onto the model's input canvas by
padding, resizing and cropping; each of those steps is an axis-aligned affine
map (x' = sx * x + ox), so the whole chain is one ``Affine``. A visual token
covers a rectangle of that canvas (a ViT patch, or Qwen2-VL's 2x2 merged
patches); inverting the chain gives its box in original pixels, clipped to the
image (a token that only sees padding gets an empty box).

Pure python + numpy: no torch, no transformers, so it is easy to test.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from latentlens.errors import InputError


@dataclass(frozen=True)
class Affine:
    """x' = sx * x + ox, y' = sy * y + oy (original pixels -> canvas pixels)."""

    sx: float = 1.0
    sy: float = 1.0
    ox: float = 0.0
    oy: float = 0.0

    def then(self, other: Affine) -> Affine:
        """This map followed by ``other``."""
        return Affine(
            other.sx * self.sx, other.sy * self.sy,
            other.sx * self.ox + other.ox, other.sy * self.oy + other.oy,
        )

    def inverse_point(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.ox) / self.sx, (y - self.oy) / self.sy


def stretch(src: tuple[int, int], dst: tuple[int, int]) -> Affine:
    """Resize (w, h) -> (w', h') without keeping the aspect ratio."""
    return Affine(dst[0] / src[0], dst[1] / src[1])


@dataclass(frozen=True)
class Patch:
    """One visual token: its index among the image tokens, grid cell and box.

    ``box`` is (x0, y0, x1, y1) in original image pixels (x1/y1 exclusive),
    clipped to the image; zero area means the token only sees padding.
    """

    idx: int
    row: int
    col: int
    box: tuple[float, float, float, float]

    @property
    def visible(self) -> bool:
        x0, y0, x1, y1 = self.box
        return x1 > x0 and y1 > y0

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def as_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) as a tuple (a result read back from JSON holds lists)."""
    x0, y0, x1, y1 = box
    return x0, y0, x1, y1


def grid_patches(
    rows: int, cols: int, cell: tuple[float, float], transform: Affine, image_size: tuple[int, int]
) -> list[Patch]:
    """Row-major patches of a rows x cols grid of ``cell`` = (w, h) canvas cells."""
    w, h = image_size
    cw, ch = cell
    # Edges are computed once per grid line, so neighbouring boxes share edges exactly.
    xs = [_clip(transform.inverse_point(c * cw, 0)[0], w) for c in range(cols + 1)]
    ys = [_clip(transform.inverse_point(0, r * ch)[1], h) for r in range(rows + 1)]
    return [
        Patch(r * cols + c, r, c, (xs[c], ys[r], xs[c + 1], ys[r + 1]))
        for r in range(rows) for c in range(cols)
    ]


def _clip(v: float, hi: int) -> float:
    return round(min(max(v, 0.0), float(hi)), 3)


# ---------------------------------------------------------------------------
# CLIP-style processors (LLaVA): [pad to square] -> resize -> [center crop]


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def fixed_canvas_transform(
    original: tuple[int, int], image_size: tuple[int, int], processor: Any, canvas: tuple[int, int],
    resized: bool,
) -> Affine:
    """Original-image pixels -> the canvas (w, h) a fixed-canvas processor (SigLIP: Gemma 3,
    PaliGemma) made of an image of ``image_size``: clip_transform's chain, a stretch (warned)
    where the processor made another canvas than that chain predicts, and ``resized`` (the
    image was squashed from ``original`` by --resolution first) prepended."""
    transform, expected = clip_transform(image_size, processor)
    if expected != canvas:
        warnings.warn(f"expected a {expected[0]}x{expected[1]} canvas, got {canvas[0]}x{canvas[1]}: "
                      "assuming a stretch", stacklevel=3)
        transform = stretch(image_size, canvas)
    if resized:
        transform = stretch(original, image_size).then(transform)
    return transform


def clip_transform(
    image_size: tuple[int, int], processor: Any
) -> tuple[Affine, tuple[int, int]]:
    """The chain of a CLIPImageProcessor / LlavaImageProcessor; returns (map, canvas (w, h)).

    Mirrors transformers' rules: ``do_pad`` pads to a square centred on the
    long side first (LLaVA-1.5's "pad" aspect mode); ``size`` is either
    {shortest_edge} (aspect kept, long side truncated with int()) or
    {height, width}; ``center_crop`` takes the centred crop_size window
    (top = (h - ch) // 2), padding when the crop is larger.
    """
    w, h = image_size
    t = Affine()
    if _get(processor, "do_pad") and _is_pad_to_square(processor):
        side = max(w, h)
        # pad_to_square: start = (max_dim - short) // 2 on the short axis
        t = t.then(Affine(1, 1, (side - w) // 2 if w < side else 0, (side - h) // 2 if h < side else 0))
        w = h = side
    if _get(processor, "do_resize") is not False:
        size = _get(processor, "size")
        nw, nh = _resize_size((w, h), size, _get(processor, "default_to_square"))
        if (nw, nh) != (w, h):
            t = t.then(stretch((w, h), (nw, nh)))
            w, h = nw, nh
    if _get(processor, "do_center_crop"):
        crop = _get(processor, "crop_size")
        cw, ch = _get(crop, "width"), _get(crop, "height")
        if cw and ch:
            # larger crops pad first (left = (cw - w) // 2), then crop at the centre
            ox = (cw - w) // 2 if cw > w else -((w - cw) // 2)
            oy = (ch - h) // 2 if ch > h else -((h - ch) // 2)
            t = t.then(Affine(1, 1, ox, oy))
            w, h = int(cw), int(ch)
    return t, (w, h)


def _is_pad_to_square(processor: Any) -> bool:
    # LlavaImageProcessor pads to a square; other processors' do_pad pads batches
    # to a common size at the bottom/right, which moves nothing.
    return "llava" in type(processor).__name__.lower()


def _resize_size(size_wh: tuple[int, int], size: Any, default_to_square: Any) -> tuple[int, int]:
    w, h = size_wh
    if size is None:
        return w, h
    if isinstance(size, int):
        size = {"shortest_edge": size} if default_to_square is False else {"height": size, "width": size}
    shortest, longest = _get(size, "shortest_edge"), _get(size, "longest_edge")
    height, width = _get(size, "height"), _get(size, "width")
    if shortest and not longest:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = shortest, int(shortest * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    if shortest and longest:
        # transformers' get_size_with_aspect_ratio: shortest edge, long edge capped at longest
        short_f, long_f = float(min(w, h)), float(max(w, h))
        scale_to = float(shortest)
        if long_f / short_f * shortest > longest:
            scale_to = longest * short_f / long_f
            shortest = int(round(scale_to))
        if (h <= w and h == shortest) or (w <= h and w == shortest):
            return w, h
        if w < h:
            return shortest, int(scale_to * h / w)
        return int(scale_to * w / h), shortest
    if height and width:
        return int(width), int(height)
    return w, h


# ---------------------------------------------------------------------------
# Qwen2-VL: dynamic resolution (smart_resize), patches merged 2x2


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides multiples of ``factor``, area in [min, max]."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def merged_grid_patches(
    image_size: tuple[int, int], grid_thw: tuple[int, int, int], patch_size: int, merge_size: int
) -> tuple[tuple[int, int], list[Patch]]:
    """Tokens of a Qwen2-VL image: ``grid_thw`` counts ViT patches; one LLM token per merge x merge block.

    The processor only stretches the image to (gw * patch, gh * patch), and
    orders tokens row-major over the merged grid.
    """
    _, gh, gw = grid_thw
    rows, cols = gh // merge_size, gw // merge_size
    canvas = (gw * patch_size, gh * patch_size)
    t = stretch(image_size, canvas)
    cell = patch_size * merge_size
    return (rows, cols), grid_patches(rows, cols, (cell, cell), t, image_size)


def round_resolution(resolution: int, factor: int) -> int:
    """The nearest multiple of ``factor`` (at least one factor)."""
    return max(factor, int(round(resolution / factor)) * factor)


def parse_resolution(value: Any) -> tuple[int, int] | None:
    """448, "448", "448x336" (width x height) or (w, h) -> (w, h); None stays None."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            parts = value.lower().replace("×", "x").split("x")
            if len(parts) not in (1, 2):
                raise ValueError
            w, h = int(parts[0]), int(parts[-1])
        elif isinstance(value, (tuple, list)):
            w, h = (int(v) for v in value)
        else:
            w = h = int(value)
    except (TypeError, ValueError):
        raise InputError(f"bad resolution {value!r}: use e.g. 448 or 448x336") from None
    if w < 1 or h < 1:
        raise InputError(f"bad resolution {value!r}: sides must be positive")
    return w, h
