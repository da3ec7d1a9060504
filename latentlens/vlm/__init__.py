"""Visual tokens of vision-language models: extraction, patch geometry, queries.

Names are imported lazily so ``import latentlens.vlm`` stays cheap (no torch
or transformers until a model is loaded).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_vlm": "latentlens.vlm.extract",
    "load_image": "latentlens.vlm.extract",
    "extract_visual_tokens": "latentlens.vlm.extract",
    "supported_models": "latentlens.vlm.extract",
    "ADAPTERS": "latentlens.vlm.extract",
    "VisionLanguageModel": "latentlens.vlm.base",
    "VisualTokens": "latentlens.vlm.base",
    "DEFAULT_PROMPT": "latentlens.vlm.base",
    "Patch": "latentlens.vlm.geometry",
    "query_image": "latentlens.vlm.query",
    "select_patches": "latentlens.vlm.query",
    "parse_patches": "latentlens.vlm.query",
    "ImageQueryResult": "latentlens.vlm.query",
    "VisualLayerResult": "latentlens.vlm.query",
    "PatchResult": "latentlens.vlm.query",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'latentlens.vlm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
