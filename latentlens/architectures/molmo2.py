"""Molmo2 (Molmo2ForConditionalGeneration, transformers >= 5: allenai/Molmo2-4B, -8B, -O-7B).

The image processor makes a low-resolution view (the whole image stretched
to one 378-px crop) and a high-resolution one: it picks a tiling of
overlapping 378-px crops (at most ``max_crops``; neighbouring crops overlap
by the ``overlap_margins``, 4 + 4 patches), stretches the whole image to the
canvas they cover and cuts the crops. Of each crop's 14-px patches only
those outside the margins shared with a neighbour are kept, so the kept
patches form one seamless grid over the canvas (canvas / 14 per side). The
adapter attention-pools each 2 x 2 block of that grid (``pooling_size``; an
odd side is padded at the end) into one token: ``image_grids`` gives
(low rows, low cols, high rows, high cols) of pooled tokens.

The chat template puts ``<|image|>`` before the first turn and the
processor prepends the BOS token (``<|im_end|>`` in the real checkpoints);
``<|image|>`` becomes ``<low_res_im_start>`` + the low-res rows + ``<im_end>``
+ ``<im_start>`` + the high-res rows + ``<im_end>``, each row its
``<im_patch>`` tokens followed by ``<im_col>`` (the processor's
``image_use_col_tokens`` / ``use_single_crop_col_tokens`` /
``use_single_crop_start_token``, read from processor_config.json). All those
image tokens attend to each other both ways (``mm_token_type_ids`` = 1).

The grid reported is the high-resolution one (rows x cols pooled tokens,
each 2 x 2 patches = 28 x 28 canvas pixels, tiling the whole image; a
padded last row/column covers one patch); the low-resolution view's tokens
are left out, as LLaVA-NeXT's base view is. ``resolution`` squashes the
image to that size first, which changes the tiling and so the grid.

Visual layer 0 is what enters the language model, as for every
architecture; Molmo2 *adds* the pooled image features to the ``<im_patch>``
token's embedding (other models replace it), so layer 0 is
``get_image_features(...) + embed(<im_patch>)``.

The text side is the base's: Molmo2's input embedding has
``additional_vocab_size`` rows past the LM head's (the image and other special
tokens), and EmbeddingLens ranks them too.

Molmo2's image processor exists only with the torchvision backend. Without
torchvision the adapter runs transformers' own Molmo2 preprocessing code
(tiling, crops, patch and pooling indices) with the two torchvision calls
it makes, a bilinear resize without antialiasing and the fused
rescale + normalise, done in plain torch the way torchvision does them
(``TorchMolmo2ImageProcessor``), so the pixels are the same either way.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, cast

import numpy as np
import torch
from PIL import Image

from latentlens.errors import InputError
from latentlens.vlm.base import ModelClass, PreparedImage, VisionLanguageModel
from latentlens.vlm.geometry import Affine, grid_patches, stretch

#: the tokens the processor marks as image tokens (``Molmo2Processor.image_token_ids``)
IMAGE_TOKENS = ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>",
                "<im_end>", "<frame_end>", "<im_low>")
#: Molmo2Processor's defaults for the image token layout
LAYOUT_DEFAULTS = {"image_use_col_tokens": True, "use_single_crop_col_tokens": None,
                   "use_single_crop_start_token": True}


class Molmo2VLM(VisionLanguageModel):
    display_name = "Molmo2"
    model_types = ("molmo2",)
    image_placeholder = "<|image|>"
    fallback_template: ClassVar[str] = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>"
        "{% endif %}{% endfor %}{% endfor %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, *,
                 processor_options: dict | None = None, **kw: Any):
        super().__init__(model, tokenizer, image_processor, **kw)
        self.processor_options = dict(processor_options or {})

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import Molmo2ForConditionalGeneration

        return Molmo2ForConditionalGeneration

    @classmethod
    def _load_image_processor(cls, source: str, revision: str | None) -> Any:
        # transformers' Molmo2 image processor needs torchvision: a torch-only stand-in without it
        return load_image_processor(source, revision=revision)

    @classmethod
    def _init_options(cls, source: str, revision: str | None) -> dict:
        # the token layout options live in processor_config.json (the processor needs torchvision)
        return {"processor_options": _processor_config(source, revision)}

    # ---- prompt ---------------------------------------------------------

    def chat_text(self, prompt: str) -> str:
        # Molmo2Processor prepends the BOS token (or EOS) when the prompt lacks it
        text = super().chat_text(prompt)
        start = getattr(self.tokenizer, "bos_token", None) or getattr(self.tokenizer, "eos_token", None)
        if start and not text.startswith(start):
            text = start + text
        return text

    def _option(self, key: str) -> Any:
        if self.processor is not None and hasattr(self.processor, key):
            return getattr(self.processor, key)
        return self.processor_options.get(key, LAYOUT_DEFAULTS[key])

    def image_string(self, grids: tuple[int, int, int, int]) -> str:
        """What the processor puts in place of ``<|image|>`` (Molmo2Processor.replace_image_token)."""
        low_h, low_w, high_h, high_w = grids
        col = bool(self._option("image_use_col_tokens"))
        single_col = self._option("use_single_crop_col_tokens")
        single_col = col if single_col is None else bool(single_col)
        low_start = "<low_res_im_start>" if self._option("use_single_crop_start_token") else "<im_start>"
        high = "<im_start>" + ("<im_patch>" * high_w + ("<im_col>" if col else "")) * high_h + "<im_end>"
        low = low_start + ("<im_patch>" * low_w + ("<im_col>" if single_col else "")) * low_h + "<im_end>"
        return low + high

    def expand_placeholder(self, text: str, prepared: PreparedImage) -> str:
        expansion = prepared.layout  # the image string prepare_image made
        if expansion is None or expansion.count("<im_patch>") != prepared.num_tokens:
            raise InputError("Molmo2: expand_placeholder needs the image string of its prepare_image")
        return text.replace(self.image_placeholder, expansion)

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # every image token (patches, row ends, starts and ends) attends to every other one
        ids = [i for i in self.tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
               if i is not None and i != self.tokenizer.unk_token_id]
        return {"mm_token_type_ids": torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype)).long()}

    # ---- geometry -------------------------------------------------------

    def prepare_image(self, image: Image.Image, resolution: tuple[int, int] | None) -> PreparedImage:
        from transformers.models.molmo2.image_processing_molmo2 import compute_crop_geometry

        original = image.size
        if resolution:
            image = image.resize(resolution, Image.Resampling.BICUBIC)
        out = self.image_processor(images=[image], return_tensors="pt")
        low_h, low_w, rows, cols = (int(v) for v in out["image_grids"][0])
        ip = self.image_processor
        crop = int(_size(ip)[0])
        patch = int(ip.patch_size)
        pool_h, pool_w = (int(v) for v in ip.pooling_size)
        w, h = image.size
        _, _, canvas_h, canvas_w = compute_crop_geometry(
            h, w, max_crops=int(ip.max_crops), overlap_margins=list(ip.overlap_margins),
            crop_size=crop, patch_size=patch,
        )
        ph, pw = canvas_h // patch, canvas_w // patch  # the canvas's patch grid
        if (math.ceil(ph / pool_h), math.ceil(pw / pool_w)) != (rows, cols):
            raise InputError(
                f"{type(ip).__name__} made a {rows}x{cols} token grid for a {w}x{h} image, expected "
                f"{math.ceil(ph / pool_h)}x{math.ceil(pw / pool_w)}: its tiling rule is not the one this adapter knows"
            )
        # arange_for_pooling pads an odd side with (pool * n - side) // 2 patches before it
        top, left = (pool_h * rows - ph) // 2, (pool_w * cols - pw) // 2
        transform = stretch((w, h), (canvas_w, canvas_h)).then(Affine(1, 1, left * patch, top * patch))
        if resolution:
            transform = stretch(original, image.size).then(transform)
        patches = grid_patches(rows, cols, (pool_w * patch, pool_h * patch), transform, original)
        inputs = {k: out[k] for k in ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops")
                  if k in out}
        return PreparedImage(
            inputs=inputs, num_tokens=low_h * low_w + rows * cols, first_grid_token=low_h * low_w,
            grid=(rows, cols), patches=patches, canvas_size=(canvas_w, canvas_h),
            layout=self.image_string((low_h, low_w, rows, cols)),
        )


# ---------------------------------------------------------------------------
# the image processor, with and without torchvision


def load_image_processor(source: str, revision: str | None = None) -> Any:
    """Molmo2's image processor; without torchvision, ``TorchMolmo2ImageProcessor``."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source, revision=revision)
    except (ImportError, ValueError):  # transformers 5.24 says "Missing optional dependencies" in a ValueError
        import importlib.util

        if importlib.util.find_spec("torchvision") is not None:
            raise
    return TorchMolmo2ImageProcessor.from_pretrained(source, revision=revision)


def _processor_config(source: str, revision: str | None) -> dict:
    from transformers.utils import cached_file

    try:
        path = cached_file(source, "processor_config.json", revision=revision,
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return {}
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {k: data[k] for k in LAYOUT_DEFAULTS if k in data}


def _size(ip: Any) -> tuple[int, int]:
    size = ip.size
    if isinstance(size, dict):
        return int(size["height"]), int(size["width"])
    return int(size.height), int(size.width)


class TorchMolmo2ImageProcessor:
    """Molmo2ImageProcessor without torchvision.

    ``__call__`` runs transformers' own ``Molmo2ImageProcessor._preprocess``
    (tiling, overlapping crops, patches, pooling indices) on this object; the
    only torchvision calls that code makes are ``resize`` (bilinear, no
    antialiasing, on float tensors: ``torch.nn.functional.interpolate``
    underneath) and ``rescale_and_normalize`` (mean and std scaled by
    1 / rescale_factor, then (x - mean) / std in float32), both done here the
    same way. Settings come from preprocessor_config.json. (Duck typing: the
    borrowed methods get this object as ``self``, hence ``cast(Any, self)``.)
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_token_pooling", "image_grids",
                                              "image_num_crops"]

    def __init__(self, **config: Any):
        from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

        size = config.get("size") or {"height": 378, "width": 378}
        self.size = {"height": int(size["height"]), "width": int(size["width"])}
        self.max_crops = int(config.get("max_crops", 8))
        self.overlap_margins = [int(v) for v in config.get("overlap_margins", [4, 4])]
        self.patch_size = int(config.get("patch_size", 14))
        self.pooling_size = [int(v) for v in config.get("pooling_size", [2, 2])]
        self.image_mean = list(config.get("image_mean") or IMAGENET_STANDARD_MEAN)
        self.image_std = list(config.get("image_std") or IMAGENET_STANDARD_STD)
        self.rescale_factor = float(config.get("rescale_factor", 1 / 255))
        self.do_rescale = bool(config.get("do_rescale", True))
        self.do_normalize = bool(config.get("do_normalize", True))
        self.resample = int(config.get("resample", 2))
        if self.resample != 2:
            raise InputError(f"Molmo2 without torchvision supports bilinear resizing only (resample=2), "
                             f"this checkpoint asks for {self.resample}: install torchvision")

    @classmethod
    def from_pretrained(cls, source: str, revision: str | None = None) -> TorchMolmo2ImageProcessor:
        from transformers.image_processing_base import ImageProcessingMixin

        config, _ = ImageProcessingMixin.get_image_processor_dict(source, revision=revision)
        return cls(**config)

    def __call__(self, images: list[Image.Image], return_tensors: str = "pt", **_: Any) -> Any:
        from transformers.image_utils import PILImageResampling, SizeDict
        from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

        tensors = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous() for im in images]
        return Molmo2ImageProcessor._preprocess(
            cast(Any, self), tensors, do_resize=True, size=SizeDict(**self.size),
            resample=PILImageResampling(self.resample), do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor, do_normalize=self.do_normalize, image_mean=self.image_mean,
            image_std=self.image_std, do_convert_rgb=True, max_crops=self.max_crops,
            overlap_margins=self.overlap_margins, patch_size=self.patch_size, pooling_size=self.pooling_size,
            disable_grouping=None, return_tensors=return_tensors,
        )

    # ---- what Molmo2ImageProcessor._preprocess calls on its backend ------

    def _image_batch_to_patches_and_grids(self, *args: Any, **kw: Any) -> Any:
        from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

        return Molmo2ImageProcessor._image_batch_to_patches_and_grids(cast(Any, self), *args, **kw)

    def _build_overlapping_crops(self, *args: Any, **kw: Any) -> Any:
        from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

        return Molmo2ImageProcessor._build_overlapping_crops(cast(Any, self), *args, **kw)

    def resize(self, image: torch.Tensor, size: Any, resample: Any = None, antialias: bool = True,
               **_: Any) -> torch.Tensor:
        if resample is not None and int(resample) != 2:
            raise InputError("Molmo2 without torchvision supports bilinear resizing only: install torchvision")
        if not image.is_floating_point():
            raise InputError("Molmo2 without torchvision resizes float images only")
        shape = image.shape
        flat = image.reshape(-1, *shape[-3:])
        out = torch.nn.functional.interpolate(flat, size=(int(size.height), int(size.width)), mode="bilinear",
                                              align_corners=False, antialias=antialias)
        return out.reshape(*shape[:-2], *out.shape[-2:])

    def rescale_and_normalize(self, images: torch.Tensor, do_rescale: bool, rescale_factor: float,
                              do_normalize: bool, image_mean: Any, image_std: Any) -> torch.Tensor:
        if do_normalize:
            mean = torch.tensor(image_mean, device=images.device)
            std = torch.tensor(image_std, device=images.device)
            if do_rescale:
                mean, std = mean * (1.0 / rescale_factor), std * (1.0 / rescale_factor)
            return images.to(torch.float32).sub(mean.view(-1, 1, 1)).div(std.view(-1, 1, 1))
        if do_rescale:
            return images * rescale_factor
        return images
