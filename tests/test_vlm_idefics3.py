"""Idefics3 / SmolVLM: tiny random models built from configs, end to end.

The grid is the high-resolution one over the split canvas (crops' tokens, the
global view left out); see latentlens/architectures/idefics3.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vlm_checks import area as _area
from vlm_checks import assert_logitlens_matches_own_logits, cli_ingest_query_report
from vlm_tiny import sample_image
from vlm_tiny_idefics3 import build_idefics3

from latentlens.vlm import extract_visual_tokens, load_vlm

SIZES = [(96, 48), (64, 64), (40, 100), (200, 120)]
KINDS = ["idefics3", "smolvlm"]
TOL = 0.5  # px


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("idefics3")
    return {"idefics3": build_idefics3(base / "tiny-idefics3"),
            "smolvlm": build_idefics3(base / "tiny-smolvlm", smol=True)}


@pytest.fixture(scope="module")
def vlms(model_dirs) -> dict:
    return {kind: load_vlm(str(d)) for kind, d in model_dirs.items()}


def _assert_disjoint_inside(patches, size):
    w, h = size
    for p in patches:
        x0, y0, x1, y1 = p.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, p
    for a in patches:
        for b in patches:
            if a.idx < b.idx:
                ox = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
                oy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                assert ox <= 1e-9 or oy <= 1e-9, (a, b)


def _covered_fraction(vlm) -> float:
    """The share of each crop side that the tower's patches cover (1 when they fill it)."""
    vc = vlm.config.vision_config
    return (vc.image_size // vc.patch_size) * vc.patch_size / vc.image_size


# ---------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("size", SIZES[:3])
@pytest.mark.parametrize("kind", KINDS)
def test_visual_tokens_match_the_model(vlms, kind, size):
    vlm = vlms[kind]
    img = sample_image(size)
    vt = extract_visual_tokens(vlm, img, layers=[0, 1, 3])
    rows, cols = vt.grid
    assert len(vt.patches) == rows * cols
    inputs, prep = vlm.encode(img, vt.prompt, None)
    n = vlm.tokens_per_crop
    crops = inputs["pixel_values"].shape[1]
    assert crops == rows * cols // n + 1  # the crops, then the global view
    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
        feats = vlm.model.get_image_features(
            pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"]
        ).pooler_output[0]
    mask = inputs["input_ids"][0] == vlm.image_token_id
    assert int(mask.sum()) == prep.num_tokens == len(feats) == crops * n
    # visual layer 0 = the connector's output at the grid tokens; layer l = hidden_states[l]
    np.testing.assert_allclose(vt.vectors[0], feats[prep.grid_offsets].numpy(), rtol=0, atol=1e-6)
    for layer in (1, 3):
        np.testing.assert_allclose(vt.vectors[layer], out.hidden_states[layer][0][mask][prep.grid_offsets].numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(vt.vectors[1], vt.vectors[3])
    # the global view's tokens (the last n) are not in the grid
    assert max(prep.grid_offsets) < prep.num_tokens - n


def test_prompt_equals_the_processors(vlms):
    vlm = vlms["idefics3"]
    proc = vlm.processor
    assert type(proc).__name__ == "Idefics3Processor"
    img = sample_image((96, 48))
    mine, _ = vlm.encode(img, "a dog", None)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a dog"}]}],
        add_generation_prompt=True, tokenize=False)
    ref = proc(text=text, images=[img], return_tensors="pt", add_special_tokens=False)
    for key in ("input_ids", "pixel_values", "pixel_attention_mask"):
        assert torch.equal(mine[key], ref[key]), key


def test_smolvlm_prompt_string_equals_transformers(vlms):
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    vlm = vlms["smolvlm"]
    chat = vlm.chat_text("a dog")
    assert chat.startswith("<s>User:<image>a dog")  # the tokenizer's chat template
    for size, (rows, cols) in [((96, 48), (1, 2)), ((64, 64), (2, 2))]:
        prep = vlm.prepare_image(sample_image(size), None)
        want = get_image_prompt_string(rows, cols, vlm.tokens_per_crop, "<fake_token_around_image>",
                                       "<image>", "<global-img>")
        assert vlm.expand_placeholder(chat, prep) == chat.replace("<image>", want)


@pytest.mark.parametrize("kind", KINDS)
def test_boxes_follow_the_pixels_the_model_sees(model_dirs, kind):
    """Each grid token's box centre is where the pixels it was made of came from.

    The image encodes x in red and y in green. A stand-in vision tower outputs
    each patch's mean un-normalised colour, and the connector's projection is
    set to average its pixel-shuffled block: visual layer 0 then holds the
    mean colour of the token's own pixels, through the model's own pixel
    shuffle, crop order and image-token placement.
    """
    import torch.nn.functional as F
    from PIL import Image
    from transformers.modeling_outputs import BaseModelOutput

    vlm = load_vlm(str(model_dirs[kind]))
    inner = vlm.model.model
    ip = vlm.image_processor
    patch, scale = vlm.config.vision_config.patch_size, vlm.config.scale_factor
    dim = vlm.config.vision_config.hidden_size
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)

    def colour_tower(pixel_values, patch_attention_mask=None, **kw):
        rgb = (pixel_values * std + mean) * 255
        pooled = F.avg_pool2d(rgb, patch)  # like the patch conv, drops a partial last patch
        feats = torch.zeros(rgb.shape[0], pooled.shape[-2] * pooled.shape[-1], dim)
        feats[..., :3] = pooled.flatten(2).transpose(1, 2)
        return BaseModelOutput(last_hidden_state=feats)

    inner.vision_model.forward = colour_tower
    with torch.no_grad():
        proj = inner.connector.modality_projection.proj.weight
        proj.zero_()
        for k in range(scale * scale):  # pixel shuffle concatenates the block's patches
            proj[0, k * dim] = proj[1, k * dim + 1] = 1 / scale**2
    for w, h in SIZES:
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), np.zeros_like(x, dtype=float)], -1)
        img = Image.fromarray(arr.round().astype(np.uint8))
        vt = extract_visual_tokens(vlm, img, layers=[0])
        # pixel x spans [x, x + 1) in box coordinates: its centre x + 0.5 has red x * 255 / (w - 1)
        cx = vt.vectors[0][:, 0] / 255 * (w - 1) + 0.5
        cy = vt.vectors[0][:, 1] / 255 * (h - 1) + 0.5
        want = np.array([p.center for p in vt.patches])
        np.testing.assert_allclose(cx, want[:, 0], atol=TOL)
        np.testing.assert_allclose(cy, want[:, 1], atol=TOL)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_boxes_tile_the_image(vlms, kind, size):
    vlm = vlms[kind]
    vt = extract_visual_tokens(vlm, sample_image(size), layers=[0])
    _assert_disjoint_inside(vt.patches, size)
    # the crops cover the whole image; their patches all of it, or all but a strip per crop
    covered = _covered_fraction(vlm) ** 2
    # (boxes are rounded to 1/1000 px)
    assert sum(_area(p.box) for p in vt.patches) == pytest.approx(size[0] * size[1] * covered, rel=1e-4)
    assert vt.patches[0].box[:2] == (0.0, 0.0)
    if covered == 1:
        assert vt.patches[-1].box[2:] == size


def test_layouts_and_resolution(vlms):
    vlm = vlms["idefics3"]
    img = sample_image((96, 48))
    # 96x48 -> longest edge 64 -> 64x32 -> 1 x 2 crops of 32 px, 2x2 tokens each
    vt = extract_visual_tokens(vlm, img, layers=[0])
    assert vt.grid == (2, 4) and vt.canvas_size == (64, 32)
    assert vt.patches[0].box == (0.0, 0.0, 24.0, 24.0)
    assert vt.patches[5].box == (24.0, 24.0, 48.0, 48.0)  # row 1, col 1
    # --resolution squashes to w x h and sets the longest edge: 64 -> 2 x 2 crops; 32 -> one crop
    vt = extract_visual_tokens(vlm, img, layers=[0], resolution=64)
    assert vt.grid == (4, 4) and vt.canvas_size == (64, 64)
    vt = extract_visual_tokens(vlm, img, layers=[0], resolution=32)
    assert vt.grid == (2, 2) and vt.canvas_size == (32, 32)
    inputs, prep = vlm.encode(img, "a dog", (32, 32))
    assert prep.grid_offsets is None and prep.num_tokens == 4
    assert "<row_" not in vlm.tokenizer.decode(inputs["input_ids"][0])


def test_without_image_splitting_the_grid_is_the_global_view(model_dirs):
    vlm = load_vlm(str(model_dirs["idefics3"]))
    vlm.image_processor.do_image_splitting = False
    img = sample_image((96, 48))
    vt = extract_visual_tokens(vlm, img, layers=[0, 2])
    assert vt.grid == (2, 2) and vt.canvas_size == (32, 32)
    _assert_disjoint_inside(vt.patches, (96, 48))
    assert sum(_area(p.box) for p in vt.patches) == pytest.approx(96 * 48)
    inputs, _ = vlm.encode(img, vt.prompt, None)
    with torch.no_grad():
        feats = vlm.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    np.testing.assert_allclose(vt.vectors[0], feats.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_logitlens_matches_the_models_own_logits(vlms, kind):
    vlm = vlms[kind]
    assert_logitlens_matches_own_logits(vlm, (96, 48))


def test_text_side_is_the_text_model(vlms, model_dirs):
    from latentlens.models import load_language_model

    vlm = vlms["smolvlm"]
    assert vlm.language_model is vlm.model.model.text_model
    lm = load_language_model(str(model_dirs["smolvlm"]))
    ids = vlm.tokenizer("a red car", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        b = vlm.language_model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# the CLI, end to end


@pytest.mark.parametrize("kind", KINDS)
def test_cli_ingest_query_report(db_url, model_dirs, tmp_path, kind):
    d = cli_ingest_query_report(model_dirs[kind], tmp_path)
    assert d["grid"] == [2, 4]
