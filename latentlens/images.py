"""The one way latentlens reads an image: every path (`llens query/report/eval`, the web app's
uploads, a saved analysis drawn again) calls ``load_image``, so all of them see the same pixels.

Torch-free (Pillow and numpy only), so the web app can check an upload's
size and pixel budget without importing any model code.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from latentlens.db import first_line
from latentlens.errors import InputError


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
            raise InputError(f"cannot make an image of a {image.dtype} array {image.shape}: {first_line(e)}") from e
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
        raise InputError(f"cannot read {label}: truncated or corrupt ({first_line(e)})") from None
    return img

