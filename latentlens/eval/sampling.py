"""Which images and patches an evaluation judges, reproducibly from a seed.

* Images: every image file in a directory (sorted by relative path), one
  image file, or the paths listed in a text file (one per line, relative to the file; ``#``
  comments). ``num_images`` of them are drawn with ``random.Random(seed)``.
* Patches: per image, ``patches_per_image`` drawn among the patches that
  are all image (never padding: a letterboxed edge patch whose box is
  smaller than a full cell is left out), with a seed made of ``seed`` and
  the image's position, so a rerun draws the same ones.

Item ``i * patches_per_image + j`` is the j-th patch of the i-th image: an
item's number says what it is, which is what lets a rerun skip judged items.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from latentlens.errors import InputError
from latentlens.vlm.geometry import Patch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FULL_CELL = 0.95  # a patch is "all image" when its box is at least this share of a full cell


@dataclass(frozen=True)
class ImageRef:
    name: str  # as the annotations and the stored items name it: relative to the dir or list
    path: Path


def list_images(spec: str | Path) -> list[ImageRef]:
    """Images of a directory (recursively) or of a list file, in a stable order."""
    p = Path(spec).expanduser()
    if p.is_dir():
        refs = [ImageRef(f.relative_to(p).as_posix(), f) for f in sorted(p.rglob("*"))
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        if not refs:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {p}")
        return refs
    if not p.is_file():
        raise InputError(f"--images: no such directory or list file: {spec}")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return [ImageRef(p.name, p)]
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"--images: {spec} is neither a directory, an image nor a text list of images") from None
    refs = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        f = Path(line).expanduser()
        f = f if f.is_absolute() else p.parent / f
        if not f.is_file():
            raise InputError(f"{p}:{n}: image not found: {line}")
        refs.append(ImageRef(line, f))
    if not refs:
        raise InputError(f"{p} lists no images")
    return refs


def choose_images(refs: list[ImageRef], num_images: int | None, seed: int) -> list[ImageRef]:
    if num_images is None or num_images >= len(refs):
        return list(refs)
    if num_images < 1:
        raise InputError("--num-images must be at least 1")
    return random.Random(seed).sample(refs, num_images)


def real_patches(patches: list[Patch]) -> list[Patch]:
    """Patches that see only image, no padding."""
    areas = [max(0.0, (p.box[2] - p.box[0])) * max(0.0, (p.box[3] - p.box[1])) for p in patches]
    full = max(areas, default=0.0)
    return [p for p, a in zip(patches, areas) if full > 0 and a >= FULL_CELL * full]


def choose_patches(patches: list[Patch], per_image: int, seed: int, image_index: int) -> list[Patch]:
    """``per_image`` real patches, in row-major order, the same for the same seed and image position."""
    pool = real_patches(patches)
    if per_image >= len(pool):
        return pool
    rng = random.Random(f"{seed}:{image_index}")
    return sorted(rng.sample(pool, per_image), key=lambda p: p.idx)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
