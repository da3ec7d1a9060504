"""InternVL (InternVLForConditionalGeneration: the "-hf" InternVL 2.5 / 3 / 3.5 checkpoints).

The image processor (GotOcr2ImageProcessor, run with ``crop_to_patches=True``
as InternVLProcessor does) picks a tiling of cols x rows square tiles
(448 px; ``min_patches <= cols * rows <= max_patches``) whose aspect ratio is
closest to the image's, stretches the whole image to (cols * 448, rows * 448)
and cuts it into tiles, row-major; when there is more than one tile, a
thumbnail (the whole image stretched to one tile) comes last. The vision tower
sees each tile on its own (14-px patches, CLS dropped) and the projector
pixel-shuffles each 2 x 2 block of patches into one token (``downsample_ratio``
0.5: 32 x 32 patches -> 16 x 16 = 256 tokens per tile, row-major within the
tile). The prompt's ``<IMG_CONTEXT>`` becomes ``<img>`` + one ``<IMG_CONTEXT>``
per visual token + ``</img>``, tiles in order.

The grid reported is the full high-resolution one: (rows * 16) x (cols * 16)
tokens over the stretched canvas, each 28 x 28 canvas pixels, tiling the
whole image (no padding, no crop). The thumbnail's tokens are left out (as
LLaVA-NeXT's base view is). A single-tile image (a tiling of 1 x 1, or
``max_patches`` = 1) has no thumbnail: its grid is the one tile's 16 x 16.
``resolution`` squashes the image to that size first, which changes the
tiling chosen and so the grid.
"""

from __future__ import annotations

from typing import Any, ClassVar

from PIL import Image

from latentlens.errors import InputError
from latentlens.vlm.base import ModelClass, PreparedImage, VisionLanguageModel
from latentlens.vlm.geometry import grid_patches, stretch


class InternVLVLM(VisionLanguageModel):
    display_name = "InternVL"
    model_types = ("internvl",)
    image_placeholder = "<IMG_CONTEXT>"
    fallback_template: ClassVar[str] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def expand_placeholder(self, text: str, prepared: PreparedImage) -> str:
        start = getattr(self.tokenizer, "start_image_token", None) or "<img>"
        end = getattr(self.tokenizer, "end_image_token", None) or "</img>"
        return text.replace(self.image_placeholder, f"{start}{self.image_placeholder * prepared.num_tokens}{end}")

    def _tiling(self, size: tuple[int, int], tile: tuple[int, int], num_images: int) -> tuple[int, int]:
        """(cols, rows) of the tiles the processor cut, checked against the images it returned."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            get_optimal_tiled_canvas,
        )

        if num_images == 1:
            return 1, 1
        ip = self.image_processor
        lo, hi = int(_attr(ip, "min_patches", 1)), int(_attr(ip, "max_patches", 12))
        cols, rows = get_optimal_tiled_canvas((size[1], size[0]), tile, lo, hi)
        if cols * rows + 1 != num_images:
            raise InputError(
                f"{type(ip).__name__} made {num_images} tiles for a {size[0]}x{size[1]} image, expected "
                f"{cols}x{rows} + a thumbnail: its tiling rule is not the one this adapter knows"
            )
        return cols, rows

    def prepare_image(self, image: Image.Image, resolution: tuple[int, int] | None) -> PreparedImage:
        original = image.size
        if resolution:
            image = image.resize(resolution, Image.Resampling.BICUBIC)
        out = self.image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
        pixel_values = out["pixel_values"]
        n_images = int(pixel_values.shape[0])
        th, tw = (int(v) for v in pixel_values.shape[-2:])
        vc = self.config.vision_config
        ph, pw = _pair(vc.patch_size)
        ratio = float(self.config.downsample_ratio)
        if th // ph != tw // pw:
            raise InputError(f"InternVL's pixel shuffle needs square tiles, got {tw}x{th} pixels")
        # the projector's pixel shuffle: side x side patches -> (side * ratio)^2 tokens, row-major
        side = int((th // ph) * ratio)
        cols, rows = self._tiling(image.size, (th, tw), n_images)
        transform = stretch(image.size, (cols * tw, rows * th))
        if resolution:
            transform = stretch(original, image.size).then(transform)
        per_tile = side * side
        grid = (rows * side, cols * side)
        patches = grid_patches(grid[0], grid[1], (tw / side, th / side), transform, original)
        offsets = [
            ((r // side) * cols + c // side) * per_tile + (r % side) * side + c % side
            for r in range(grid[0]) for c in range(grid[1])
        ]
        return PreparedImage(
            inputs={"pixel_values": pixel_values}, num_tokens=n_images * per_tile, first_grid_token=0,
            grid=grid, patches=patches, canvas_size=(cols * tw, rows * th),
            grid_offsets=None if n_images == 1 else offsets,
        )


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _attr(obj: Any, key: str, default: Any) -> Any:
    v = getattr(obj, key, None)
    return default if v is None else v

