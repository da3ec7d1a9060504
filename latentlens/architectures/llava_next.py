"""LLaVA-NeXT (LlavaNextForConditionalGeneration): "anyres" tiles plus a base view.

The image processor picks the best of ``image_grid_pinpoints`` for the
image, resizes the image into it keeping the aspect ratio, centres it on a
zero canvas, and cuts 336-px tiles; a base view (the whole image stretched to
one tile) comes first. The model lays the tiles' patch features out as one
grid over that canvas, removes the padded rows or columns (``unpad_image``)
and ends each row with an ``image_newline`` token. The visual tokens are:
the base view's (side x side), then rows x (cols + 1).

The grid reported here is the high-resolution one (it covers the whole
image at the finest scale); base-view and newline tokens are left out. The
rows/columns kept are found by running transformers' own ``unpad_image`` on
an index grid, so they always match the model.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from PIL import Image

from latentlens.architectures.llava import LlavaVLM
from latentlens.vlm.base import ModelClass, PreparedImage, VisionLanguageModel
from latentlens.vlm.geometry import Affine, grid_patches, stretch


class LlavaNextVLM(VisionLanguageModel):
    display_name = "LLaVA-NeXT"
    model_types = ("llava_next",)
    image_placeholder = "<image>"
    fallback_template: ClassVar[str] = LlavaVLM.fallback_template

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def prepare_image(self, image: Image.Image, resolution: tuple[int, int] | None) -> PreparedImage:
        from transformers.image_processing_utils import select_best_resolution
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        original = image.size
        if resolution:
            image = image.resize(resolution, Image.Resampling.BICUBIC)
        out = self.image_processor(images=[image], return_tensors="pt")
        w, h = image.size
        vc = self.config.vision_config
        ps = int(vc.patch_size)
        side = int(vc.image_size) // ps  # features per tile side
        pinpoints = getattr(self.image_processor, "image_grid_pinpoints", None) or self.config.image_grid_pinpoints
        th, tw = select_best_resolution((h, w), pinpoints)
        # resize into the best resolution keeping the aspect ratio, then centre (get_patch_output_size)
        sw, sh = tw / w, th / h
        if sw < sh:
            nw, nh = tw, min(math.ceil(h * sw), th)
        else:
            nw, nh = min(math.ceil(w * sh), tw), th
        t = stretch((w, h), (nw, nh)).then(Affine(1, 1, (tw - nw) // 2, (th - nh) // 2))
        if resolution:
            t = stretch(original, image.size).then(t)
        fh, fw = th // ps, tw // ps
        index = torch.arange(fh * fw).view(1, fh, fw)
        kept = unpad_image(index, [h, w])
        rows, cols = int(kept.shape[1]), int(kept.shape[2])
        r0, c0 = divmod(int(kept[0, 0, 0]), fw)
        patches = grid_patches(rows, cols, (ps, ps), t.then(Affine(1, 1, -c0 * ps, -r0 * ps)), original)
        base = side * side
        has_newline = getattr(getattr(self.model, "model", self.model), "image_newline", None) is not None
        per_row = cols + (1 if has_newline else 0)
        return PreparedImage(
            inputs={"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]},
            num_tokens=base + rows * per_row, first_grid_token=base, grid=(rows, cols),
            patches=patches, canvas_size=(tw, th),
            grid_offsets=[base + i * per_row + j for i in range(rows) for j in range(cols)],
        )
