"""Figures and tables a paper can use: the eval summary figure (title, caption, legend, formats) on a
run recorded by hand (no model), `--judge-model` and its hidden old spelling, and `llens ingest --help`."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.eval.summary import figure_text, summarize, write_plot
from latentlens.store import Store
from latentlens.store.evals import EvalItem, EvalVerdict


@pytest.fixture(scope="module")
def run(db_url):
    """3 images, 5 patches, 2 methods x 2 layers, judged by a named judge model."""
    with Store.open(db_url) as s:
        r = s.create_eval_run("fig-run-3f2a9c", model="llava-hf/llava-1.5-7b-hf", model_id=None,
                              methods=["latentlens", "logitlens"], visual_layers=[0, 8], judge="openai-compatible",
                              judge_settings={"model": "Qwen2.5-VL-72B", "url": "http://x/v1"}, settings={},
                              fingerprint="f", items_planned=5)
        for i in range(5):
            item = EvalItem(i, f"img{i % 3}.png", "0" * 64, (64, 64), i, 0, i, (0.0, 0.0, 8.0, 8.0))
            s.record_eval_item(r, item, [EvalVerdict(m, v, ["dog"], (i + v) % 2 == 0)
                                         for m in ("latentlens", "logitlens") for v in (0, 8)])
        return r


def _svg_text(path) -> str:
    # matplotlib writes each glyph as a path; keep the text as text to read it back
    return path.read_text(encoding="utf-8")


def test_figure_names_model_and_judge_and_counts_images_and_patches(run, db_url, tmp_path):
    with Store.open(db_url) as s:
        assert s.eval_extent(run) == (3, 5)
    title, caption = figure_text(run.model, run.judge, run.judge_settings, 3, 5, run.name)
    assert title == "llava-hf/llava-1.5-7b-hf, judged by Qwen2.5-VL-72B" and run.name not in title
    assert "n = 3 images, 5 patches" in caption and "95%" in caption
    assert figure_text("m", "labels", {"annotations": "/a/regions.jsonl"}, 1, 1)[0] == \
        "m, judged by labels (regions.jsonl)"


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_summary_formats(run, tmp_path, fmt, magic):
    r = CliRunner().invoke(cli, ["eval", "--summary", run.name, "--out", str(tmp_path), "--format", fmt, "--json"])
    assert r.exit_code == 0, r.output
    path = tmp_path / f"{run.name}-summary.{fmt}"
    assert json.loads(r.stdout)["files"][fmt] == str(path)
    assert path.read_bytes().startswith(magic)
    r = CliRunner().invoke(cli, ["eval", "--summary", run.name, "--out", str(tmp_path), "--format", "gif"])
    assert r.exit_code == 2


def test_svg_carries_title_caption_and_band_legend(tmp_path):
    import matplotlib

    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text in the SVG
    try:
        rows = summarize([("latentlens", 0, 5, 2), ("latentlens", 8, 5, 4)], ["latentlens"])
        path = write_plot(rows, tmp_path / "f.svg", title="M, judged by J", caption="n = 3 images, 5 patches",
                          fmt="svg")
        svg = path.read_text(encoding="utf-8")
    finally:
        matplotlib.rcParams["svg.fonttype"] = "path"
    assert "M, judged by J" in svg and "n = 3 images, 5 patches" in svg
    assert "95% interval (Wilson)" in svg and "latentlens" in svg


def test_judge_model_option_and_hidden_old_spelling():
    r = CliRunner().invoke(cli, ["eval", "--help"])
    assert "--judge-model" in r.output and not re.search(r"--model\b", r.output.replace("--judge-model", ""))
    # the old spelling still reaches the judge: a bad judge name fails on the judge, not on the option
    for flag in ("--judge-model", "--model"):
        r = CliRunner().invoke(cli, ["eval", "x", "--images", "/no/such", "--judge", "labels", flag, "q"])
        assert "no such option" not in r.output


def test_ingest_help_lists_every_registered_vlm_family():
    from latentlens.architectures import vlm_families

    r = CliRunner().invoke(cli, ["ingest", "--help"], terminal_width=200)
    text = "".join(r.output.split())  # help wraps lines (at hyphens too)
    assert len(vlm_families()) >= 11
    for adapter in vlm_families():
        want = f"{adapter.display_name}({'/'.join(adapter.model_types)})".replace(" ", "")
        assert want in text, adapter
