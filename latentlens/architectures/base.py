"""The text side of every architecture: where a model keeps its language model.

The rest of latentlens never asks a transformers model where its decoder
stack, layers, heads or tokenizer are; it asks the family class the registry
(``latentlens.architectures``) picks for the model's config. Loading is split
into small overridable hooks (``_load_config``, ``_load``, ``_load_tokenizer``),
in the style of nnsight's loadable mixins; every hook is a classmethod, so a
vision-language family (``latentlens.vlm.base.VisionLanguageModel``, one
class per family holding its visual side too) answers them without a loaded
instance.

This module imports neither torch nor transformers: the registry imports it
to list the text-only model types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from latentlens.errors import InputError


@dataclass
class LensHeads:
    """What the vocabulary lenses (LogitLens, EmbeddingLens) read from a model.

    ``unembedding`` is the LM head's weight, which is the input embedding
    itself when the model ties them; logits are ``scale * norm(h) @ W.T``,
    soft-capped where the model caps its own (Gemma 2/3).
    """

    norm: Any  # the final norm module (hidden_states[num_layers] is already after it)
    unembedding: Any  # torch.Tensor [V, D]
    embedding: Any  # torch.Tensor [V, D], the input embedding matrix
    tied: bool
    logit_scale: float = 1.0
    logit_softcap: float | None = None


class Adapter:
    """How to load one family of models and find its decoder stack, heads and text config."""

    #: shown in messages and docs
    display_name: ClassVar[str] = "?"
    #: config.model_type values this class handles (the registry maps each to it; a test checks both agree)
    model_types: ClassVar[tuple[str, ...]] = ()
    #: whether the model also has a vision side that ingest leaves unused
    multimodal: ClassVar[bool] = False

    # ---- loading hooks ---------------------------------------------------

    @classmethod
    def _load_config(cls, source: str, **kw: Any) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, **kw)

    @classmethod
    def _load(cls, source: str, config: Any, *, dtype: Any, **kw: Any) -> Any:
        """Load the smallest model that contains the decoder stack."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(source, config=config, dtype=dtype, **kw)

    @classmethod
    def _load_tokenizer(cls, source: str, **kw: Any) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, **kw)

    # ---- structure (named *_of: a loaded VLM's own text_config, language_model and heads
    # are properties of the instance, see VisionLanguageModel) ----------------------

    @classmethod
    def text_config_of(cls, config: Any) -> Any:
        """The config that holds hidden_size and num_hidden_layers."""
        return config

    @classmethod
    def language_model_of(cls, model: Any) -> Any:
        """The decoder stack (embeddings + blocks + final norm), no LM head."""
        for path in ("language_model", "model.language_model", "model", ""):
            obj = model
            for part in filter(None, path.split(".")):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if obj is not None and hasattr(obj, "layers") and hasattr(obj, "embed_tokens"):
                return obj
        raise InputError(f"cannot find the decoder stack of {type(model).__name__}")

    @classmethod
    def layers_of(cls, model: Any) -> Any:
        return cls.language_model_of(model).layers

    @classmethod
    def heads_of(cls, model: Any) -> LensHeads:
        """Final norm, LM head and input embedding of a loaded model (LLM or VLM), tied or not."""
        lm = cls.language_model_of(model)
        norm = next((getattr(lm, n) for n in ("norm", "final_layernorm", "ln_f") if hasattr(lm, n)), None)
        if norm is None:
            raise InputError(f"cannot find the final norm of {type(model).__name__}")
        embedding = lm.embed_tokens.weight
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        cfg = cls.text_config_of(model.config)
        tied = bool(getattr(cfg, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False))
        if out is None:
            if not tied:
                raise InputError(
                    f"{type(model).__name__} was loaded without its LM head and does not tie it to "
                    "the input embedding: LogitLens cannot run on it"
                )
            unembedding = embedding
        else:
            unembedding = out.weight
            tied = unembedding.data_ptr() == embedding.data_ptr()
        scale = float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere
        if getattr(cfg, "logits_scaling", None):  # Granite divides
            scale /= float(cfg.logits_scaling)
        cap = getattr(cfg, "final_logit_softcapping", None)
        return LensHeads(norm=norm, unembedding=unembedding, embedding=embedding, tied=tied,
                         logit_scale=scale, logit_softcap=float(cap) if cap else None)


class DecoderAdapter(Adapter):
    """Text-only decoder LMs, loaded with their LM head (LogitLens needs it; tied heads cost nothing)."""

    display_name = "decoder LM"
    model_types = (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
        "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "granite", "smollm3",
        "stablelm", "starcoder2", "cohere", "nemotron",
    )

    @classmethod
    def _load(cls, source: str, config: Any, *, dtype: Any, **kw: Any) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, **kw)
