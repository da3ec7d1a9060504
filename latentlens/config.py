"""Where latentlens keeps its data and which database it talks to.

Resolution order for the database: an explicit URL argument (the CLI's
``--database-url``), then ``LLENS_DATABASE_URL``, then the embedded server
in the data dir. The data dir is ``LLENS_DATA_DIR`` if set; otherwise the
platform's user data dir, except for root, whose default lives under
``/var/lib/latentlens``: the embedded server runs as an unprivileged system
user when started by root and must be able to traverse the parent folders,
which it would otherwise open up (``chmod o+rx``) all the way from ``/root``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_DATABASE_URL = "LLENS_DATABASE_URL"
ENV_DATA_DIR = "LLENS_DATA_DIR"
ENV_CACHE_DIR = "LLENS_CACHE_DIR"
ENV_MAX_IMAGE_PIXELS = "LLENS_MAX_IMAGE_PIXELS"
#: 4096 x 4096: about the largest input a supported VLM takes (the Qwen2-VL / Qwen3-VL processors'
#: published max_pixels are 12.8 to 16.8 MP, the other towers a few MP): above it every one downscales
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
APP_NAME = "latentlens"
ROOT_DATA_DIR = Path("/var/lib/latentlens")


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def data_dir() -> Path:
    """The folder for the embedded database (created on demand)."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser().resolve()
    if _is_root():
        return ROOT_DATA_DIR
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def cache_dir() -> Path:
    """The folder for rebuildable caches (dequantized weights, leaf scans)."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser().resolve()
    if os.environ.get(ENV_DATA_DIR):
        return data_dir() / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def max_image_pixels() -> int | None:
    """The pixel budget of an image (width x height), checked from its header before decoding:
    ``LLENS_MAX_IMAGE_PIXELS`` (0: no limit), else DEFAULT_MAX_IMAGE_PIXELS."""
    env = os.environ.get(ENV_MAX_IMAGE_PIXELS, "").strip().replace("_", "")
    if not env:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(env))
    except ValueError:
        from latentlens.errors import ConfigError

        raise ConfigError(f"{ENV_MAX_IMAGE_PIXELS} must be a number of pixels (0: no limit), got {env!r}") from None
    return value if value > 0 else None


def _cpuinfo(field: str) -> str | None:
    """The first ``field: value`` of /proc/cpuinfo (None off Linux or without it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """This CPU's model name, for every published number (see the benches)."""
    return _cpuinfo("model name") or "unknown CPU"


def cpu_flags() -> set[str]:
    """This CPU's feature flags (avx512_bf16, amx_bf16, ...); empty where unknown."""
    return set((_cpuinfo("flags") or "").split())


@dataclass(frozen=True)
class Settings:
    """Resolved connection settings. ``database_url`` None means embedded."""

    database_url: str | None
    data_dir: Path

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @classmethod
    def resolve(cls, database_url: str | None = None) -> Settings:
        url = database_url or os.environ.get(ENV_DATABASE_URL) or None
        return cls(database_url=url, data_dir=data_dir())
