"""Molmo2: a tiny random model built from its config, end to end.

Saved with save_pretrained (tokenizer and preprocessor config written in
code), so load_vlm and `llens ingest` go through the real from_pretrained
path; without torchvision the adapter's torch-only image processor runs
(compared with the real one where torchvision is installed). Checked:
visual layer 0 is what enters the LLM (the model's own pooled image
features plus the <im_patch> embedding, which Molmo2 adds) at the
high-res grid's positions, layer l its hidden_states[l]; the image tokens
get mm_token_type_ids = 1 as the processor gives them; boxes are exactly
the canvas patches the processor pools into each token, tile the image for
several aspect ratios and sit where those pixels came from; ingest -> query
-> report through the CLI; LogitLens at the last layer is the model's own
next-token distribution.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from vlm_checks import assert_logitlens_matches_own_logits, cli_ingest_query_report
from vlm_checks import assert_tiles as _assert_tiles
from vlm_tiny import sample_image
from vlm_tiny_molmo2 import CROP, MARGINS, MOLMO2_TEMPLATE, PATCH, build_molmo2, molmo2_processor

from latentlens.vlm import extract_visual_tokens, load_vlm
from latentlens.vlm.geometry import stretch

PROMPT = "Describe this image in detail."
WINDOW = (CROP // PATCH - sum(MARGINS)) * PATCH  # 20 px: what each further crop adds
MARGIN = sum(MARGINS) * PATCH
# size -> (high-res token grid, canvas (w, h)); the low-res view is always 4 x 4 tokens
SIZES = {
    (96, 48): ((4, 9), (68, 28)),  # 1 x 3 crops: canvas 7 x 17 patches, pooled with one padded row/col
    (40, 100): ((9, 4), (28, 68)),
    (64, 64): ((6, 6), (48, 48)),  # 2 x 2 crops: 12 x 12 patches, no padding
    (20, 20): ((4, 4), (28, 28)),  # one crop
}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_molmo2(tmp_path_factory.mktemp("molmo2") / "tiny-molmo2")


@pytest.fixture(scope="module")
def vlm(model_dir):
    return load_vlm(str(model_dir))


def _pooled_patches(inputs, prep):
    """Per grid token, the (crop, patch) pairs the processor pools into it."""
    pooling = inputs["image_token_pooling"]
    side = CROP // PATCH
    out = []
    for k in range(len(prep.patches)):
        idx = [int(i) for i in pooling[prep.first_grid_token + k] if i >= 0]
        out.append([divmod(i, side * side) for i in idx])
    return out


# ---------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("size", list(SIZES))
def test_visual_tokens_match_the_model(vlm, size):
    img = sample_image(size)
    vt = extract_visual_tokens(vlm, img, layers=[0, 1, 3])
    grid, canvas = SIZES[size]
    assert vt.grid == grid and vt.canvas_size == canvas
    inputs, prep = vlm.encode(img, PROMPT, None)
    assert inputs["image_grids"].tolist() == [[4, 4, *grid]]
    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
        feats = vlm.model.get_image_features(inputs["pixel_values"], inputs["image_token_pooling"],
                                             inputs["image_grids"]).pooler_output[0]
    mask = inputs["input_ids"][0] == vlm.image_token_id
    # one <im_patch> per pooled token: the low-res view's 4 x 4 first, then the grid
    assert int(mask.sum()) == prep.num_tokens == len(feats) == 16 + grid[0] * grid[1]
    assert prep.first_grid_token == 16
    high = feats[16:]
    # visual layer 0 = what enters the LLM: Molmo2 adds the features to <im_patch>'s embedding
    patch_embedding = vlm.language_model.embed_tokens.weight[vlm.image_token_id].detach()
    np.testing.assert_allclose(vt.vectors[0], (high + patch_embedding).numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(vt.vectors[0], high.numpy(), atol=1e-3)
    for layer in (1, 3):
        np.testing.assert_allclose(vt.vectors[layer], out.hidden_states[layer][0][mask][16:].numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(vt.vectors[1], vt.vectors[3])
    np.testing.assert_array_equal(vt.positions, torch.nonzero(mask).flatten()[16:].numpy())


def test_prompt_layout_and_token_types(vlm):
    """BOS first, then the image string in place of <|image|> (rows of <im_patch> + <im_col>);
    every image token, patches or not, has mm_token_type_ids = 1."""
    inputs, prep = vlm.encode(sample_image((96, 48)), PROMPT, None)
    toks = vlm.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert toks[0] == "<|im_end|>" and toks[1] == "<low_res_im_start>"
    low = ["<im_patch>"] * 4 + ["<im_col>"]
    high = ["<im_patch>"] * 9 + ["<im_col>"]
    image = ["<low_res_im_start>", *low * 4, "<im_end>", "<im_start>", *high * 4, "<im_end>"]
    assert toks[1:1 + len(image)] == image
    assert toks[1 + len(image)] == "<|im_start|>"
    types = inputs["mm_token_type_ids"][0].tolist()
    assert types == [0] + [1] * len(image) + [0] * (len(toks) - 1 - len(image))


def test_layout_options_from_processor_config(tmp_path):
    """processor_config.json's layout options are followed (here: no <im_col> in the low-res view)."""
    d = build_molmo2(tmp_path / "no-low-col", processor_config={"use_single_crop_col_tokens": False})
    vlm = load_vlm(str(d))
    assert vlm.processor_options == {"use_single_crop_col_tokens": False}
    img = sample_image((64, 64))
    inputs, _ = vlm.encode(img, PROMPT, None)
    toks = vlm.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert toks[1:19] == ["<low_res_im_start>", *["<im_patch>"] * 16, "<im_end>"]
    assert toks.count("<im_col>") == 6
    vt = extract_visual_tokens(vlm, img, layers=[2])
    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
    mask = inputs["input_ids"][0] == vlm.image_token_id
    np.testing.assert_allclose(vt.vectors[2], out.hidden_states[2][0][mask][16:].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", list(SIZES))
def test_boxes_are_the_pooled_patches(vlm, size):
    """Each box is the union of the canvas patches the processor pools into its token,
    mapped back through the stretch to the canvas."""
    img = sample_image(size)
    inputs, prep = vlm.encode(img, PROMPT, None)
    cw, ch = prep.canvas_size
    tiles_w = (cw - MARGIN) // WINDOW
    side = CROP // PATCH
    t = stretch(size, (cw, ch))
    for p, pooled in zip(prep.patches, _pooled_patches(inputs, prep)):
        assert pooled and all(crop >= 1 for crop, _ in pooled)  # crop 0 is the low-res view
        rows, cols = [], []
        for crop, i in pooled:
            tr, tc = divmod(crop - 1, tiles_w)
            r, c = divmod(i, side)
            # a kept patch sits at its crop's offset (one window per crop) on the canvas
            assert (MARGINS[0] <= r or tr == 0) and (MARGINS[0] <= c or tc == 0)
            rows.append(tr * WINDOW // PATCH + r)
            cols.append(tc * WINDOW // PATCH + c)
        x0, y0 = t.inverse_point(min(cols) * PATCH, min(rows) * PATCH)
        x1, y1 = t.inverse_point((max(cols) + 1) * PATCH, (max(rows) + 1) * PATCH)
        want = (max(x0, 0), max(y0, 0), min(x1, size[0]), min(y1, size[1]))
        np.testing.assert_allclose(p.box, want, atol=1e-3, err_msg=str(p))


@pytest.mark.parametrize("size", list(SIZES))
def test_boxes_tile_the_image(vlm, size):
    vt = extract_visual_tokens(vlm, sample_image(size), layers=[0])
    assert vt.image_size == size
    _assert_tiles(vt.patches, (0, 0, *size))


@pytest.mark.parametrize("size", list(SIZES))
def test_boxes_follow_the_pixels(vlm, size):
    """The image encodes x in red and y in green; un-normalising the pixels of the patches
    pooled into a token and averaging them gives the original coordinates of the box centre."""
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), np.zeros_like(x, dtype=float)], -1)
    img = Image.fromarray(arr.round().astype(np.uint8))
    inputs, prep = vlm.encode(img, PROMPT, None)
    ip = vlm.image_processor
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    side = CROP // PATCH
    pixels = inputs["pixel_values"].numpy().reshape(-1, side * side, PATCH, PATCH, 3)
    for p, pooled in zip(prep.patches, _pooled_patches(inputs, prep)):
        block = np.stack([pixels[crop, i] for crop, i in pooled])
        rgb = (block * std + mean).mean(axis=(0, 1, 2)) * 255
        cx, cy = rgb[0] / 255 * (w - 1), rgb[1] / 255 * (h - 1)
        # the ramp is sampled at pixel centres: the box centre sits 0.5 px right/down of it
        assert p.center[0] - 0.5 == pytest.approx(cx, abs=1.5), (p, cx)
        assert p.center[1] - 0.5 == pytest.approx(cy, abs=1.5), (p, cy)


def test_resolution_squashes_first(vlm):
    # 40x100 would be 1 x 3 crops down; squashed to 96x48 first it is 3 across
    vt = extract_visual_tokens(vlm, sample_image((40, 100)), layers=[0], resolution="96x48")
    assert vt.grid == (4, 9) and vt.canvas_size == (68, 28)
    _assert_tiles(vt.patches, (0, 0, 40, 100))


@pytest.mark.skipif(not HAS_TORCHVISION, reason="Molmo2's image processor and processor need torchvision")
@pytest.mark.parametrize("size", list(SIZES) + [(333, 211)])
def test_torch_processor_equals_torchvision_and_the_processor(vlm, model_dir, size):
    """The torch-only image processor gives the same tensors as Molmo2ImageProcessor, and our
    prompt the same ids and token types as Molmo2Processor."""
    from latentlens.architectures.molmo2 import TorchMolmo2ImageProcessor

    img = sample_image(size)
    ours = TorchMolmo2ImageProcessor.from_pretrained(str(model_dir))(images=[img], return_tensors="pt")
    real = vlm.image_processor(images=[img], return_tensors="pt")
    assert set(ours) == set(real)
    for k in real:
        assert torch.equal(ours[k], real[k]), k
    mine, _ = vlm.encode(img, PROMPT, None)
    proc = molmo2_processor(vlm)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, chat_template=MOLMO2_TEMPLATE)
    ref = proc(text=text, images=[img], return_tensors="pt")
    for k in ("input_ids", "mm_token_type_ids", "pixel_values", "image_token_pooling", "image_grids"):
        assert torch.equal(mine[k], ref[k]), k


def test_logitlens_matches_the_models_own_logits(vlm):
    lens = assert_logitlens_matches_own_logits(vlm, (96, 48))
    assert lens.vocab_size == vlm.text_config.vocab_size < len(vlm.heads.embedding)


# ---------------------------------------------------------------------------
# the CLI, end to end


def test_cli_ingest_query_report(db_url, model_dir, tmp_path):
    d = cli_ingest_query_report(model_dir, tmp_path)
    assert d["grid"] == [4, 9] and d["canvas_size"] == [68, 28]
