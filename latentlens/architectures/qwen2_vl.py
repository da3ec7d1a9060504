"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, 2x2 merged patches.

The image processor stretches the image to sides that are multiples of
patch * merge (28 px) with an area between min and max pixels
(``smart_resize``); the merger turns each 2x2 block of 14-px ViT patches into
one LLM token, ordered row-major over the merged grid. ``image_grid_thw``
says how many patches the processor made, so the geometry is read from it,
not recomputed.

``resolution`` fixes the canvas (sides rounded to multiples of 28), e.g.
448 -> 448 x 448 -> a 16 x 16 token grid, as in the LatentLens reference setup.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from latentlens.vlm.base import ModelClass, PreparedImage, VisionLanguageModel
from latentlens.vlm.geometry import merged_grid_patches, round_resolution


class Qwen2VLM(VisionLanguageModel):
    display_name = "Qwen2-VL"
    model_types = ("qwen2_vl",)
    image_placeholder = "<|image_pad|>"
    fallback_template: ClassVar[str] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def _vision(self, key: str, default: int) -> int:
        v: Any = getattr(self.image_processor, key, None)
        if v is None:
            v = getattr(self.config.vision_config, key, default)
        return int(v)

    def prepare_image(self, image: Image.Image, resolution: tuple[int, int] | None) -> PreparedImage:
        original = image.size
        patch = self._vision("patch_size", 14)
        merge = self._vision("merge_size", 0) or int(self.config.vision_config.spatial_merge_size)
        kwargs = {}
        if resolution:
            w, h = (round_resolution(v, patch * merge) for v in resolution)
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            kwargs["size"] = {"shortest_edge": w * h, "longest_edge": w * h}
        out = self.image_processor(images=[image], return_tensors="pt", **kwargs)
        gt, gh, gw = (int(x) for x in out["image_grid_thw"][0])
        thw = (gt, gh, gw)
        # every processor step is a stretch, so composing with the pre-resize is too
        grid, patches = merged_grid_patches(original, thw, patch, merge)
        return PreparedImage(
            inputs={"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]},
            num_tokens=thw[0] * grid[0] * grid[1], first_grid_token=0, grid=grid,
            patches=patches, canvas_size=(thw[2] * patch, thw[1] * patch),
        )

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # transformers 5 builds M-RoPE positions from mm_token_type_ids (1 = image)
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}


class Qwen25VLM(Qwen2VLM):
    display_name = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
