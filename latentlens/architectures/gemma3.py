"""Gemma 3 (Gemma3ForConditionalGeneration): a SigLIP tower on a fixed square canvas.

The image processor stretches the image to the tower's size (896 px); the
projector average-pools the patch grid down to mm_tokens_per_image tokens
(16 x 16 = 256), row-major. The chat template emits <start_of_image>, which
expands to "\\n\\n<start_of_image>" + one <image_soft_token> per visual token +
"<end_of_image>\\n\\n"; token_type_ids (1 = image) give the image tokens their
bidirectional attention, so they are part of the forward inputs.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from PIL import Image

from latentlens.vlm.base import ModelClass, PreparedImage, VisionLanguageModel
from latentlens.vlm.geometry import fixed_canvas_transform, grid_patches


class Gemma3VLM(VisionLanguageModel):
    display_name = "Gemma 3"
    model_types = ("gemma3",)
    image_placeholder = "<start_of_image>"
    fallback_template: ClassVar[str] = (
        "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration

    def expand_placeholder(self, text: str, prepared: PreparedImage) -> str:
        image = getattr(self.tokenizer, "image_token", None) or "<image_soft_token>"
        end = getattr(self.tokenizer, "eoi_token", None) or "<end_of_image>"
        start = self.image_placeholder
        return text.replace(start, f"\n\n{start}{image * prepared.num_tokens}{end}\n\n")

    def prepare_image(self, image: Image.Image, resolution: tuple[int, int] | None) -> PreparedImage:
        original = image.size
        if resolution:
            image = image.resize(resolution, Image.Resampling.BICUBIC)
        pixel_values = self.image_processor(images=[image], do_pan_and_scan=False,
                                            return_tensors="pt")["pixel_values"]
        h, w = pixel_values.shape[-2:]
        transform = fixed_canvas_transform(original, image.size, self.image_processor, (int(w), int(h)),
                                           bool(resolution))
        side = math.isqrt(int(self.config.mm_tokens_per_image))
        patches = grid_patches(side, side, (w / side, h / side), transform, original)
        return PreparedImage(
            inputs={"pixel_values": pixel_values}, num_tokens=side * side, first_grid_token=0,
            grid=(side, side), patches=patches, canvas_size=(w, h),
        )

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (input_ids == self.image_token_id).long()}
