"""Visual tokens of tiny random LLaVA / Qwen2-VL / Qwen2.5-VL models, end to end.

The models are built from configs and saved with save_pretrained, so
load_vlm goes through the real from_pretrained path; the contextual index is
built through each VLM's own language model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from vlm_tiny import (
    CORPUS,
    build_gemma3,
    build_llava,
    build_llava_next,
    build_qwen,
    ingest_text,
    sample_image,
)

from latentlens.errors import InputError, ModelMismatch, UnknownLayer, UnsupportedModel
from latentlens.vlm import extract_visual_tokens, load_vlm, query_image, select_patches
from latentlens.vlm.geometry import clip_transform, grid_patches, parse_resolution

IMAGE_SIZE = (96, 64)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("vlms")
    return {
        "llava": build_llava(base / "tiny-llava"),
        "qwen2_vl": build_qwen(base / "tiny-qwen2-vl"),
        "qwen2_5_vl": build_qwen(base / "tiny-qwen2.5-vl", v25=True),
        "gemma3": build_gemma3(base / "tiny-gemma3"),
        "llava_next": build_llava_next(base / "tiny-llava-next"),
    }


@pytest.fixture(scope="module")
def vlms(model_dirs) -> dict:
    return {kind: load_vlm(str(d)) for kind, d in model_dirs.items()}


@pytest.fixture(scope="module")
def image():
    return sample_image(IMAGE_SIZE)


@pytest.fixture(scope="module")
def lens(db_url, vlms):
    from latentlens.query import Lens

    with Lens.connect(db_url) as lens:
        for vlm in vlms.values():
            ingest_text(lens.store, vlm)
        yield lens


def _area(box) -> float:
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def _assert_tiles(patches, region):
    """Boxes lie inside ``region``, don't overlap and cover it exactly."""
    rx0, ry0, rx1, ry1 = region
    for p in patches:
        x0, y0, x1, y1 = p.box
        assert rx0 <= x0 < x1 <= rx1 and ry0 <= y0 < y1 <= ry1, p
    assert sum(_area(p.box) for p in patches) == pytest.approx(_area(region))
    for a in patches:
        for b in patches:
            if a.idx < b.idx:
                ox = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
                oy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                assert ox <= 1e-9 or oy <= 1e-9, (a, b)


def _reference_forward(vlm, image, kind):
    """An independent forward pass: the processor (LLaVA) or image processor + template (Qwen)."""
    if kind == "llava":
        proc = vlm.processor
        assert proc is not None and type(proc).__name__ == "LlavaProcessor"
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        inputs = dict(proc(text=text, images=[image], return_tensors="pt", add_special_tokens=True))
    else:
        inputs, _ = vlm.encode(image, "Describe this image in detail.", None)
    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
        kw = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
        assert kind != "gemma3" or "token_type_ids" in inputs  # image tokens attend bidirectionally
        if kind == "llava":
            kw.update(vision_feature_layer=vlm.config.vision_feature_layer,
                      vision_feature_select_strategy=vlm.config.vision_feature_select_strategy)
        feats = vlm.model.get_image_features(**kw).pooler_output[0]
    mask = inputs["input_ids"][0] == vlm.image_token_id
    return inputs, out.hidden_states, feats, mask


# ---------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "qwen2_5_vl", "gemma3"])
def test_visual_tokens_match_the_model(vlms, image, kind):
    vlm = vlms[kind]
    vt = extract_visual_tokens(vlm, image, layers=[0, 1, 3])
    rows, cols = vt.grid
    assert len(vt.patches) == rows * cols
    for layer in (0, 1, 3):
        assert vt.vectors[layer].shape == (rows * cols, vlm.hidden_size)
        assert vt.vectors[layer].dtype == np.float32
    inputs, hidden, feats, mask = _reference_forward(vlm, image, kind)
    # the prompt holds exactly one token per grid cell
    assert int(mask.sum()) == rows * cols
    # visual layer 0 = the projector output, as it enters the LLM
    np.testing.assert_allclose(vt.vectors[0], feats.numpy(), rtol=0, atol=1e-6)
    for layer in (1, 3):
        np.testing.assert_allclose(vt.vectors[layer], hidden[layer][0][mask].numpy(), rtol=1e-5, atol=1e-5)
    # the layers differ (a bug returning one tensor for all would pass the above only by accident)
    assert not np.allclose(vt.vectors[1], vt.vectors[3])


def test_llava_encoding_equals_the_processor(vlms, image):
    vlm = vlms["llava"]
    mine, _ = vlm.encode(image, "Describe this image in detail.", None)
    ref, *_ = _reference_forward(vlm, image, "llava")
    assert torch.equal(mine["input_ids"], ref["input_ids"])
    assert torch.equal(mine["pixel_values"], ref["pixel_values"])


def test_llava_geometry_center_crop(vlms, image):
    # 96x64 -> shortest edge 32 -> 48x32 -> centre crop 32x32 (left 8) -> x 16..80 of the original
    vt = extract_visual_tokens(vlms["llava"], image, layers=[0])
    assert vt.grid == (4, 4) and vt.canvas_size == (32, 32)
    assert vt.patches[0].box == (16.0, 0.0, 32.0, 16.0)
    assert (vt.patches[5].row, vt.patches[5].col) == (1, 1)
    _assert_tiles(vt.patches, (16, 0, 80, 64))


def test_llava_resolution_keeps_the_whole_image(vlms, image):
    vt = extract_visual_tokens(vlms["llava"], image, layers=[0], resolution=32)
    assert vt.grid == (4, 4)
    _assert_tiles(vt.patches, (0, 0, *IMAGE_SIZE))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_geometry_dynamic_resolution(vlms, image, kind):
    # smart_resize(64, 96) -> 56 x 84 -> 4 x 6 patches of 14 px -> 2 x 3 merged tokens
    vt = extract_visual_tokens(vlms[kind], image, layers=[0])
    assert vt.grid == (2, 3) and vt.canvas_size == (84, 56)
    _assert_tiles(vt.patches, (0, 0, *IMAGE_SIZE))
    assert vt.patches[4].box == (32.0, 32.0, 64.0, 64.0)


def test_qwen_fixed_resolution_448_gives_16x16(vlms, image):
    vt = extract_visual_tokens(vlms["qwen2_vl"], image, layers=[0, 2], resolution=448)
    assert vt.grid == (16, 16) and vt.canvas_size == (448, 448)
    assert vt.vectors[2].shape == (256, vlms["qwen2_vl"].hidden_size)
    _assert_tiles(vt.patches, (0, 0, *IMAGE_SIZE))
    vt = extract_visual_tokens(vlms["qwen2_vl"], image, layers=[0], resolution="60x30")
    assert vt.grid == (1, 2)  # sides rounded to multiples of 28: 56 x 28


def test_gemma3_geometry_and_prompt(vlms, image):
    vlm = vlms["gemma3"]
    # 32-px canvas (a stretch of the whole image), 4x4 patches pooled to 2x2 tokens
    vt = extract_visual_tokens(vlm, image, layers=[0])
    assert vt.grid == (2, 2) and vt.canvas_size == (32, 32)
    _assert_tiles(vt.patches, (0, 0, *IMAGE_SIZE))
    text = vlm.expand_placeholder(vlm.chat_text("a dog"), vlm.prepare_image(image, None))
    assert "<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>" in text


@pytest.mark.parametrize("size", [(96, 64), (64, 96), (50, 50), (200, 40)])
def test_llava_next_anyres_grid(vlms, size):
    """The hi-res grid's tokens (base view and row-end newlines left out) match the model."""
    vlm = vlms["llava_next"]
    img = sample_image(size)
    vt = extract_visual_tokens(vlm, img, layers=[0, 2])
    inputs, prep = vlm.encode(img, "Describe this image in detail.", None)
    rows, cols = vt.grid
    # base view 4x4, then each grid row + one newline token
    assert prep.num_tokens == 16 + rows * (cols + 1)
    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
        feats = vlm.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            vision_feature_layer=-1, vision_feature_select_strategy="default").pooler_output[0]
    mask = inputs["input_ids"][0] == vlm.image_token_id
    assert int(mask.sum()) == prep.num_tokens == len(feats)
    np.testing.assert_allclose(vt.vectors[0], feats[prep.grid_offsets].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(vt.vectors[2], out.hidden_states[2][0][mask][prep.grid_offsets].numpy(),
                               rtol=1e-5, atol=1e-5)
    _assert_tiles(vt.patches, (0, 0, *size))


def test_prompt_changes_later_layers_not_layer_0(vlms, image):
    vlm = vlms["qwen2_vl"]
    a = extract_visual_tokens(vlm, image, layers=[0, 3])
    b = extract_visual_tokens(vlm, image, layers=[0, 3], prompt="a dog on the grass")
    np.testing.assert_array_equal(a.vectors[0], b.vectors[0])
    assert b.prompt == "a dog on the grass"


def test_clip_geometry_follows_the_pixels():
    """Boxes found by the transform chain match where each patch's pixels came from.

    The image encodes x in red and y in green; after the processor (resize +
    centre crop) the mean colour of each canvas patch, un-normalised, tells
    the original coordinates of its centre.
    """
    from PIL import Image
    from transformers import CLIPImageProcessor

    w, h = 200, 120
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), np.zeros_like(x, dtype=float)], -1)
    img = Image.fromarray(arr.round().astype(np.uint8))
    proc = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    pv = proc(images=[img], return_tensors="np")["pixel_values"][0]
    mean, std = np.array(proc.image_mean)[:, None, None], np.array(proc.image_std)[:, None, None]
    rgb = (pv * std + mean) * 255
    t, canvas = clip_transform(img.size, proc)
    assert canvas == (64, 64)
    patches = grid_patches(4, 4, (16, 16), t, img.size)
    for p in patches:
        cell = rgb[:, p.row * 16:(p.row + 1) * 16, p.col * 16:(p.col + 1) * 16].mean(axis=(1, 2))
        cx, cy = cell[0] / 255 * (w - 1), cell[1] / 255 * (h - 1)
        assert p.center[0] == pytest.approx(cx, abs=2.0)
        assert p.center[1] == pytest.approx(cy, abs=2.0)


def test_llava_pad_to_square_geometry():
    from PIL import Image
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    proc = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 32},
                                  crop_size={"height": 32, "width": 32})
    img = Image.new("RGB", (100, 50))
    t, canvas = clip_transform(img.size, proc)
    assert canvas == tuple(proc(images=[img], return_tensors="np")["pixel_values"].shape[-2:])
    patches = grid_patches(4, 4, (8, 8), t, img.size)
    # padded 100x100, image rows 25..75: the top and bottom patch rows see only padding
    assert not any(p.visible for p in patches if p.row in (0, 3))
    _assert_tiles([p for p in patches if p.visible], (0, 0, 100, 50))


def test_unsupported_model_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match=r"'llama'.*LLaVA.*LLaVA-NeXT.*Qwen2-VL.*Qwen2\.5-VL.*Gemma 3"):
        load_vlm(str(tmp_path))
    with pytest.raises(InputError, match="cannot load"):
        load_vlm(str(tmp_path / "missing"))


def test_bad_inputs(vlms, image, tmp_path):
    with pytest.raises(UnknownLayer, match="0 = projector output .. 3"):
        extract_visual_tokens(vlms["llava"], image, layers=[4])
    with pytest.raises(InputError, match="bad resolution"):
        parse_resolution("big")
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        extract_visual_tokens(vlms["llava"], tmp_path / "x.jpg", layers=[0])


def test_load_image_applies_exif_rotation(tmp_path):
    from PIL import Image

    from latentlens.vlm import load_image

    img = sample_image((96, 64))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "phone.jpg", exif=exif)
    loaded = load_image(tmp_path / "phone.jpg")
    assert loaded.size == (64, 96) and loaded.mode == "RGB"
    assert load_image(np.zeros((5, 7, 3), np.uint8)).size == (7, 5)
    assert isinstance(load_image(img), Image.Image)


def test_select_patches():
    assert select_patches("all", (2, 3)) == list(range(6))
    assert select_patches("center", (3, 3)) == [4]
    assert select_patches("center", (4, 4)) == [5, 6, 9, 10]
    assert select_patches("0,1; 1,2", (2, 3)) == [1, 5]
    a = select_patches("all", (10, 10), sample=7, seed=3)
    assert len(a) == 7 and a == select_patches("all", (10, 10), sample=7, seed=3)
    assert a != select_patches("all", (10, 10), sample=7, seed=4)
    with pytest.raises(InputError, match="outside the 2x3 grid"):
        select_patches("2,0", (2, 3))
    with pytest.raises(InputError, match="bad patch"):
        select_patches("middle", (2, 3))
    with pytest.raises(InputError, match="outside the 2x3 grid"):
        select_patches([6], (2, 3))


# ---------------------------------------------------------------------------
# queries


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "gemma3", "llava_next"])
def test_query_image_end_to_end(lens, vlms, image, kind):
    vlm = vlms[kind]
    res = query_image(lens, vlm.name, image, visual_layers=[0, 2], k=3, vlm=vlm)
    rows, cols = res.grid
    assert res.visual_layers == [0, 2]
    assert res.searched_layers == [0, 1, 2, 3]
    for vl in res.layers:
        assert [p.patch_idx for p in vl.patches] == list(range(rows * cols))
        for p in vl.patches:
            assert len(p.neighbours) == 3
            sims = [n.similarity for n in p.neighbours]
            assert sims == sorted(sims, reverse=True)
            assert all(n.sentence in CORPUS for n in p.neighbours)
    # the top-1 of a patch is the brute-force best over the stored vectors
    vt = extract_visual_tokens(vlm, image, layers=[2])
    best = _brute_force_top1(lens.store, vlm.name, vt.vectors[2], [0, 1, 2, 3])
    got = [p.neighbours[0].similarity for p in res.layer(2).patches]
    np.testing.assert_allclose(got, best, atol=2e-3)
    # JSON form
    d = json.loads(json.dumps(res.to_dict()))
    assert d["grid"] == [rows, cols] and d["image_size"] == list(IMAGE_SIZE)
    p0 = d["layers"][1]["patches"][0]
    assert {"patch_idx", "row", "col", "box", "neighbours"} <= set(p0)
    assert {"token", "similarity", "layer", "sentence", "char_start", "char_end"} <= set(p0["neighbours"][0])
    rows_ = res.table_rows()
    assert len(rows_) == 2 * rows * cols * 3
    assert "[[" in rows_[0]["sentence"]


def _brute_force_top1(store, model, queries, layers):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best = np.full(len(q), -np.inf)
    for layer in layers:
        for _, vecs in store.iter_layer(model, layer):
            v = vecs.astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            best = np.maximum(best, (q @ v.T).max(axis=1))
    return best


def test_query_image_patch_selection_and_errors(lens, vlms, image, monkeypatch):
    vlm = vlms["qwen2_vl"]
    res = query_image(lens, vlm.name, image, visual_layers=[1], layers=[3], k=2, patches="0,0;1,2", vlm=vlm)
    assert [(p.row, p.col) for p in res.layer(1).patches] == [(0, 0), (1, 2)]
    assert {n.layer for p in res.layer(1).patches for n in p.neighbours} == {3}
    res = query_image(lens, vlm.name, image, visual_layers=[1], sample=2, seed=5, vlm=vlm)
    assert len(res.layer(1).patches) == 2
    assert len(res.patches) == 6  # the whole grid is still known, for the report
    # a VLM whose language model does not match the stored one
    # mistakes fail before any model is loaded
    import latentlens.vlm.extract as extract

    def no_loading(*a, **kw):
        raise AssertionError("the VLM was loaded")

    with monkeypatch.context() as mp:
        mp.setattr(extract, "load_vlm", no_loading)
        with pytest.raises(UnknownLayer, match="visual layer 9"):
            query_image(lens, vlm.name, image, visual_layers=[9])
        with pytest.raises(InputError, match="bad patch"):
            query_image(lens, vlm.name, image, patches="middle")
        with pytest.raises(UnknownLayer, match="no stored layer 7"):
            query_image(lens, vlm.name, image, layers=[7])
    _one_row_model(lens.store, "other-shape", hidden=32)
    with pytest.raises(ModelMismatch, match="hidden size 32"):
        query_image(lens, "other-shape", image, vlm=vlm)


def _one_row_model(store, name, hidden):
    from latentlens.store import EmbeddingBatch

    info = store.register_model(name, hidden_size=hidden, num_layers=3)
    info = store.ensure_layers(info, [1])
    corpus = store.register_corpus("one", content_hash="one")
    sid = store.add_sentences(corpus, ["a dog"])
    one = np.ones(1)
    store.write_embeddings(info, EmbeddingBatch(
        sentence_id=sid, position=np.zeros(1, np.int32), token_id=np.zeros(1, np.int32),
        char_start=-one.astype(np.int32), char_end=-one.astype(np.int32),
        prefix_hash=np.zeros(1, np.int64), vectors={1: np.ones((1, hidden), np.float32)},
    ))


def test_query_image_loads_the_vlm_from_the_stored_source(lens, vlms, image, model_dirs):
    # the stored name is the dir path here; load_vlm runs from it (no vlm= given)
    name = vlms["llava"].name
    res = query_image(lens, name, image, visual_layers=[0], k=1, patches="center")
    assert len(res.layer(0).patches) == 4 and res.grid == (4, 4)
