"""Qwen3-VL and LLaVA-OneVision: tiny random models built from their configs, end to end.

Each model is saved with save_pretrained (tokenizer and image processor built
in code), so load_vlm and `llens ingest` go through the real from_pretrained
path. Checked per architecture: visual layer 0 is the model's own image
features at the grid's token positions and layer l its hidden_states[l];
boxes tile the image for several aspect ratios and sit where the processor
took each token's pixels from; ingest -> query -> report through the CLI;
LogitLens at the last layer is the model's own next-token distribution.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from latentlens.cli.main import cli
from vlm_checks import assert_logitlens_matches_own_logits, cli_ingest_query_report
from vlm_checks import assert_tiles as _assert_tiles
from vlm_tiny import CORPUS, QWEN_SPECIALS, QWEN_TEMPLATE, make_tokenizer, sample_image

from latentlens.vlm import extract_visual_tokens, load_vlm

SIZES = [(64, 64), (96, 48), (40, 100), (96, 64)]
TILE, PATCH = 36, 8  # the tiny OneVision tower
PROMPT = "Describe this image in detail."

ONEVISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def build_qwen3_vl(out: Path, *, seed: int = 0) -> Path:
    """16-px patches merged 2x2 (32 px per token), two DeepStack features (after LLM blocks 0 and 1)."""
    import transformers as tf
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = make_tokenizer(QWEN_SPECIALS, QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    cfg = tf.Qwen3VLConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True},
        ),
        vision_config=dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = tf.Qwen3VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, min_pixels=32 * 32,
                             max_pixels=128 * 128).save_pretrained(out)
    return out


def build_llava_onevision(out: Path, *, seed: int = 0) -> Path:
    """SigLIP 36-px tiles of 8-px patches: 4x4 features per tile see 32 of its 36 px (as
    SigLIP 384/14 sees 378 of 384), canvases up to 72x72, capped at anyres_max_2."""
    import transformers as tf
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    pinpoints = [[TILE, TILE], [TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]]
    specials = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok = make_tokenizer(specials, ONEVISION_TEMPLATE)
    cfg = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=TILE, patch_size=PATCH),
        text_config=tf.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=3,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
    )
    torch.manual_seed(seed)
    model = tf.LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                    image_grid_pinpoints=pinpoints).save_pretrained(out)
    return out


BUILDERS = {"qwen3_vl": build_qwen3_vl, "llava_onevision": build_llava_onevision}
KINDS = list(BUILDERS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("vlms_more_a")
    return {kind: build(base / f"tiny-{kind.replace('_', '-')}") for kind, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def vlms(model_dirs) -> dict:
    return {kind: load_vlm(str(d)) for kind, d in model_dirs.items()}


def _image_features(vlm, inputs, kind):
    with torch.no_grad():
        if kind == "qwen3_vl":
            out = vlm.model.get_image_features(pixel_values=inputs["pixel_values"],
                                               image_grid_thw=inputs["image_grid_thw"])
        else:
            out = vlm.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                vision_feature_layer=vlm.config.vision_feature_layer,
                vision_feature_select_strategy=vlm.config.vision_feature_select_strategy,
                vision_aspect_ratio=vlm.config.vision_aspect_ratio)
    return out


# ---------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_visual_tokens_match_the_model(vlms, kind, size):
    vlm = vlms[kind]
    img = sample_image(size)
    vt = extract_visual_tokens(vlm, img, layers=[0, 1, 3])
    rows, cols = vt.grid
    assert len(vt.patches) == rows * cols
    inputs, prep = vlm.encode(img, PROMPT, None)
    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
    feats = _image_features(vlm, inputs, kind).pooler_output[0]
    mask = inputs["input_ids"][0] == vlm.image_token_id
    # the prompt holds exactly one token per feature the model makes
    assert int(mask.sum()) == prep.num_tokens == len(feats)
    grid = prep.grid_offsets if prep.grid_offsets is not None else list(range(rows * cols))
    assert len(grid) == rows * cols
    # visual layer 0 = the projector / merger output, as it enters the LLM
    np.testing.assert_allclose(vt.vectors[0], feats[grid].numpy(), rtol=0, atol=1e-6)
    for layer in (1, 3):
        want = out.hidden_states[layer][0][mask][grid].numpy()
        np.testing.assert_allclose(vt.vectors[layer], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(vt.vectors[1], vt.vectors[3])
    np.testing.assert_array_equal(vt.positions, torch.nonzero(mask).flatten()[grid].numpy())


def test_qwen3_vl_deepstack_enters_after_the_recorded_layer(vlms):
    """Block l reads hidden_states[l] + DeepStack feature l - 1 at the image tokens (as the docstring says)."""
    vlm = vlms["qwen3_vl"]
    img = sample_image((96, 64))
    inputs, _ = vlm.encode(img, PROMPT, None)
    seen: dict[int, torch.Tensor] = {}
    layers = vlm.language_model.layers
    hooks = [layers[i].register_forward_pre_hook(
        lambda _m, a, kw, i=i: seen.__setitem__(i, (a[0] if a else kw["hidden_states"]).detach().clone()),
        with_kwargs=True) for i in range(len(layers))]
    try:
        with torch.no_grad():
            out = vlm.model(**inputs, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    deepstack = _image_features(vlm, inputs, "qwen3_vl").deepstack_features
    assert len(deepstack) == 2
    mask = inputs["input_ids"][0] == vlm.image_token_id
    for layer in (1, 2):
        block_input = seen[layer][0][mask]
        recorded = out.hidden_states[layer][0][mask]
        assert not torch.allclose(block_input, recorded)
        torch.testing.assert_close(block_input, recorded + deepstack[layer - 1][0], rtol=0, atol=1e-6)
    # from the block after the last addition on, the stream is what was recorded
    torch.testing.assert_close(seen[2][0][~mask], out.hidden_states[2][0][~mask], rtol=0, atol=0)


@pytest.mark.parametrize("size", SIZES)
def test_qwen3_vl_boxes_tile_the_image(vlms, size):
    vt = extract_visual_tokens(vlms["qwen3_vl"], sample_image(size), layers=[0])
    assert vt.image_size == size
    _assert_tiles(vt.patches, (0, 0, *size))


@pytest.mark.parametrize("size", SIZES)
def test_llava_onevision_boxes_tile_the_image_but_the_unseen_strips(vlms, size):
    """Boxes don't overlap and cover the image except strips no token sees: the last
    TILE - 4 * PATCH canvas px of each tile (worked out here from transformers' own resize rule)."""
    from transformers.image_processing_utils import select_best_resolution

    vlm = vlms["llava_onevision"]
    vt = extract_visual_tokens(vlm, sample_image(size), layers=[0])
    rows, cols = vt.grid
    assert len(vt.patches) == rows * cols
    w, h = size
    th, tw = select_best_resolution((h, w), vlm.config.image_grid_pinpoints)
    scale = min(tw / w, th / h)
    nw, nh = min(math.ceil(w * scale), tw), min(math.ceil(h * scale), th)
    seen = 4 * PATCH
    for axis, (length, canvas, inner) in enumerate([(w, tw, nw), (h, th, nh)]):
        off = (canvas - inner) // 2
        s = inner / length
        strips = [((k * TILE + seen - off) / s, ((k + 1) * TILE - off) / s) for k in range(canvas // TILE)]
        n = cols if axis == 0 else rows
        spans = [vt.patches[i if axis == 0 else i * cols].box[axis::2] for i in range(n)]
        for p in vt.patches:  # a grid: each box spans its row's and column's interval
            assert p.box[axis::2] == spans[p.col if axis == 0 else p.row]
        edges = [0.0] + [v for span in spans for v in span] + [float(length)]
        for lo, hi in zip(edges[0::2], edges[1::2]):  # the gaps between boxes, and at the ends
            assert lo <= hi + 1e-9, (axis, spans)
            if hi - lo > 2e-3:
                assert any(a - 2e-3 <= lo and hi <= b + 2e-3 for a, b in strips), (axis, lo, hi, strips)
        covered = sum(b - a for a, b in spans)
        assert covered > 0.8 * length


def test_grids(vlms):
    q3 = vlms["qwen3_vl"]
    # smart_resize with factor 32: 96x48 -> 96x64 -> 2x3 tokens; 40x100 -> 32x96 -> 3x1
    assert extract_visual_tokens(q3, sample_image((96, 48)), layers=[0]).grid == (2, 3)
    vt = extract_visual_tokens(q3, sample_image((40, 100)), layers=[0])
    assert vt.grid == (3, 1) and vt.canvas_size == (32, 96)
    vt = extract_visual_tokens(q3, sample_image((96, 48)), layers=[0], resolution=128)
    assert vt.grid == (4, 4) and vt.canvas_size == (128, 128)
    _assert_tiles(vt.patches, (0, 0, 96, 48))
    ov = vlms["llava_onevision"]
    # 96x48 -> the 72x36 canvas (2 tiles), 4x8 features, under the cap of 2 tiles (32 features x 1.21)
    vt = extract_visual_tokens(ov, sample_image((96, 48)), layers=[0])
    assert vt.grid == (4, 8) and vt.canvas_size == (72, 36)
    # features 3 and 4 sit on either side of the seam: canvas px 24..32 and 36..44 -> x 32..42.667, 48..58.667
    assert vt.patches[3].box[0::2] == (32.0, 42.667) and vt.patches[4].box[0::2] == (48.0, 58.667)
    # 64x64 -> 8x8 features, over the cap: ratio sqrt(64 / 32) -> resized to 5x5
    assert extract_visual_tokens(ov, sample_image((64, 64)), layers=[0]).grid == (5, 5)
    # 96x64 -> 72x48 in a 72x72 canvas; unpadded 6x8, ratio sqrt(48 / 32) -> 4x6
    _, prep = ov.encode(sample_image((96, 64)), PROMPT, None)
    assert prep.grid == (4, 6) and prep.num_tokens == 16 + 4 * (6 + 1)
    # --resolution squashes the image first: 64x64 of a 96x48 image -> the 5x5 capped grid;
    # the last token ends where the last tile's seen part does (canvas 68 of 72)
    vt = extract_visual_tokens(ov, sample_image((96, 48)), layers=[0], resolution=64)
    assert vt.grid == (5, 5) and vt.patches[-1].box[2:] == (round(96 * 68 / 72, 3), round(48 * 68 / 72, 3))


@pytest.mark.parametrize("size", [(640, 480), (4000, 3000), (300, 1200), (1920, 1080), (384, 384), (777, 333)])
def test_llava_onevision_layout_at_the_released_size(size):
    """The released checkpoints' layout (SigLIP 384/14, 6x6 pinpoints, anyres_max_9), no weights:
    the grid and token count match the model's pack_image_features (newline tokens where the
    grid offsets leave them) and the processor's own count."""
    import types

    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        LlavaOnevisionModel,
        image_size_to_num_patches,
    )

    from latentlens.architectures.llava_onevision import anyres_grid

    cfg = LlavaOnevisionConfig()
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.vision_aspect_ratio) == (
        384, 14, "anyres_max_9")
    w, h = size
    layout = anyres_grid(size, cfg.image_grid_pinpoints, tile=384, patch=14, max_tiles=9)
    rows, cols = layout.grid
    n = image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, 384)
    assert layout.tiles == n - 1
    packed, lens = LlavaOnevisionModel.pack_image_features(
        types.SimpleNamespace(config=cfg), [torch.zeros(n, 729, 1)], torch.tensor([[h, w]]),
        image_newline=torch.ones(1), vision_aspect_ratio=cfg.vision_aspect_ratio)
    assert int(lens[0]) == 729 + rows * (cols + 1)
    newlines = torch.nonzero(packed[0][:, 0] == 1).flatten().tolist()
    assert newlines == [729 + i * (cols + 1) + cols for i in range(rows)]
    patches = layout.patches(layout.transform, size)
    for p in patches:
        x0, y0, x1, y1 = p.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    # rows and columns in order, never overlapping; unseen: 6 px of each 384-px tile, and
    # what unpad_image's rounding drops at the edges (under a feature row or column each)
    xs = [p.box[0::2] for p in patches[:cols]]
    ys = [p.box[1::2] for p in patches[::cols]]
    for spans, length in ((xs, w), (ys, h)):
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert sum(b - a for a, b in spans) >= 0.95 * length


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_boxes_follow_the_pixels(vlms, kind, size):
    """Each box's centre is where the processor took that token's pixels from.

    The image encodes x in red and y in green; un-normalising the canvas
    pixels behind one token and averaging them tells the original coordinates
    of their centre. The token -> canvas pixels map is worked out here from the
    tower's layout, not from the adapter.
    """
    from PIL import Image

    vlm = vlms[kind]
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), np.zeros_like(x, dtype=float)], -1)
    img = Image.fromarray(arr.round().astype(np.uint8))
    inputs, prep = vlm.encode(img, PROMPT, None)
    ip = vlm.image_processor
    mean = np.asarray(ip.image_mean, dtype=np.float64)
    std = np.asarray(ip.image_std, dtype=np.float64)
    cells = _token_pixels(vlm, kind, inputs, prep, img)
    checked = 0
    for p, cell in zip(prep.patches, cells):
        if cell is None or not p.visible:
            continue
        r, g, _ = cell * std + mean
        assert p.center[0] == pytest.approx(r * (w - 1), abs=2.0), p
        assert p.center[1] == pytest.approx(g * (h - 1), abs=2.0), p
        checked += 1
    assert checked >= max(1, len(prep.patches) // 4)


def _token_pixels(vlm, kind, inputs, prep, img) -> list:
    """Per grid token, the mean normalised colour of the canvas pixels it covers (None: touches padding)."""
    pv = inputs["pixel_values"].double()
    if kind == "qwen3_vl":
        # rows of pixel_values: ViT patches ordered by merged token, then 2x2 within it;
        # each row is channels x temporal x patch x patch. Qwen pads nothing.
        merge = vlm.image_processor.merge_size
        return list(pv.view(len(prep.patches), merge * merge, 3, -1).mean(dim=(1, 3)).numpy())
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    # the tiles after the base view, laid out row-major over the canvas
    tw, th = prep.canvas_size
    ty, tx = th // TILE, tw // TILE
    canvas = pv[0, 1:1 + ty * tx].view(ty, tx, 3, TILE, TILE).permute(2, 0, 3, 1, 4).reshape(3, th, tw)
    w, h = img.size
    assert (th, tw) == tuple(select_best_resolution((h, w), vlm.config.image_grid_pinpoints))
    side = TILE // PATCH
    # feature coordinate of each canvas pixel column/row: feature k sees [TILE * (k // side) + PATCH * (k % side), + PATCH)
    def coord(n):
        out = np.full(n, np.nan)
        for px in range(n):
            t, q = divmod(px, TILE)
            if q < side * PATCH:
                out[px] = t * side + (q + 0.5) / PATCH
        return out

    fx, fy = coord(tw), coord(th)
    fh, fw = ty * side, tx * side
    kept = unpad_image(torch.arange(fh * fw).view(1, fh, fw), [h, w])
    kr, kc = kept.shape[1:]
    r0, c0 = divmod(int(kept[0, 0, 0]), fw)
    rows, cols = prep.grid
    # padding in the canvas: the processor's zeros un-normalise to black; leave those cells out
    padded = (canvas.permute(1, 2, 0).numpy() * np.asarray(vlm.image_processor.image_std)
              + np.asarray(vlm.image_processor.image_mean)).sum(-1) < 1e-6
    out = []
    for p in prep.patches:
        u0, u1 = c0 + p.col * kc / cols, c0 + (p.col + 1) * kc / cols
        v0, v1 = r0 + p.row * kr / rows, r0 + (p.row + 1) * kr / rows
        xs = np.nonzero((fx >= u0) & (fx < u1))[0]
        ys = np.nonzero((fy >= v0) & (fy < v1))[0]
        # the hull of the pixels the token's features see (a capped token's cell may span a seam strip)
        region = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        if padded[region].any():
            out.append(None)
        else:
            out.append(canvas[(slice(None), *region)].mean(dim=(1, 2)).numpy())
    return out


# ---------------------------------------------------------------------------
# the text side, queries and the report through the CLI


@pytest.fixture(scope="module")
def ingested(db_url, model_dirs, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("cli_more_a")
    corpus = base / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    for kind, d in model_dirs.items():
        r = CliRunner().invoke(cli, ["ingest", str(d), str(corpus), "--layers", "0,1,2,3",
                                     "--skip-positions", "0", "--no-index", "--no-progress", "--json"])
        assert r.exit_code == 0, (kind, r.output)
    return {"base": base}


@pytest.mark.parametrize("kind", KINDS)
def test_cli_ingest_query_report(ingested, model_dirs, vlms, kind):
    size = (96, 64)
    grid = list(extract_visual_tokens(vlms[kind], sample_image(size), layers=[0]).grid)
    d = cli_ingest_query_report(model_dirs[kind], ingested["base"], size=size, ingest=False)
    assert d["grid"] == grid


@pytest.mark.parametrize("kind", KINDS)
def test_logitlens_matches_the_vlms_own_logits_at_image_tokens(vlms, kind):
    vlm = vlms[kind]
    assert_logitlens_matches_own_logits(vlm, (96, 64))
