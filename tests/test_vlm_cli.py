"""The real pipeline on a tiny VLM: `llens ingest DIR corpus` (text side only), then
`llens query NAME --image` and `llens report NAME --image` by the stored name."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli
from vlm_tiny import CORPUS, build_llava, sample_image


@pytest.fixture(scope="module")
def ingested(db_url, tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    model_dir = build_llava(base / "tiny-llava")
    corpus = base / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    image = base / "photo.png"
    sample_image((96, 64)).save(image)
    r = CliRunner().invoke(cli, ["ingest", str(model_dir), str(corpus), "--layers", "0,1,2,3",
                                 "--skip-positions", "0", "--no-index", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    return {"name": "tiny-llava", "image": image, "base": base}


def test_query_image_cli_json(ingested):
    r = CliRunner().invoke(cli, ["query", ingested["name"], "--image", str(ingested["image"]),
                                 "--visual-layers", "0,2", "-k", "2", "--patches", "center", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["grid"] == [4, 4] and d["image_size"] == [96, 64]
    assert [vl["visual_layer"] for vl in d["layers"]] == [0, 2]
    patches = d["layers"][1]["patches"]
    assert [(p["row"], p["col"]) for p in patches] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for p in patches:
        assert len(p["neighbours"]) == 2 and len(p["box"]) == 4
        assert all(n["sentence"] in CORPUS for n in p["neighbours"])


def test_query_image_cli_table_with_sample(ingested):
    r = CliRunner().invoke(cli, ["query", ingested["name"], "--image", str(ingested["image"]),
                                 "--visual-layers", "1", "-k", "1", "--sample", "3", "--seed", "2"])
    assert r.exit_code == 0, r.output
    blocks = r.stdout.strip().split("\n\n")  # like the text table: a block per (visual layer, patch)
    assert len(blocks) == 3
    for block in blocks:
        lines = block.splitlines()
        assert re.fullmatch(r"visual layer 1, patch \d+ \(row \d+, col \d+\)", lines[0])
        assert lines[1].split() == ["#", "neighbour", "word", "similarity", "layers", "sentence"]
        assert len(lines) == 4 and "«" in lines[3] and "[[" not in lines[3]


def test_report_cli_by_stored_name(ingested):
    out = ingested["base"] / "report"
    r = CliRunner().invoke(cli, ["report", ingested["name"], "--image", str(ingested["image"]),
                                 "--out", str(out), "--visual-layers", "0,3", "-k", "3"])
    assert r.exit_code == 0, r.output
    assert (out / "report.html").is_file() and (out / "report.png").is_file()
    assert "4x4 visual tokens, 16 queried" in r.output
