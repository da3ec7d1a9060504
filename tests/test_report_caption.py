"""report.png says what it shows (issue 21 c): a caption with the method and visual layer, and the
same in the PNG's text chunks."""

from __future__ import annotations

import numpy as np
from PIL import Image
from test_report import ALL, make_result
from vlm_tiny import sample_image

from latentlens.report import png_caption, render_png, write_report


def test_png_names_method_and_layer(tmp_path):
    res = make_result(grid=(4, 6), layers=(0, 8), methods=ALL)
    img = sample_image(res.image_size)
    paths = write_report(res, img, tmp_path, png_layer=8, png_method="logitlens")
    png = Image.open(paths["png"])
    assert png.text["Description"] == f"{res.model}: LogitLens top-1 word · visual layer 8"
    assert png.text["Title"] == f"LatentLens: {res.model}"
    assert png_caption(res, 0, "latentlens") == "LatentLens top-1 word · visual layer 0"


def test_the_caption_is_drawn_top_left(tmp_path):
    res = make_result(grid=(4, 6), layers=(0, 8))
    img = sample_image(res.image_size)
    a = np.asarray(render_png(res, img, 0), dtype=np.int16)
    b = np.asarray(render_png(res, img, 8), dtype=np.int16)
    base = np.asarray(img.resize((a.shape[1], a.shape[0]), Image.Resampling.LANCZOS), dtype=np.int16)
    # the caption's dark box with light text, where the image alone has neither
    corner = np.abs(a[3:16, 3:60] - base[3:16, 3:60]).sum(-1)
    assert corner.mean() > 60
    # layer 0 and layer 8 captions differ in the corner ("0" vs "8")
    assert np.abs(a[:20] - b[:20]).sum() > 0
