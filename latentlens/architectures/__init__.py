"""The one registry of architectures: ``config.model_type`` -> the family class that handles it.

Each vision-language family is one module here holding one class (a
``latentlens.vlm.base.VisionLanguageModel`` subclass): how to load it for
ingest and where its language model, text config and vocabulary heads are
(the text side, classmethods of ``Adapter``), and how its image becomes
visual tokens with boxes (the visual side). Ingest, the lenses, the importer,
``load_vlm`` and the atlas all ask the class :func:`family_for` returns, as
transformers' auto classes ask their per-model folders.

Families are imported when first asked for, so ``import latentlens`` and the
store stay free of torch; this module and ``base`` import neither torch nor
transformers. Adding a family: its module, and one line in ``FAMILIES``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, cast

from latentlens.architectures.base import Adapter, DecoderAdapter, LensHeads
from latentlens.errors import InputError, UnsupportedModel

if TYPE_CHECKING:
    from latentlens.vlm.base import VisionLanguageModel

#: vision-language model_type -> "module:Class" under latentlens.architectures (this order is the
#: order help and docs list them in)
FAMILIES: dict[str, str] = {
    "llava": "llava:LlavaVLM",
    "llava_next": "llava_next:LlavaNextVLM",
    "qwen2_vl": "qwen2_vl:Qwen2VLM",
    "qwen2_5_vl": "qwen2_vl:Qwen25VLM",
    "gemma3": "gemma3:Gemma3VLM",
    "idefics3": "idefics3:Idefics3VLM",
    "smolvlm": "idefics3:SmolVLM",
    "paligemma": "paligemma:PaliGemmaVLM",
    "qwen3_vl": "qwen3_vl:Qwen3VLM",
    "llava_onevision": "llava_onevision:LlavaOnevisionVLM",
    "internvl": "internvl:InternVLVLM",
    "molmo2": "molmo2:Molmo2VLM",
}

__all__ = [
    "FAMILIES", "Adapter", "DecoderAdapter", "LensHeads", "all_families", "family_for",
    "family_for_type", "heads_of", "language_model_of", "supported_model_types", "supported_vlms",
    "vlm_families", "vlm_family_for",
]


def family_for_type(model_type: str | None) -> type[Adapter] | None:
    """The class registered for a model_type (its module imported now), or None."""
    if model_type in DecoderAdapter.model_types:
        return DecoderAdapter
    target = FAMILIES.get(model_type or "")
    if target is None:
        return None
    module, name = target.split(":")
    cls: type[Adapter] = getattr(importlib.import_module(f"latentlens.architectures.{module}"), name)
    return cls


def supported_model_types() -> list[str]:
    return sorted((*DecoderAdapter.model_types, *FAMILIES))


def family_for(config: Any) -> type[Adapter]:
    """The family class for a transformers config (text-only or VLM); a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    cls = family_for_type(model_type)
    if cls is None:
        raise InputError(
            f"unsupported architecture '{model_type}' "
            f"(supported model types: {', '.join(supported_model_types())})"
        )
    return cls


def vlm_families() -> tuple[type[VisionLanguageModel], ...]:
    """Every vision-language family class once, in registry order (imports them all: torch)."""
    out: list[Any] = []
    for model_type in FAMILIES:
        cls = family_for_type(model_type)
        if cls not in out:
            out.append(cls)
    return tuple(out)


def all_families() -> tuple[type[Adapter], ...]:
    """The text-only adapter, then every vision-language family."""
    return (DecoderAdapter, *vlm_families())


def supported_vlms() -> str:
    """``LLaVA (llava), ...``: what help and errors list."""
    return ", ".join(f"{f.display_name} ({'/'.join(f.model_types)})" for f in vlm_families())


def vlm_family_for(config: Any) -> type[VisionLanguageModel]:
    """The vision-language family class for a transformers config (by model_type)."""
    model_type = getattr(config, "model_type", None)
    cls = family_for_type(model_type) if model_type in FAMILIES else None
    if cls is None:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise UnsupportedModel(
            f"no vision-language adapter for model type '{model_type}' ({archs}); "
            f"supported: {supported_vlms()}"
        )
    return cast("type[VisionLanguageModel]", cls)  # every FAMILIES entry is one


def language_model_of(model: Any) -> Any:
    """The decoder stack of a loaded transformers model (LLM or supported VLM)."""
    return family_for(model.config).language_model_of(model)


def heads_of(model: Any) -> LensHeads:
    """The vocabulary-lens heads of a loaded transformers model (LLM or supported VLM)."""
    return family_for(model.config).heads_of(model)
