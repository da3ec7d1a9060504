"""The VLM base: everything a vision-language family needs except its quirks.

One forward pass per image: the chat template wraps the prompt and one image
placeholder, the placeholder is expanded to one token per visual token, and
the model runs with ``output_hidden_states``. A pre-hook on the language
model records ``inputs_embeds`` (the visual tokens as they enter the LLM,
after the projector: "visual layer 0"); hidden_states[l] at the image-token
positions gives layer l.

A family (one module in ``latentlens.architectures``, one class) supplies
only what differs between architectures: which transformers class to load,
how the image is preprocessed and where its tokens sit (``prepare_image``),
and any extra forward inputs. The class is its own text-side adapter too
(``latentlens.architectures.base.Adapter``): ingest loads the same class's
language model, so the text index and the visual tokens come from one place.
The processor,
when it loads, is used for its chat template only; pixels and tokens always
go through the image processor and tokenizer here, one code path for users
with and without torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import numpy as np
import torch
from PIL import Image

from latentlens.architectures.base import Adapter
from latentlens.errors import InputError
from latentlens.store.types import check_layer_range
from latentlens.vlm.geometry import Patch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# what an adapter's model_class returns (transformers is imported only when a model loads)
ModelClass: TypeAlias = "type[PreTrainedModel]"

DEFAULT_PROMPT = "Describe this image in detail."

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass
class PreparedImage:
    """What the image processor made of an image and where its tokens sit."""

    inputs: dict[str, torch.Tensor]  # pixel_values and friends, for forward()
    num_tokens: int  # image placeholder tokens in the prompt
    first_grid_token: int  # tokens before the grid (e.g. a kept CLS token)
    grid: tuple[int, int]  # (rows, cols)
    patches: list[Patch]
    canvas_size: tuple[int, int]  # (w, h) the vision tower saw
    # offsets of the grid's tokens among the image tokens, when they are not one
    # contiguous run from first_grid_token (e.g. LLaVA-NeXT's row-end newline tokens)
    grid_offsets: list[int] | None = None
    # what the adapter's expand_placeholder needs beyond the token count (e.g. Idefics3's crop
    # rows and columns, Molmo2's whole image string)
    layout: Any = None


@dataclass
class VisualTokens:
    """Visual tokens of one image: vectors per layer, grid and boxes.

    ``vectors[layer]`` is float32 [P, D] with P = rows * cols, row-major like
    ``patches``. Layer 0 is the projector output as it enters the LLM, layer
    l >= 1 the LLM's hidden_states[l] at the image-token positions.
    """

    vectors: dict[int, np.ndarray]
    grid: tuple[int, int]
    patches: list[Patch]
    image_size: tuple[int, int]
    canvas_size: tuple[int, int]
    prompt: str
    positions: np.ndarray = field(repr=False)  # sequence positions of the grid tokens

    def __len__(self) -> int:
        return len(self.patches)


class VisionLanguageModel(Adapter):
    """A loaded VLM behind a small, architecture-neutral interface; the class is its text-side adapter."""

    multimodal = True
    #: the chat template's text for one image, expanded to one token per visual token
    image_placeholder: ClassVar[str] = "<image>"
    #: used when neither the processor nor the tokenizer has a chat template
    fallback_template: ClassVar[str] = ""

    def __init__(
        self, model: Any, tokenizer: Any, image_processor: Any, *,
        processor: Any = None, name: str = "", revision: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor = processor
        self.name = name
        self.revision = revision

    # ---- loading --------------------------------------------------------

    @classmethod
    def model_class(cls) -> ModelClass:
        raise NotImplementedError

    # ---- the text side (ingest, the lenses): load it whole, keep its language model --------

    @classmethod
    def _load(cls, source: str, config: Any, *, dtype: Any, **kw: Any) -> Any:
        return cls.model_class().from_pretrained(source, config=config, dtype=dtype, **kw)

    @classmethod
    def text_config_of(cls, config: Any) -> Any:
        return config.text_config

    @classmethod
    def language_model_of(cls, model: Any) -> Any:
        inner = getattr(model, "model", model)
        lm = getattr(inner, "language_model", None)
        if lm is None:
            raise InputError(f"cannot find the language model inside {type(model).__name__}")
        return lm

    @classmethod
    def from_pretrained(
        cls, source: str, *, dtype: str = "float32", device: str | None = None,
        revision: str | None = None,
    ) -> VisionLanguageModel:
        from transformers import AutoProcessor, AutoTokenizer

        torch_dtype = resolve_dtype(dtype)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from latentlens.models.loading import loading_weights

        with loading_weights():
            # transformers hints revision as str; None (the default branch) works as everywhere else
            model = cls.model_class().from_pretrained(
                source, revision=revision, dtype=torch_dtype)  # type: ignore[arg-type]
        # PreTrainedModel.to is wrapped (functools.wraps), which hides its bound signature from mypy
        model = model.to(dev).eval()  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        image_processor = cls._load_image_processor(source, revision)
        try:
            # only for its chat template; fails e.g. for Qwen2-VL without torchvision
            processor = AutoProcessor.from_pretrained(source, revision=revision)
        except Exception:  # noqa: BLE001 - any failure just means "no processor"
            processor = None
        return cls(model, tokenizer, image_processor, processor=processor, name=source, revision=revision,
                   **cls._init_options(source, revision))

    @classmethod
    def _load_image_processor(cls, source: str, revision: str | None) -> Any:
        """Hook: the image processor (an architecture may need another without torchvision)."""
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(source, revision=revision)

    @classmethod
    def _init_options(cls, source: str, revision: str | None) -> dict:
        """Hook: extra keyword arguments for the constructor, read from the checkpoint."""
        return {}

    # ---- shape ----------------------------------------------------------

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def text_config(self) -> Any:
        return getattr(self.config, "text_config", self.config)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Decoder blocks of the language model: layers are 0 .. num_layers."""
        return int(self.text_config.num_hidden_layers)

    @property
    def image_token_id(self) -> int:
        cfg = self.config
        for key in ("image_token_id", "image_token_index"):
            v = getattr(cfg, key, None)
            if v is not None:
                return int(v)
        return int(self.tokenizer.convert_tokens_to_ids(self.image_placeholder))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack, where this family's text side finds it for ingest."""
        lm: torch.nn.Module = type(self).language_model_of(self.model)
        return lm

    @property
    def heads(self) -> Any:
        """Final norm, LM head and input embedding of the language model (for the baselines)."""
        return type(self).heads_of(self.model)

    # ---- architecture hooks ---------------------------------------------

    def prepare_image(self, image: Image.Image, resolution: tuple[int, int] | None) -> PreparedImage:
        raise NotImplementedError

    def expand_placeholder(self, text: str, prepared: PreparedImage) -> str:
        """The prompt with the image placeholder expanded to one token per visual token."""
        return text.replace(self.image_placeholder, self.image_placeholder * prepared.num_tokens)

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs beyond ids, mask and the image's (e.g. Qwen2-VL's mm_token_type_ids)."""
        return {}

    # ---- prompt ---------------------------------------------------------

    def chat_text(self, prompt: str) -> str:
        """The chat template applied to one user turn: an image, then the prompt."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        for owner in (self.processor, self.tokenizer):
            if owner is not None and getattr(owner, "chat_template", None):
                try:
                    text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                except Exception:  # noqa: BLE001 - a template that cannot render images
                    continue
                if isinstance(text, list):
                    text = text[0]
                if self.image_placeholder in text:
                    return text
        from jinja2 import Template

        return Template(self.fallback_template).render(messages=messages, add_generation_prompt=True)

    def encode(
        self, image: Image.Image, prompt: str, resolution: tuple[int, int] | None
    ) -> tuple[dict, PreparedImage]:
        prepared = self.prepare_image(image, resolution)
        text = self.chat_text(prompt)
        if text.count(self.image_placeholder) != 1:
            raise InputError(
                f"the chat template of '{self.name}' must hold one {self.image_placeholder!r}, "
                f"got {text.count(self.image_placeholder)}"
            )
        text = self.expand_placeholder(text, prepared)
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and text.startswith(bos))
        enc = self.tokenizer(text, add_special_tokens=add_special, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        inputs.update(self.extra_inputs(enc["input_ids"]))
        inputs.update(prepared.inputs)
        return inputs, prepared

    # ---- the forward pass -----------------------------------------------

    @torch.no_grad()
    def visual_tokens(
        self, image: Image.Image, *, layers: Sequence[int], prompt: str = DEFAULT_PROMPT,
        resolution: tuple[int, int] | None = None,
    ) -> VisualTokens:
        layers = check_layer_range(layers, self.num_layers, self.name, visual=True)
        image = image.convert("RGB")
        inputs, prep = self.encode(image, prompt, resolution)
        ids = inputs["input_ids"][0]
        positions = torch.nonzero(ids == self.image_token_id).flatten()
        if len(positions) != prep.num_tokens:
            raise InputError(
                f"expected {prep.num_tokens} image tokens in the prompt, found {len(positions)}: "
                "does the tokenizer split the image token?"
            )
        if prep.grid_offsets is not None:
            positions = positions[torch.as_tensor(prep.grid_offsets, dtype=torch.long)]
        else:
            positions = positions[prep.first_grid_token: prep.first_grid_token + len(prep.patches)]
        dev = self.device
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)

        captured: dict[str, torch.Tensor] = {}

        def grab(_module: Any, args: tuple, kwargs: dict) -> None:
            emb = kwargs.get("inputs_embeds")
            if emb is not None:
                captured["embeds"] = emb

        handle = self.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = self.model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
        finally:
            handle.remove()
        hidden = out.hidden_states
        pos = positions.to(dev)
        vectors: dict[int, np.ndarray] = {}
        for layer in layers:
            if layer == 0 and "embeds" in captured:
                h = captured["embeds"][0, pos]
            else:
                h = hidden[layer][0, pos]
            vectors[layer] = h.float().cpu().numpy()
        return VisualTokens(
            vectors=vectors, grid=prep.grid, patches=prep.patches, image_size=image.size,
            canvas_size=prep.canvas_size, prompt=prompt, positions=positions.cpu().numpy(),
        )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype '{dtype}' (use float32, bfloat16 or float16)") from None
