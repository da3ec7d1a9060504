"""PaliGemma (Gemma text) and PaliGemma 2 (Gemma 2 text): tiny random models, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vlm_checks import area as _area
from vlm_checks import assert_logitlens_matches_own_logits, cli_ingest_query_report
from vlm_tiny import sample_image
from vlm_tiny_paligemma import build_paligemma

from latentlens.vlm import extract_visual_tokens, load_vlm

SIZES = [(96, 48), (64, 64), (40, 100)]
KINDS = ["paligemma", "paligemma2"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("paligemma")
    return {"paligemma": build_paligemma(base / "tiny-paligemma"),
            "paligemma2": build_paligemma(base / "tiny-paligemma2", v2=True)}


@pytest.fixture(scope="module")
def vlms(model_dirs) -> dict:
    return {kind: load_vlm(str(d)) for kind, d in model_dirs.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_visual_tokens_match_the_model(vlms, kind):
    vlm = vlms[kind]
    img = sample_image((96, 48))
    vt = extract_visual_tokens(vlm, img, layers=[0, 1, 3])
    assert vt.grid == (4, 4) and vt.canvas_size == (32, 32)
    inputs, prep = vlm.encode(img, vt.prompt, None)
    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
        feats = vlm.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    mask = inputs["input_ids"][0] == vlm.image_token_id
    assert int(mask.sum()) == 16 == len(feats)
    assert torch.equal(torch.nonzero(mask).flatten(), torch.arange(16))  # the image comes first
    np.testing.assert_allclose(vt.vectors[0], feats.numpy(), rtol=0, atol=1e-6)
    for layer in (1, 3):
        np.testing.assert_allclose(vt.vectors[layer], out.hidden_states[layer][0][mask].numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(vt.vectors[1], vt.vectors[3])


def test_encoding_equals_the_processor(vlms):
    vlm = vlms["paligemma"]
    proc = vlm.processor
    assert type(proc).__name__ == "PaliGemmaProcessor"
    img = sample_image((96, 48))
    mine, _ = vlm.encode(img, "caption en", None)
    ref = proc(text="<image>caption en", images=[img], return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_values"):
        assert torch.equal(mine[key], ref[key]), key
    tokens = vlm.tokenizer.convert_ids_to_tokens(mine["input_ids"][0])
    assert tokens[16] == "<s>" and tokens[:16] == ["<image>"] * 16  # image, then BOS, then the prompt


def test_prefix_lm_the_prompt_after_the_image_reaches_the_visual_tokens(vlms):
    vlm = vlms["paligemma"]
    img = sample_image((96, 48))
    a = extract_visual_tokens(vlm, img, layers=[0, 1], prompt="caption en")
    b = extract_visual_tokens(vlm, img, layers=[0, 1], prompt="describe en")
    np.testing.assert_array_equal(a.vectors[0], b.vectors[0])
    assert not np.allclose(a.vectors[1], b.vectors[1])


@pytest.mark.parametrize("kind", KINDS)
def test_text_side_is_causal(vlms, model_dirs, kind):
    """The ingested text runs causally, though PaliGemma's text config asks for bidirectional
    attention (with SDPA and no mask, Gemma's language model alone would attend to later
    tokens); the VLM's own forward keeps its prefix-LM attention."""
    from latentlens.models import load_language_model

    vlm = vlms[kind]
    assert vlm.text_config.use_bidirectional_attention is True
    lm = load_language_model(str(model_dirs[kind]))
    ids = vlm.tokenizer(["a red car sits", "a red car runs"], add_special_tokens=False,
                        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        h = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[3]
        one = lm.model(input_ids=ids[:1], output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(h[0, :3], h[1, :3])  # a later token does not reach earlier ones
    torch.testing.assert_close(one[0, :3], h[1, :3])
    assert not torch.allclose(h[0, 3], h[1, 3])
    torch.testing.assert_close(lm.model.embed_tokens.weight, vlm.language_model.embed_tokens.weight)


@pytest.mark.parametrize("size", SIZES)
def test_boxes_tile_the_image(vlms, size):
    # the whole image is stretched to the 32-px square: 4 x 4 patches of 8 canvas px
    vt = extract_visual_tokens(vlms["paligemma"], sample_image(size), layers=[0])
    w, h = size
    assert vt.grid == (4, 4)
    for p in vt.patches:
        x0, y0, x1, y1 = p.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, p
        assert (x1 - x0, y1 - y0) == pytest.approx((w / 4, h / 4))
        assert (x0, y0) == pytest.approx((p.col * w / 4, p.row * h / 4))
    assert sum(_area(p.box) for p in vt.patches) == pytest.approx(w * h)


def test_boxes_follow_the_pixels_the_model_sees(model_dirs):
    """A stand-in tower outputs each patch's mean colour (x in red, y in green), the
    projector passes it through: visual layer 0 holds where each token's pixels came from."""
    import torch.nn.functional as F
    from PIL import Image
    from transformers.modeling_outputs import BaseModelOutput

    vlm = load_vlm(str(model_dirs["paligemma"]))
    inner = vlm.model.model
    ip = vlm.image_processor
    patch = vlm.config.vision_config.patch_size
    dim = vlm.config.vision_config.hidden_size
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)

    def colour_tower(pixel_values, **kw):
        pooled = F.avg_pool2d((pixel_values * std + mean) * 255, patch)
        feats = torch.zeros(pixel_values.shape[0], pooled.shape[-2] * pooled.shape[-1], dim)
        feats[..., :3] = pooled.flatten(2).transpose(1, 2)
        return BaseModelOutput(last_hidden_state=feats)

    inner.vision_tower.forward = colour_tower
    with torch.no_grad():
        lin = inner.multi_modal_projector.linear
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[0, 0] = lin.weight[1, 1] = 1.0
    for w, h in [*SIZES, (200, 120)]:
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), np.zeros_like(x, dtype=float)], -1)
        img = Image.fromarray(arr.round().astype(np.uint8))
        for resolution in (None, (24, 40)):
            vt = extract_visual_tokens(vlm, img, layers=[0], resolution=resolution)
            want = np.array([p.center for p in vt.patches])
            # pixel x spans [x, x + 1) in box coordinates: its centre has red x * 255 / (w - 1)
            np.testing.assert_allclose(vt.vectors[0][:, 0] / 255 * (w - 1) + 0.5, want[:, 0], atol=1.0)
            np.testing.assert_allclose(vt.vectors[0][:, 1] / 255 * (h - 1) + 0.5, want[:, 1], atol=1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_logitlens_matches_the_models_own_logits(vlms, kind):
    vlm = vlms[kind]
    assert_logitlens_matches_own_logits(vlm, (96, 48))


@pytest.mark.parametrize("kind", KINDS)
def test_cli_ingest_query_report(db_url, model_dirs, tmp_path, kind):
    d = cli_ingest_query_report(model_dirs[kind], tmp_path, prompt="caption en")
    assert d["grid"] == [4, 4] and d["canvas_size"] == [32, 32]
