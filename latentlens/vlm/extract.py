"""Load a vision-language model and extract the visual tokens of an image.

``load_vlm`` picks the adapter from the checkpoint's config; adding an
architecture is one small ``VisionLanguageModel`` subclass listed in
``ADAPTERS``.
"""

from __future__ import annotations

import contextlib
import io
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
    """The most pixels an image may have (None: no limit): ``LLENS_MAX_IMAGE_PIXELS``, by default
    4096 x 4096 = 16.8 MP, about the largest input a supported VLM takes (see latentlens.config).

    Checked from the header, before the pixels are decoded: a 9,400 x 9,400 PNG
    of a few hundred KB would otherwise take gigabytes to decode and convert,
    only for the vision tower to downscale it. The CLI, evaluations and
    ``llens serve`` (``--max-image-mp``) all apply it through ``load_image``.
    """
    from latentlens.config import max_image_pixels as configured

    return configured()


def _check_pixels(size: tuple[int, int], label: str, limit: int | None) -> None:
    w, h = size
    if limit is not None and w * h > limit:
        raise InputError(
            f"{label} is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of {limit / 1e6:.1f} "
            "megapixels (LLENS_MAX_IMAGE_PIXELS): downscale it first, e.g. to 4096 pixels on the long side"
        )


ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray


def load_image(image: ImageSource, *, max_pixels: int | None = -1, name: str | None = None) -> Image.Image:
    """A PIL RGB image, upright, from a path, the bytes of an image file, a PIL image or an HxWx3 array.

    The one way every path reads an image (`llens query/report/eval`, the web
    app's uploads, a saved analysis re-rendered), so all of them see the same
    pixels: EXIF orientation applied (a phone photo tagged "rotate 90" is
    turned upright; the tag is then dropped, so loading twice is harmless).
    Anything Pillow does not read, truncated or corrupt, or over ``max_pixels``
    (default ``max_image_pixels()``; None: no limit) is one InputError naming
    ``name`` (or the path); the size is checked from the header, before decoding.
    """
    limit = max_image_pixels() if max_pixels == -1 else max_pixels
    if isinstance(image, Image.Image):
        img = image
        _check_pixels(img.size, f"image {name}" if name else "the image", limit)
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise InputError(f"an image array must be HxW or HxWx3 (or x4), got shape {image.shape}")
        _check_pixels((image.shape[1], image.shape[0]), f"image {name}" if name else "the image", limit)
        try:
            img = Image.fromarray(image if image.ndim == 2 or image.shape[2] != 1 else image[..., 0])
        except (TypeError, ValueError) as e:
            raise InputError(f"cannot make an image of a {image.dtype} array {image.shape}: {_first_line(e)}") from e
    else:
        src: Any
        if isinstance(image, (bytes, bytearray, memoryview)):
            label = f"image {name}" if name else "the uploaded image"
            if not len(image):
                raise InputError(f"{label} is empty (0 bytes)")
            src = io.BytesIO(bytes(image))
        else:
            path = Path(image)
            if not path.is_file():
                raise InputError(f"image file not found: {path}")
            label, src = f"image {name or path}", path
        img = _open_checked(src, label, limit)
    with contextlib.suppress(OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        img = ImageOps.exif_transpose(img) or img  # a broken EXIF block: keep the pixels as stored
    return img.convert("RGB")


def _open_checked(src: Any, label: str, limit: int | None) -> Image.Image:
    """Open, check the size in the header, then decode."""
    try:
        with warnings.catch_warnings():  # over 1x Pillow's own limit it warns: ours applies instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src)
        try:
            _check_pixels(img.size, label, limit)
            img.load()
        except BaseException:
            img.close()
            raise
    except UnidentifiedImageError:
        raise InputError(f"cannot read {label}: not an image file Pillow recognises "
                         "(PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") from None
    except Image.DecompressionBombError as e:  # over 2x Pillow's limit: it refuses in open, before our check
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = f"{int(m.group(1)) / 1e6:.1f} megapixels" if m else "too many pixels"
        raise InputError(f"{label} is {n}, over Pillow's decompression-bomb limit: downscale it first") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise InputError(f"cannot read {label}: truncated or corrupt ({_first_line(e)})") from None
    return img


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
