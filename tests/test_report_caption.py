"""report.png says what it shows (issue 21 c): the caption band (tests/test_report.py) says it in
the PNG's text chunks too."""

from __future__ import annotations

from PIL import Image
from test_report import ALL, make_result
from vlm_tiny import sample_image

from latentlens.report import png_caption, write_report


def test_png_names_method_and_layer(tmp_path):
    res = make_result(grid=(4, 6), layers=(0, 8), methods=ALL)
    img = sample_image(res.image_size)
    paths = write_report(res, img, tmp_path, png_layer=8, png_method="logitlens")
    png = Image.open(paths["png"])
    assert png.text["Description"] == png_caption(res, res.layer(8), "logitlens")
    assert "visual layer 8" in png.text["Description"] and "LogitLens" in png.text["Description"]
    assert png.text["Title"] == f"LatentLens: {res.model}"
