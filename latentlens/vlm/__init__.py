"""Visual tokens of vision-language models: extraction, patch geometry, queries.

Names are imported lazily so ``import latentlens.vlm`` stays cheap (no torch
or transformers until a model is loaded). The families themselves (LLaVA,
Qwen2-VL, ...) live in ``latentlens.architectures``, one module each; the
names this package had for their registry (``ADAPTERS``, ``adapter_for``,
``supported_models``) still answer, from that one registry.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_vlm": "latentlens.vlm.extract",
    "load_image": "latentlens.vlm.extract",
    "extract_visual_tokens": "latentlens.vlm.extract",
    "vlm_families": "latentlens.architectures",
    "supported_vlms": "latentlens.architectures",
    "vlm_family_for": "latentlens.architectures",
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

#: the names these had before the registry moved (ADAPTERS: the tuple of family classes)
_ALIASES = {"adapter_for": "vlm_family_for", "supported_models": "supported_vlms"}

__all__ = sorted([*_EXPORTS, *_ALIASES, "ADAPTERS"])



def __getattr__(name: str) -> Any:
    if name == "ADAPTERS":
        from latentlens.architectures import vlm_families

        return vlm_families()
    name = _ALIASES.get(name, name)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'latentlens.vlm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
