"""Idefics3 and SmolVLM (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration).

A SigLIP-style tower sees square crops of ``max_image_size`` px; the
connector pixel-shuffles each crop's patch grid (``scale_factor`` x
``scale_factor`` neighbouring patches become one token, row-major) and
projects it into the language model: one crop gives
``(crop // patch // scale)^2`` tokens of ``patch * scale`` crop pixels each.

Image splitting (the processors' default): the image is resized so its
longest edge is ``size["longest_edge"]`` (aspect kept), then up to the next
multiples of the crop size, and cut into rows x cols crops; a global view
(that canvas stretched to one crop) comes last. The prompt holds, per crop,
``<fake_token_around_image><row_r_col_c>`` + its image tokens, a newline after
each row of crops, then ``\\n<fake_token_around_image><global-img>`` + the
global view's tokens + ``<fake_token_around_image>``. Without splitting (or
when the image fits one crop) the whole image is stretched to one crop and
only the global part is there.

The grid reported here is the high-resolution one: the crops' tokens laid out
as one grid over the split canvas (rows * side x cols * side tokens; tokens
found by offset, the way LLaVA-NeXT's are). The global view's tokens are left
out; without splitting the grid is the global view's. Every step is a resize of
the whole image, so a box is its canvas cell stretched back to the original.
When the tower's patches do not fill a crop (SmolVLM2: 384-px crops, 27 patches
of 14 px = 378 px) the last few pixels of each crop are seen by no token, and
the boxes leave those thin strips uncovered.

``resolution`` (w, h) squashes the image to w x h and sets the processor's
longest edge to max(w, h), so the split canvas is about w x h (sides rounded up
to multiples of the crop size): e.g. SmolVLM (512-px crops) at 1024 -> 2 x 2
crops -> a 16 x 16 grid; at 512 -> no split, 8 x 8 tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

from PIL import Image

from latentlens.errors import InputError
from latentlens.vlm.base import ModelClass, PreparedImage, VisionLanguageModel
from latentlens.vlm.geometry import Affine, Patch, stretch

# the chat templates of HuggingFaceM4/Idefics3-8B-Llama3 and HuggingFaceTB/SmolVLM*
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'].capitalize() }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_TEMPLATE = "<|im_start|>" + IDEFICS3_TEMPLATE.removeprefix("<|begin_of_text|>")


class Idefics3VLM(VisionLanguageModel):
    display_name = "Idefics3"
    model_types = ("idefics3",)
    image_placeholder = "<image>"
    fallback_template: ClassVar[str] = IDEFICS3_TEMPLATE

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    @classmethod
    def language_model_of(cls, model: Any) -> Any:
        """Idefics3 keeps its language model at ``model.model.text_model``."""
        lm = getattr(getattr(model, "model", model), "text_model", None)
        if lm is None:
            raise InputError(f"cannot find the language model inside {type(model).__name__}")
        return lm

    # ---- tokens -----------------------------------------------------------

    def _token(self, attr: str, default: str) -> str:
        return getattr(self.tokenizer, attr, None) or default

    @property
    def tokens_per_crop(self) -> int:
        """Image tokens per crop (the model's image_seq_len)."""
        vc = self.config.vision_config
        return int((int(vc.image_size) // int(vc.patch_size)) ** 2 / int(self.config.scale_factor) ** 2)

    def expand_placeholder(self, text: str, prepared: PreparedImage) -> str:
        """The processor's image string: per crop a row/col marker and its tokens, then the global view
        (``prepared.layout``: the crops' rows and columns, None without splitting)."""
        n = self.tokens_per_crop
        num_tokens = prepared.num_tokens
        rows, cols = prepared.layout or (0, 0)
        if ((rows * cols + 1) * n if rows else n) != num_tokens:
            if num_tokens != n:
                raise InputError(f"{num_tokens} image tokens do not make whole crops of {n}")
            rows = cols = 0
        image = self._token("image_token", "<image>") * n
        fake = self._token("fake_image_token", "<fake_token_around_image>")
        glob = self._token("global_image_token", "<global-img>")
        split = "".join(
            "".join(f"{fake}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n" for r in range(rows)
        )
        expanded = split + ("\n" if rows else "") + f"{fake}{glob}{image}{fake}"
        return text.replace(self.image_placeholder, expanded)

    # ---- pixels -----------------------------------------------------------

    def _splitting(self) -> bool:
        return bool(getattr(self.image_processor, "do_image_splitting", True))

    def prepare_image(self, image: Image.Image, resolution: tuple[int, int] | None) -> PreparedImage:
        original = image.size
        kwargs: dict[str, Any] = {"return_row_col_info": True}
        if resolution:
            image = image.resize(resolution, Image.Resampling.BICUBIC)
            if self._splitting():
                kwargs["size"] = {"longest_edge": max(resolution)}
        out = self.image_processor(images=[image], return_tensors="pt", **kwargs)
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        pixel_values = out["pixel_values"]
        crop_h, crop_w = (int(v) for v in pixel_values.shape[-2:])
        vc = self.config.vision_config
        patch, scale = int(vc.patch_size), int(self.config.scale_factor)
        side = crop_h // patch // scale
        n = self.tokens_per_crop
        if crop_h != crop_w or side * side != n:
            raise InputError(
                f"{type(self.image_processor).__name__} made {crop_w}x{crop_h} crops, which give "
                f"{side * side} tokens each, but the model expects {n} (its vision image_size "
                f"{vc.image_size}): the image processor and the model do not match"
            )
        cell = patch * scale
        crops = (rows, cols) if rows and cols else (1, 1)
        canvas = (crops[1] * crop_w, crops[0] * crop_h)
        t = stretch(original, canvas)  # every processor step resizes the whole image
        grid = (crops[0] * side, crops[1] * side)
        patches = _crop_grid_patches(grid, side, cell, (crop_w, crop_h), t, original)
        split = bool(rows and cols)
        num_tokens = (rows * cols + 1) * n if split else n
        offsets = None
        if split:
            # crop (R, C) holds grid rows R*side.., cols C*side..; its tokens are row-major
            offsets = [((r // side) * cols + c // side) * n + (r % side) * side + c % side
                       for r in range(grid[0]) for c in range(grid[1])]
        return PreparedImage(
            inputs={k: out[k] for k in ("pixel_values", "pixel_attention_mask") if k in out},
            num_tokens=num_tokens, first_grid_token=0, grid=grid, patches=patches,
            canvas_size=canvas, grid_offsets=offsets, layout=(rows, cols) if split else None,
        )


def _crop_grid_patches(
    grid: tuple[int, int], side: int, cell: int, crop: tuple[int, int], t: Affine, image_size: tuple[int, int]
) -> list[Patch]:
    """Row-major boxes of a grid of crops, each ``side`` x ``side`` cells of ``cell`` canvas px.

    Cell k along an axis starts at crop (k // side)'s origin + (k % side) * cell; when
    side * cell is less than the crop, the rest of each crop belongs to no cell.
    """

    def edges(n: int, crop_px: int, axis: int, hi: int) -> list[tuple[float, float]]:
        out = []
        for k in range(n):
            a = (k // side) * crop_px + (k % side) * cell
            lo_hi = (t.inverse_point(a, a)[axis], t.inverse_point(a + cell, a + cell)[axis])
            lo, up = (round(min(max(v, 0.0), float(hi)), 3) for v in lo_hi)
            out.append((lo, up))
        return out

    xs = edges(grid[1], crop[0], 0, image_size[0])
    ys = edges(grid[0], crop[1], 1, image_size[1])
    return [Patch(r * grid[1] + c, r, c, (xs[c][0], ys[r][0], xs[c][1], ys[r][1]))
            for r in range(grid[0]) for c in range(grid[1])]


class SmolVLM(Idefics3VLM):
    display_name = "SmolVLM"
    model_types = ("smolvlm",)
    fallback_template: ClassVar[str] = SMOLVLM_TEMPLATE

    @classmethod
    def model_class(cls) -> ModelClass:
        from transformers import SmolVLMForConditionalGeneration

        return SmolVLMForConditionalGeneration
