"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): LLaVA-NeXT's anyres, capped.

The image processor tiles as LLaVA-NeXT's does: it picks the best of
``image_grid_pinpoints`` (384-px tiles, up to 6 x 6, for the released
checkpoints), resizes the image into it keeping the aspect ratio, centres it
on a zero canvas and cuts tiles; a base view (the whole image stretched to one
tile) comes first. The model lays each tile's patch features out as one grid
over the canvas, drops the padded rows or columns (``unpad_image``) and then
applies OneVision's cap, ``vision_aspect_ratio = "anyres_max_N"``: when the
unpadded grid holds more than about N tiles' worth of features (ratio =
sqrt(rows * cols / (N * side^2)) > 1.1) it is resized bilinearly to
(int(rows // ratio), int(cols // ratio)). Each row then ends with an
``image_newline`` token. The visual tokens are the base view's (side x side,
27 x 27 for SigLIP 384/14), then rows x (cols + 1).

The grid reported here is the high-resolution one, after the cap; base-view
and newline tokens are left out (as for LLaVA-NeXT). A token's box is where
its pixels were on the canvas, mapped back to the original image:

* SigLIP 384/14 sees 27 x 14 = 378 px of each 384-px tile: the last 6 px
  of every tile (right and bottom) reach no token, so boxes leave thin strips
  of the image uncovered at tile seams (the tiny test model has them too).
  LLaVA-NeXT's 336/14 tiles have no such strip. ``unpad_image`` counts
  features as if they were evenly spread over the canvas, so at a padded edge
  it may also keep a row of features that is part padding or drop up to about
  one row of image: boxes show what the kept features see.
* A token made by the cap is a bilinear sample of the unpadded grid at its
  cell's centre; its box is its cell (the unpadded grid split evenly), which
  may span a seam strip.

``anyres_grid`` holds the layout without the model; with ``max_tiles=None``
it is LLaVA-NeXT's too. This adapter does not reuse ``LlavaNextVLM.prepare_image``:
that one spreads features evenly over the canvas (exact only when the patch
size divides the tile, as 14 does 336) and knows no cap.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar

import torch
from PIL import Image

from latentlens.architectures.qwen2_vl import Qwen2VLM
from latentlens.errors import InputError
from latentlens.vlm.base import ModelClass, PreparedImage, VisionLanguageModel
from latentlens.vlm.geometry import Affine, Patch, stretch


class LlavaOnevisionVLM(VisionLanguageModel):
    display_name = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    image_placeholder = "<image>"
    # the released checkpoints are Qwen2 chat models: <image> in a ChatML user turn
    fallback_template: ClassVar[str] = Qwen2VLM.fallback_template.replace(
        "<|vision_start|><|image_pad|><|vision_end|>", "<image>\n"
    )

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def prepare_image(self, image: Image.Image, resolution: tuple[int, int] | None) -> PreparedImage:
        original = image.size
        if resolution:
            image = image.resize(resolution, Image.Resampling.BICUBIC)
        out = self.image_processor(images=[image], return_tensors="pt")
        vc = self.config.vision_config
        aspect = str(getattr(self.config, "vision_aspect_ratio", None) or "anyres_max_9")
        layout = anyres_grid(
            image.size, self.config.image_grid_pinpoints, tile=int(vc.image_size),
            patch=int(vc.patch_size), max_tiles=int(aspect.removeprefix("anyres_max_")),
        )
        tiles = int(out["pixel_values"].shape[1]) - 1
        if tiles != layout.tiles:
            raise InputError(
                f"the image processor of '{self.name}' cut {tiles} tiles where the model's "
                f"image_grid_pinpoints give {layout.tiles}: their pinpoints differ"
            )
        t = layout.transform
        if resolution:
            t = stretch(original, image.size).then(t)
        patches = layout.patches(t, original)
        rows, cols = layout.grid
        base = layout.side * layout.side
        has_newline = getattr(getattr(self.model, "model", self.model), "image_newline", None) is not None
        per_row = cols + (1 if has_newline else 0)
        return PreparedImage(
            inputs={"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]},
            num_tokens=base + rows * per_row, first_grid_token=base, grid=(rows, cols),
            patches=patches, canvas_size=layout.canvas,
            grid_offsets=[base + i * per_row + j for i in range(rows) for j in range(cols)],
        )


class AnyresGrid:
    """The high-resolution token grid of an anyres image, and its cells on the canvas.

    ``transform`` maps image pixels to canvas pixels (resize keeping the
    aspect ratio into the chosen pinpoint, then centre); the unpadded feature
    grid starts at feature (r0, c0) and has ``kept`` = (rows, cols) features;
    ``grid`` is the token grid after the cap (equal to ``kept`` without it).
    """

    def __init__(self, canvas: tuple[int, int], transform: Affine, tile: int, patch: int,
                 start: tuple[int, int], kept: tuple[int, int], grid: tuple[int, int]):
        self.canvas, self.transform, self.tile, self.patch = canvas, transform, tile, patch
        self.side = tile // patch
        self.start, self.kept, self.grid = start, kept, grid
        self.tiles = (canvas[0] // tile) * (canvas[1] // tile)

    def _edges(self, axis: int) -> list[tuple[float, float]]:
        """(first, last) canvas pixel edges of each grid line's cells along x (0) or y (1)."""
        first, kept, n = self.start[1 - axis], self.kept[1 - axis], self.grid[1 - axis]
        return [(self._at(first + Fraction(i * kept, n), start=True),
                 self._at(first + Fraction((i + 1) * kept, n), start=False)) for i in range(n)]

    def _at(self, u: Fraction, *, start: bool) -> float:
        """Canvas position of feature coordinate u (feature k spans [k, k + 1)).

        Feature k sees canvas pixels [tile * (k // side) + patch * (k % side), + patch);
        a right/bottom edge on a whole u ends feature u - 1, so a tile's unseen
        strip stays outside the box before it.
        """
        k = math.floor(u) if start or u != math.floor(u) else int(u) - 1
        return float(self.tile * (k // self.side) + self.patch * (k % self.side) + (u - k) * self.patch)

    def patches(self, transform: Affine, image_size: tuple[int, int]) -> list[Patch]:
        """Row-major patches with boxes in original pixels (``transform``: original -> canvas)."""
        w, h = image_size
        xs = [(_clip(transform.inverse_point(a, 0)[0], w), _clip(transform.inverse_point(b, 0)[0], w))
              for a, b in self._edges(0)]
        ys = [(_clip(transform.inverse_point(0, a)[1], h), _clip(transform.inverse_point(0, b)[1], h))
              for a, b in self._edges(1)]
        rows, cols = self.grid
        return [Patch(r * cols + c, r, c, (xs[c][0], ys[r][0], xs[c][1], ys[r][1]))
                for r in range(rows) for c in range(cols)]


def anyres_grid(
    size: tuple[int, int], pinpoints: list, *, tile: int, patch: int, max_tiles: int | None = None
) -> AnyresGrid:
    """The anyres layout of a (w, h) image as transformers' LLaVA-OneVision builds it.

    Best pinpoint (``select_best_resolution``), resize into it keeping the aspect
    ratio (``get_patch_output_size``), centre; features per tile = tile // patch;
    ``unpad_image`` run on an index grid, so the kept rows/columns always match
    the model's; then the ``anyres_max_{max_tiles}`` cap (None: no cap, as in LLaVA-NeXT).
    """
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    w, h = size
    th, tw = (int(v) for v in select_best_resolution((h, w), pinpoints))
    sw, sh = tw / w, th / h
    if sw < sh:
        nw, nh = tw, min(math.ceil(h * sw), th)
    else:
        nw, nh = min(math.ceil(w * sh), tw), th
    t = stretch((w, h), (nw, nh)).then(Affine(1, 1, (tw - nw) // 2, (th - nh) // 2))
    side = tile // patch
    fh, fw = (th // tile) * side, (tw // tile) * side
    kept = unpad_image(torch.arange(fh * fw).view(1, fh, fw), [h, w])
    rows, cols = int(kept.shape[1]), int(kept.shape[2])
    r0, c0 = divmod(int(kept[0, 0, 0]), fw)
    grid = (rows, cols)
    if max_tiles is not None:
        # pack_image_features' expressions, so the same rounding
        ratio = math.sqrt(rows * cols / (max_tiles * side**2))
        if ratio > 1.1:
            grid = (int(rows // ratio), int(cols // ratio))
    return AnyresGrid((tw, th), t, tile, patch, (r0, c0), (rows, cols), grid)


def _clip(v: float, hi: int) -> float:
    return round(min(max(v, 0.0), float(hi)), 3)
