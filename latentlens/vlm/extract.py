"""Load a vision-language model and extract the visual tokens of an image.

``load_vlm`` picks the adapter from the checkpoint's config; adding an
architecture is one small ``VisionLanguageModel`` subclass listed in
``ADAPTERS``.
"""

from __future__ import annotations

import contextlib
import re
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from latentlens.errors import InputError, UnsupportedModel
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
        raise InputError(f"cannot load a model config from '{source}': {_first_line(e)}") from e
    adapter = adapter_for(config)
    try:
        return adapter.from_pretrained(source, dtype=dtype, device=device, revision=revision)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {adapter.display_name} model '{source}': {_first_line(e)}") from e


def max_image_pixels() -> int | None:
    """The most pixels an image may have: Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 = 89.5 MP by default; None = no limit).

    Pillow only warns between 1x and 2x of it; latentlens refuses anything over
    it, before decoding (a 100 MP RGB image is 300 MB decoded, and every
    vision tower resizes to a few megapixels at most). Raise it in Python by
    setting ``PIL.Image.MAX_IMAGE_PIXELS``; ``llens serve`` uploads use the same limit.
    """
    limit = Image.MAX_IMAGE_PIXELS
    return int(limit) if limit else None


def _check_pixels(size: tuple[int, int], what: str = "") -> None:
    limit = max_image_pixels()
    w, h = size
    if limit is not None and w * h > limit:
        raise InputError(
            f"{'image ' + what if what else 'the image'} is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of {limit / 1e6:.1f} "
            "megapixels (Pillow's decompression-bomb guard): downscale it first, e.g. to 4096 pixels on the long side"
        )


def load_image(image: Any) -> Image.Image:
    """A PIL RGB image from a path, PIL image or HxWx3 uint8 array (EXIF rotation applied).

    A path that is not an image Pillow reads, a truncated or corrupt one, or
    one over ``max_image_pixels()`` is an InputError naming the file; the
    size is checked from the header, before the pixels are decoded.
    """
    if isinstance(image, Image.Image):
        img = image
        _check_pixels(img.size)
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise InputError(f"an image array must be HxW or HxWx3 (or x4), got shape {image.shape}")
        _check_pixels((image.shape[1], image.shape[0]))
        try:
            img = Image.fromarray(image if image.ndim == 2 or image.shape[2] != 1 else image[..., 0])
        except (TypeError, ValueError) as e:
            raise InputError(f"cannot make an image of a {image.dtype} array {image.shape}: {_first_line(e)}") from e
    else:
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        try:
            with warnings.catch_warnings():  # over 1x the limit Pillow warns: we refuse just below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
            try:
                _check_pixels(img.size, str(path))
                img.load()
            except BaseException:
                img.close()
                raise
        except UnidentifiedImageError:
            raise InputError(f"cannot read image {path}: not an image file Pillow recognises "
                             "(PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") from None
        except Image.DecompressionBombError as e:  # over 2x: Pillow refuses in open, before our check
            m = re.search(r"\((\d+) pixels\)", str(e))
            n = f"{int(m.group(1)) / 1e6:.1f} megapixels" if m else "too many pixels"
            raise InputError(f"image {path} is {n}, over the limit of {(max_image_pixels() or 0) / 1e6:.1f} "
                             "megapixels (Pillow's decompression-bomb guard): downscale it first") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
            raise InputError(f"cannot read image {path}: truncated or corrupt ({_first_line(e)})") from None
    with contextlib.suppress(OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        img = ImageOps.exif_transpose(img) or img  # a broken EXIF block: keep the pixels as stored
    return img.convert("RGB")


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
