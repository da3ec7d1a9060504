"""One small adapter per architecture: where a model keeps its language model.

The rest of latentlens never asks a transformers model where its decoder
stack, layers or tokenizer are; it asks the adapter picked for the model's
config. Loading is split into small overridable hooks (``_load_config``,
``_load``, ``_load_tokenizer``), in the style of nnsight's loadable mixins,
so adding an architecture is a subclass of a few lines.

A vision-language model's adapter loads the whole model and hands back only
its language model (transformers 5 keeps it at ``model.model.language_model``),
so ingesting a VLM runs its language model on text and nothing else.
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
    """How to load one family of models and find its decoder stack."""

    #: config.model_type values this adapter handles
    model_types: ClassVar[tuple[str, ...]] = ()
    #: whether the model also has a vision side that ingest leaves unused
    multimodal: ClassVar[bool] = False

    # ---- loading hooks ---------------------------------------------------

    def _load_config(self, source: str, **kw: Any):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, **kw)

    def _load(self, source: str, config, *, dtype, **kw: Any):
        """Load the smallest model that contains the decoder stack."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(source, config=config, dtype=dtype, **kw)

    def _load_tokenizer(self, source: str, **kw: Any):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, **kw)

    # ---- structure -------------------------------------------------------

    def text_config(self, config):
        """The config that holds hidden_size and num_hidden_layers."""
        return config

    def language_model(self, model):
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

    def layers(self, model):
        return self.language_model(model).layers

    def heads(self, model) -> LensHeads:
        """Final norm, LM head and input embedding of a loaded model (LLM or VLM), tied or not."""
        lm = self.language_model(model)
        norm = next((getattr(lm, n) for n in ("norm", "final_layernorm", "ln_f") if hasattr(lm, n)), None)
        if norm is None:
            raise InputError(f"cannot find the final norm of {type(model).__name__}")
        embedding = lm.embed_tokens.weight
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        cfg = self.text_config(model.config)
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

    model_types = (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
        "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "granite", "smollm3",
        "stablelm", "starcoder2", "cohere", "nemotron",
    )

    def _load(self, source: str, config, *, dtype, **kw: Any):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, **kw)


class _VisionLanguageAdapter(Adapter):
    """A VLM: load it whole, keep its language model, drop the rest."""

    multimodal = True
    model_class: ClassVar[str] = ""

    def _load(self, source: str, config, *, dtype, **kw: Any):
        import transformers

        cls = getattr(transformers, self.model_class)
        return cls.from_pretrained(source, config=config, dtype=dtype, **kw)

    def text_config(self, config):
        return config.text_config

    def language_model(self, model):
        inner = getattr(model, "model", model)
        lm = getattr(inner, "language_model", None)
        if lm is None:
            raise InputError(f"cannot find the language model inside {type(model).__name__}")
        return lm


class LlavaAdapter(_VisionLanguageAdapter):
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"


class LlavaNextAdapter(_VisionLanguageAdapter):
    model_types = ("llava_next",)
    model_class = "LlavaNextForConditionalGeneration"


class Qwen2VLAdapter(_VisionLanguageAdapter):
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"


class Qwen25VLAdapter(_VisionLanguageAdapter):
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"


class Gemma3VLAdapter(_VisionLanguageAdapter):
    model_types = ("gemma3",)
    model_class = "Gemma3ForConditionalGeneration"


class Qwen3VLAdapter(_VisionLanguageAdapter):
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"


class LlavaOnevisionAdapter(_VisionLanguageAdapter):
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"


class Idefics3Adapter(_VisionLanguageAdapter):
    """Idefics3 keeps its language model at ``model.model.text_model``."""

    model_types = ("idefics3",)
    model_class = "Idefics3ForConditionalGeneration"

    def language_model(self, model):
        lm = getattr(getattr(model, "model", model), "text_model", None)
        if lm is None:
            raise InputError(f"cannot find the language model inside {type(model).__name__}")
        return lm


class SmolVLMAdapter(Idefics3Adapter):
    model_types = ("smolvlm",)
    model_class = "SmolVLMForConditionalGeneration"


class PaliGemmaAdapter(_VisionLanguageAdapter):
    """PaliGemma's text config asks for bidirectional attention (its prefix-LM prompt);
    run alone on a corpus, its language model would then attend to later tokens
    too. Loaded here it is causal, as PaliGemma reads the text it writes."""

    model_types = ("paligemma",)
    model_class = "PaliGemmaForConditionalGeneration"

    def _load(self, source: str, config, *, dtype, **kw: Any):
        config.text_config.use_bidirectional_attention = False
        return super()._load(source, config, dtype=dtype, **kw)



class InternVLAdapter(_VisionLanguageAdapter):
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"


class Molmo2VLAdapter(_VisionLanguageAdapter):
    """Molmo2's input embedding has ``additional_vocab_size`` rows past the LM head's
    (the image and other special tokens); EmbeddingLens ranks them too."""

    model_types = ("molmo2",)
    model_class = "Molmo2ForConditionalGeneration"


ADAPTERS: tuple[type[Adapter], ...] = (
    DecoderAdapter, LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen25VLAdapter,
    Gemma3VLAdapter, Idefics3Adapter, SmolVLMAdapter, PaliGemmaAdapter,
    Qwen3VLAdapter, LlavaOnevisionAdapter,
    InternVLAdapter, Molmo2VLAdapter,
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for_config(config) -> Adapter:
    """The adapter for a transformers config; a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    raise InputError(
        f"unsupported architecture '{model_type}' "
        f"(supported model types: {', '.join(supported_model_types())})"
    )


def language_model_of(model):
    """The decoder stack of a loaded transformers model (LLM or supported VLM)."""
    return adapter_for_config(model.config).language_model(model)


def heads_of(model) -> LensHeads:
    """The vocabulary-lens heads of a loaded transformers model (LLM or supported VLM)."""
    return adapter_for_config(model.config).heads(model)
