"""The evaluation figure a paper can use (issue 21 c): the title names the model and the judge (not the
run hash), the caption the number of images and patches, the legend the 95% band; png, pdf or svg."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.errors import InputError
from latentlens.eval.summary import plot_labels, summarize, write_plot

pytest.importorskip("matplotlib")

RUN = SimpleNamespace(name="eval-3f2a9c01d4e5", model="llava-hf/llava-1.5-7b-hf", judge="openai-compatible",
                      judge_settings={"url": "http://127.0.0.1:8000/v1", "model": "Qwen2.5-VL-72B"})
ROWS = summarize([("latentlens", 0, 40, 30), ("latentlens", 8, 40, 33), ("logitlens", 0, 40, 5),
                  ("logitlens", 8, 40, 9)], ["latentlens", "logitlens"])


def test_title_and_caption():
    title, caption = plot_labels(RUN, 10, 40)
    assert title == "llava-hf/llava-1.5-7b-hf, judged by openai-compatible (Qwen2.5-VL-72B)"
    assert RUN.name not in title
    assert caption.startswith("n = 10 images, 40 patches") and "95%" in caption
    assert plot_labels(SimpleNamespace(**{**RUN.__dict__, "judge": "labels", "judge_settings": {}}), 1, 1)[0] \
        == "llava-hf/llava-1.5-7b-hf, judged by labels"
    assert plot_labels(RUN, 1, 1)[1].startswith("n = 1 image, 1 patch ")


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_formats(tmp_path, fmt, magic):
    title, caption = plot_labels(RUN, 10, 40)
    path = write_plot(ROWS, tmp_path / f"fig.{fmt}", title=title, caption=caption)
    data = path.read_bytes()
    assert data.startswith(magic)
    if fmt == "svg":  # text stays text: the title, the caption and the legend's band are readable
        text = data.decode("utf-8")
        for s in ("judged by openai-compatible (Qwen2.5-VL-72B)", "n = 10 images, 40 patches", "95% interval",
                  "latentlens", "logitlens"):
            assert s in text, s


def test_bad_format(tmp_path):
    with pytest.raises(InputError, match="plot format 'gif'"):
        write_plot(ROWS, tmp_path / "fig.gif")
    r = CliRunner().invoke(cli, ["eval", "--summary", "x", "--format", "gif"])
    assert r.exit_code == 2 and "'gif' is not one of 'png', 'pdf', 'svg'" in r.output
