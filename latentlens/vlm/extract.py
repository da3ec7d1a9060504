"""Load a vision-language model and extract the visual tokens of an image.

``load_vlm`` asks the registry (``latentlens.architectures``) for the family
class of the checkpoint's config: the same class ingest loads the text side
with. Adding an architecture is one module there and one registry line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from latentlens.architectures import vlm_family_for
from latentlens.db import first_line
from latentlens.errors import InputError
from latentlens.images import ImageSource, load_image, max_image_pixels  # noqa: F401  (re-exported)
from latentlens.vlm.base import DEFAULT_PROMPT, VisionLanguageModel, VisualTokens
from latentlens.vlm.geometry import parse_resolution


def load_vlm(
    source: str, *, dtype: str = "float32", device: str | None = None, revision: str | None = None
) -> VisionLanguageModel:
    """Load a supported VLM (hub id or local dir) with its tokenizer and image processor."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a model config from '{source}': {first_line(e)}") from e
    family = vlm_family_for(config)
    try:
        return family.from_pretrained(source, dtype=dtype, device=device, revision=revision)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {family.display_name} model '{source}': {first_line(e)}") from e


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

