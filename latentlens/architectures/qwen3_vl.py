"""Qwen3-VL (Qwen3VLForConditionalGeneration): Qwen2-VL's geometry, plus DeepStack.

Pixels and tokens work as in Qwen2-VL (``latentlens.architectures.qwen2_vl``): the image
processor (Qwen2VLImageProcessor, with 16-px patches in Qwen3-VL) stretches
the image to sides that are multiples of patch * merge (32 px) with an area
in [min, max] pixels, and the merger turns each 2x2 block of ViT patches into
one LLM token, row-major over the merged grid read from ``image_grid_thw``.
Boxes therefore tile the whole image, 32 canvas px per token; ``resolution``
fixes the canvas with sides rounded to multiples of 32 (448 -> 14 x 14 tokens).

DeepStack: besides the merger output, the vision tower sends the features of
a few of its intermediate blocks (``deepstack_visual_indexes``, e.g. 8, 16,
24), each through its own merger, into the language model: feature k is
added to the residual stream at the image positions right *after* decoder
block k (k = 0, 1, ...), i.e. between hidden_states[k + 1] and block k + 1.
So, with n DeepStack features:

* visual layer 0 is the merger output as it enters the LLM (``inputs_embeds``,
  equal to ``get_image_features(...).pooler_output``); it holds none of the
  DeepStack features;
* visual layer l >= 1 is ``hidden_states[l]`` (the output of block l - 1, as
  transformers records it, *before* that block's DeepStack addition): it
  includes DeepStack features 0 .. l - 2, and from l = n + 1 on, all n of
  them. Block l itself reads hidden_states[l] + DeepStack feature l - 1.

The text index is hidden_states[l] of text-only runs (no DeepStack there), so
visual and stored layer l are the same space, as for the other adapters.
"""

from __future__ import annotations

from latentlens.architectures.qwen2_vl import Qwen2VLM
from latentlens.vlm.base import ModelClass


class Qwen3VLM(Qwen2VLM):
    display_name = "Qwen3-VL"
    model_types = ("qwen3_vl",)

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration
