"""InternVL: a tiny random model built from its config, end to end.

Saved with save_pretrained (tokenizer and image processor built in code), so
load_vlm and `llens ingest` go through the real from_pretrained path. Checked:
visual layer 0 is the model's own image features at the grid's token
positions (thumbnail left out) and layer l its hidden_states[l]; the
projector's pixel shuffle puts each 2 x 2 block of patches into one token,
row-major; boxes tile the image for several aspect ratios and sit where the
processor took each token's pixels from; ingest -> query -> report through
the CLI; LogitLens at the last layer is the model's own next-token
distribution.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from vlm_checks import assert_logitlens_matches_own_logits, cli_ingest_query_report
from vlm_checks import assert_tiles as _assert_tiles
from vlm_tiny import sample_image
from vlm_tiny_internvl import PATCH, TILE, TOKENS_PER_TILE, build_internvl, internvl_processor

from latentlens.vlm import extract_visual_tokens, load_vlm

PROMPT = "Describe this image in detail."
# (size, tiles (cols, rows)): the tiling closest to the aspect ratio, at most 4 tiles;
# 64x64 ties 1x1 with 2x2 and takes 2x2 (the image covers over half of its area)
SIZES = {(64, 64): (2, 2), (96, 48): (2, 1), (40, 100): (1, 3), (20, 20): (1, 1)}
SIDE = 4  # tokens per tile side


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_internvl(tmp_path_factory.mktemp("internvl") / "tiny-internvl")


@pytest.fixture(scope="module")
def vlm(model_dir):
    return load_vlm(str(model_dir))


def _offsets(prep):
    rows, cols = prep.grid
    return prep.grid_offsets if prep.grid_offsets is not None else list(range(rows * cols))


# ---------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("size", list(SIZES))
def test_visual_tokens_match_the_model(vlm, size):
    img = sample_image(size)
    vt = extract_visual_tokens(vlm, img, layers=[0, 1, 3])
    cols, rows = SIZES[size]
    assert vt.grid == (rows * SIDE, cols * SIDE)
    assert vt.canvas_size == (cols * TILE, rows * TILE)
    inputs, prep = vlm.encode(img, PROMPT, None)
    tiles = cols * rows + (1 if cols * rows > 1 else 0)  # + the thumbnail
    assert inputs["pixel_values"].shape == (tiles, 3, TILE, TILE)
    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
        feats = vlm.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    feats = feats.reshape(-1, feats.shape[-1])
    mask = inputs["input_ids"][0] == vlm.image_token_id
    # one prompt token per feature the model makes, thumbnail included
    assert int(mask.sum()) == prep.num_tokens == len(feats) == tiles * TOKENS_PER_TILE
    grid = _offsets(prep)
    assert len(grid) == len(set(grid)) == rows * cols * TOKENS_PER_TILE
    assert max(grid) < cols * rows * TOKENS_PER_TILE  # the thumbnail's tokens are not in the grid
    np.testing.assert_allclose(vt.vectors[0], feats[grid].numpy(), rtol=0, atol=1e-6)
    for layer in (1, 3):
        np.testing.assert_allclose(vt.vectors[layer], out.hidden_states[layer][0][mask][grid].numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(vt.vectors[1], vt.vectors[3])
    np.testing.assert_array_equal(vt.positions, torch.nonzero(mask).flatten()[grid].numpy())
    # the image tokens sit between <img> and </img>
    ids = inputs["input_ids"][0].tolist()
    start = ids.index(vlm.tokenizer.convert_tokens_to_ids("<img>"))
    assert ids[start + 1 + prep.num_tokens] == vlm.tokenizer.convert_tokens_to_ids("</img>")
    assert int(mask[start + 1: start + 1 + prep.num_tokens].sum()) == prep.num_tokens


def test_pixel_shuffle_merges_2x2_blocks_row_major(vlm):
    """The model's own pixel shuffle, run on a grid of (row, col) labels: token i * side + j
    holds patches rows 2i..2i+1, cols 2j..2j+1 (the layout the boxes assume)."""
    n = TILE // PATCH
    r, c = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    labels = torch.stack([r, c], -1).float()[None]  # [1, rows, cols, 2], as get_image_features lays it out
    out = vlm.model.model.pixel_shuffle(labels, scale_factor=vlm.config.downsample_ratio)
    assert out.shape == (1, n // 2, n // 2, 8)
    for i in range(n // 2):
        for j in range(n // 2):
            got = {tuple(int(v) for v in pair) for pair in out[0, i, j].view(4, 2)}
            assert got == {(2 * i + a, 2 * j + b) for a in (0, 1) for b in (0, 1)}


@pytest.mark.parametrize("size", list(SIZES))
def test_boxes_tile_the_image(vlm, size):
    vt = extract_visual_tokens(vlm, sample_image(size), layers=[0])
    assert vt.image_size == size
    _assert_tiles(vt.patches, (0, 0, *size))


@pytest.mark.parametrize("size", list(SIZES))
def test_boxes_follow_the_pixels(vlm, size):
    """Each box's centre is where the processor took that token's pixels from.

    The image encodes x in red and y in green; un-normalising the tile pixels
    behind one token (its 8 x 8 block of its tile) and averaging them gives the
    original coordinates of the block's centre.
    """
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), np.zeros_like(x, dtype=float)], -1)
    img = Image.fromarray(arr.round().astype(np.uint8))
    inputs, prep = vlm.encode(img, PROMPT, None)
    ip = vlm.image_processor
    mean, std = np.array(ip.image_mean)[:, None, None], np.array(ip.image_std)[:, None, None]
    rgb = (inputs["pixel_values"].numpy() * std + mean) * 255  # [tiles, 3, TILE, TILE]
    cell = TILE // SIDE
    cols = prep.grid[1] // SIDE
    for p in prep.patches:
        tile = (p.row // SIDE) * cols + p.col // SIDE
        r0, c0 = (p.row % SIDE) * cell, (p.col % SIDE) * cell
        mean_rgb = rgb[tile, :, r0:r0 + cell, c0:c0 + cell].mean(axis=(1, 2))
        cx, cy = mean_rgb[0] / 255 * (w - 1), mean_rgb[1] / 255 * (h - 1)
        # the colour ramp is sampled at pixel centres: the box centre sits 0.5 px right/down of it
        assert p.center[0] - 0.5 == pytest.approx(cx, abs=1.5), (p, cx)
        assert p.center[1] - 0.5 == pytest.approx(cy, abs=1.5), (p, cy)


def test_resolution_squashes_first(vlm):
    # 40x100 would be 1x3 tiles; squashed to 64x32 first it is 2x1
    vt = extract_visual_tokens(vlm, sample_image((40, 100)), layers=[0], resolution="64x32")
    assert vt.grid == (SIDE, 2 * SIDE) and vt.canvas_size == (2 * TILE, TILE)
    _assert_tiles(vt.patches, (0, 0, 40, 100))


def test_one_tile_without_tiling(tmp_path):
    vlm = load_vlm(str(build_internvl(tmp_path / "one-tile", max_patches=1)))
    vt = extract_visual_tokens(vlm, sample_image((96, 48)), layers=[0])
    assert vt.grid == (SIDE, SIDE) and vt.canvas_size == (TILE, TILE)
    _assert_tiles(vt.patches, (0, 0, 96, 48))
    inputs, prep = vlm.encode(sample_image((96, 48)), PROMPT, None)
    assert prep.grid_offsets is None and prep.num_tokens == TOKENS_PER_TILE
    assert inputs["pixel_values"].shape[0] == 1


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="InternVLProcessor needs torchvision (its video processor)")
@pytest.mark.parametrize("size", [(96, 48), (40, 100), (20, 20)])
def test_encoding_equals_the_processor(vlm, size):
    """Our prompt ids and tiles equal InternVLProcessor's (which tiles by default)."""
    img = sample_image(size)
    mine, _ = vlm.encode(img, PROMPT, None)
    proc = internvl_processor(vlm)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ref = proc(text=text, images=[img], return_tensors="pt")
    assert torch.equal(mine["input_ids"], ref["input_ids"])
    torch.testing.assert_close(mine["pixel_values"], ref["pixel_values"], rtol=0, atol=2e-2)


def test_logitlens_matches_the_models_own_logits(vlm):
    assert_logitlens_matches_own_logits(vlm, (96, 48))


# ---------------------------------------------------------------------------
# the CLI, end to end


def test_cli_ingest_query_report(db_url, model_dir, tmp_path):
    d = cli_ingest_query_report(model_dir, tmp_path)
    assert d["grid"] == [SIDE, 2 * SIDE] and d["canvas_size"] == [2 * TILE, TILE]
