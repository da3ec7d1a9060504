"""PaliGemma and PaliGemma 2 (PaliGemmaForConditionalGeneration): SigLIP on a fixed square canvas.

The image processor stretches the whole image to the tower's square (224,
448 or 896 px; no crop); each ViT patch (14 px) is one visual token, row-major
(16 x 16 = 256 tokens at 224 px). The projector is one linear layer.

There is no chat template: the processor's prompt is the image tokens, then
BOS, the prompt and a newline (``<image> * N + <bos> + prompt + "\\n"``), with no
other special tokens; ``token_type_ids`` are 0 for all of it. PaliGemma is a
prefix LM: token type 0 makes the image and the prompt one bidirectional block
(``token_type_ids`` are passed, as the processor gives them), so visual layers
l >= 1 depend on the whole prompt, text after the image included, not only on
what comes before. Prompts are PaliGemma's task prefixes ("caption en",
"describe en", ...); the default prompt works but is not one of them.

The text side (``llens ingest``, ``PaliGemmaVLM._load``) runs the language
model causally, as PaliGemma reads the text it writes (its suffix).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from latentlens.errors import InputError
from latentlens.vlm.base import ModelClass, PreparedImage, VisionLanguageModel
from latentlens.vlm.geometry import fixed_canvas_transform, grid_patches


class PaliGemmaVLM(VisionLanguageModel):
    display_name = "PaliGemma"
    model_types = ("paligemma",)
    image_placeholder = "<image>"

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import PaliGemmaForConditionalGeneration

        return PaliGemmaForConditionalGeneration

    @classmethod
    def _load(cls, source: str, config: Any, *, dtype: Any, **kw: Any) -> Any:
        """PaliGemma's text config asks for bidirectional attention (its prefix-LM prompt); run
        alone on a corpus, its language model would then attend to later tokens too. Loaded
        for the text side it is causal, as PaliGemma reads the text it writes."""
        config.text_config.use_bidirectional_attention = False
        return super()._load(source, config, dtype=dtype, **kw)

    def chat_text(self, prompt: str) -> str:
        """PaliGemmaProcessor's layout: the image, BOS, the prompt, a newline."""
        bos = getattr(self.tokenizer, "bos_token", None) or "<bos>"
        return f"{self.image_placeholder}{bos}{prompt}\n"

    def encode(
        self, image: Image.Image, prompt: str, resolution: tuple[int, int] | None
    ) -> tuple[dict, PreparedImage]:
        # as the base's, but no special tokens are added: BOS sits after the image tokens
        prepared = self.prepare_image(image, resolution)
        text = self.chat_text(prompt)
        if text.count(self.image_placeholder) != 1:
            raise InputError(f"a PaliGemma prompt cannot hold {self.image_placeholder!r} itself")
        text = self.expand_placeholder(text, prepared)
        enc = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        inputs.update(self.extra_inputs(enc["input_ids"]))
        inputs.update(prepared.inputs)
        return inputs, prepared

    def prepare_image(self, image: Image.Image, resolution: tuple[int, int] | None) -> PreparedImage:
        original = image.size
        if resolution:
            # the tower's canvas is fixed: --resolution squashes the whole image first
            image = image.resize(resolution, Image.Resampling.BICUBIC)
        pixel_values = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        h, w = (int(v) for v in pixel_values.shape[-2:])
        transform = fixed_canvas_transform(original, image.size, self.image_processor, (int(w), int(h)),
                                           bool(resolution))
        ps = int(self.config.vision_config.patch_size)
        rows, cols = h // ps, w // ps
        expected = getattr(self.text_config, "num_image_tokens", None)
        if expected is not None and int(expected) != rows * cols:
            raise InputError(
                f"{type(self.image_processor).__name__} made a {w}x{h} canvas ({rows * cols} patches), "
                f"but the model expects {expected} image tokens: the image processor and the model do not match"
            )
        patches = grid_patches(rows, cols, (ps, ps), transform, original)
        return PreparedImage(
            inputs={"pixel_values": pixel_values}, num_tokens=rows * cols, first_grid_token=0,
            grid=(rows, cols), patches=patches, canvas_size=(w, h),
        )

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # the processor's token types for a prompt without a suffix: all 0, one bidirectional prefix
        return {"token_type_ids": torch.zeros_like(input_ids)}
