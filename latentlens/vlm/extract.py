"""Load a vision-language model and extract the visual tokens of an image.

``load_vlm`` picks the adapter from the checkpoint's config; adding an
architecture is one small ``VisionLanguageModel`` subclass listed in
``ADAPTERS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from latentlens.db import first_line
from latentlens.errors import InputError, UnsupportedModel
from latentlens.images import ImageSource, load_image, max_image_pixels  # noqa: F401  (re-exported)
from latentlens.vlm.base import DEFAULT_PROMPT, VisionLanguageModel, VisualTokens
from latentlens.vlm.gemma3 import Gemma3VLM
from latentlens.vlm.geometry import parse_resolution
from latentlens.vlm.idefics3 import Idefics3VLM, SmolVLM
from latentlens.vlm.internvl import InternVLVLM
from latentlens.vlm.llava import LlavaVLM
from latentlens.vlm.llava_next import LlavaNextVLM
from latentlens.vlm.llava_onevision import LlavaOnevisionVLM
from latentlens.vlm.molmo2 import Molmo2VLM
from latentlens.vlm.paligemma import PaliGemmaVLM
from latentlens.vlm.qwen2_vl import Qwen2VLM, Qwen25VLM
from latentlens.vlm.qwen3_vl import Qwen3VLM

ADAPTERS: tuple[type[VisionLanguageModel], ...] = (
    LlavaVLM, LlavaNextVLM, Qwen2VLM, Qwen25VLM, Gemma3VLM,
    Idefics3VLM, SmolVLM, PaliGemmaVLM,
    Qwen3VLM, LlavaOnevisionVLM,
    InternVLVLM, Molmo2VLM,
)


def supported_models() -> str:
    return ", ".join(f"{a.display_name} ({'/'.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(config: Any) -> type[VisionLanguageModel]:
    """The adapter class for a transformers config (by model_type)."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
    raise UnsupportedModel(
        f"no vision-language adapter for model type '{model_type}' ({archs}); "
        f"supported: {supported_models()}"
    )


def load_vlm(
    source: str, *, dtype: str = "float32", device: str | None = None, revision: str | None = None
) -> VisionLanguageModel:
    """Load a supported VLM (hub id or local dir) with its tokenizer and image processor."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a model config from '{source}': {first_line(e)}") from e
    adapter = adapter_for(config)
    try:
        return adapter.from_pretrained(source, dtype=dtype, device=device, revision=revision)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {adapter.display_name} model '{source}': {first_line(e)}") from e


def extract_visual_tokens(
    vlm: VisionLanguageModel,
    image: Any,
    *,
    layers: Sequence[int],
    prompt: str = DEFAULT_PROMPT,
    resolution: int | str | tuple[int, int] | None = None,
) -> VisualTokens:
    """Visual tokens of ``image`` at ``layers`` (0 = projector output) from one forward pass.

    ``resolution`` (448, "448x336" or (w, h)) fixes the canvas where the
    architecture allows it (Qwen2-VL); for fixed-size towers (LLaVA) it
    squashes the whole image to that size first, so nothing is cropped.
    """
    return vlm.visual_tokens(load_image(image), layers=layers, prompt=prompt or DEFAULT_PROMPT,
                             resolution=parse_resolution(resolution))

