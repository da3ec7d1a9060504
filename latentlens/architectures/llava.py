"""LLaVA (LlavaForConditionalGeneration: LLaVA-1.5 and models built like it).

A CLIP-style tower sees a fixed square canvas (e.g. 336 px) made by
[pad to square] -> resize shortest edge -> center crop; each ViT patch is one
visual token, row-major. With vision_feature_select_strategy "default" the
CLS token is dropped; with "full" it is kept as the first image token and has
no box, so it is left out of the grid.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

from PIL import Image

from latentlens.errors import InputError
from latentlens.vlm.base import ModelClass, PreparedImage, VisionLanguageModel
from latentlens.vlm.geometry import clip_transform, grid_patches, stretch

# towers that prepend a CLS token to their patch tokens
CLS_TOWERS = ("clip_vision_model", "clip")


class LlavaVLM(VisionLanguageModel):
    display_name = "LLaVA"
    model_types = ("llava",)
    image_placeholder = "<image>"
    fallback_template: ClassVar[str] = (
        "{% for m in messages %}{{ m['role'].upper() }}: "
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def prepare_image(self, image: Image.Image, resolution: tuple[int, int] | None) -> PreparedImage:
        original = image.size
        if resolution:
            # the tower's canvas is fixed; --resolution squashes the whole image
            # to that size first, so (at the tower's square size) nothing is cropped
            image = image.resize(resolution, Image.Resampling.BICUBIC)
        pixel_values = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        h, w = pixel_values.shape[-2:]
        transform, canvas = clip_transform(image.size, self.image_processor)
        if canvas != (w, h):
            warnings.warn(
                f"{type(self.image_processor).__name__} made a {w}x{h} canvas, expected "
                f"{canvas[0]}x{canvas[1]}: patch boxes assume a plain stretch", stacklevel=2,
            )
            transform = stretch(image.size, (w, h))
        if resolution:
            transform = stretch(original, image.size).then(transform)
        vc = self.config.vision_config
        ps = int(vc.patch_size)
        rows, cols = h // ps, w // ps
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        has_cls = getattr(vc, "model_type", "") in CLS_TOWERS
        n_tokens = rows * cols + (1 if has_cls else 0) - (1 if strategy == "default" else 0)
        first = n_tokens - rows * cols
        if first < 0:
            raise InputError(
                f"'{self.name}' drops the first visual token of a tower without a CLS token; "
                "its grid cannot be mapped"
            )
        patches = grid_patches(rows, cols, (ps, ps), transform, original)
        return PreparedImage(
            inputs={"pixel_values": pixel_values}, num_tokens=n_tokens, first_grid_token=first,
            grid=(rows, cols), patches=patches, canvas_size=(w, h),
        )
