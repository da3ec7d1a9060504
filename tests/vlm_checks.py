"""Checks every VLM adapter's tests share: patch boxes that tile a region, and the end-to-end
run (ingest the text side, query an image with every method, write the report; click's
CliRunner, the real commands)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli
from vlm_tiny import CORPUS, sample_image


def area(box) -> float:
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def assert_tiles(patches, region) -> None:
    """Boxes lie inside ``region``, don't overlap and cover it exactly."""
    rx0, ry0, rx1, ry1 = region
    for p in patches:
        x0, y0, x1, y1 = p.box
        assert rx0 <= x0 < x1 <= rx1 and ry0 <= y0 < y1 <= ry1, p
    assert sum(area(p.box) for p in patches) == pytest.approx(area(region))
    for a in patches:
        for b in patches:
            if a.idx < b.idx:
                ox = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
                oy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                assert ox <= 1e-9 or oy <= 1e-9, (a, b)


def cli_ingest(model_dir: Path, tmp_path: Path) -> None:
    """`llens ingest` of the tiny corpus (layers 0-3, every position, no index) through the CLI."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    r = CliRunner().invoke(cli, ["ingest", str(model_dir), str(corpus), "--layers", "0,1,2,3",
                                 "--skip-positions", "0", "--no-index", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output


def cli_ingest_query_report(model_dir: Path, tmp_path: Path, *, size: tuple[int, int] = (96, 48),
                            prompt: str | None = None, ingest: bool = True) -> dict:
    """Run `llens ingest` (unless done), `llens query --image --method all --json` and `llens report`;
    check what holds for every architecture and return the query's JSON for grid checks."""
    runner = CliRunner()
    if ingest:
        cli_ingest(model_dir, tmp_path)
    image = tmp_path / f"photo-{model_dir.name}.png"
    sample_image(size).save(image)
    name = model_dir.name
    extra = ["--prompt", prompt] if prompt else []
    r = runner.invoke(cli, ["query", name, "--image", str(image), "--visual-layers", "0,3", "-k", "2",
                            "--method", "all", "--json", *extra])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    rows, cols = d["grid"]
    assert d["image_size"] == list(size) and d["methods"] == ["latentlens", "logitlens", "embeddinglens"]
    assert [vl["visual_layer"] for vl in d["layers"]] == [0, 3]
    for vl in d["layers"]:
        assert len(vl["patches"]) == rows * cols
        for p in vl["patches"]:
            assert len(p["neighbours"]) == 2
            assert all(n["sentence"] in CORPUS for n in p["neighbours"])
            assert [len(p["lenses"][m]) for m in ("logitlens", "embeddinglens")] == [2, 2]
            x0, y0, x1, y1 = p["box"]
            assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
    out = tmp_path / f"report-{name}"
    r = runner.invoke(cli, ["report", name, "--image", str(image), "--out", str(out),
                            "--visual-layers", "0,3", "-k", "2", "--method", "all", *extra])
    assert r.exit_code == 0, r.output
    assert (out / "report.html").is_file() and (out / "report.png").is_file()
    assert f"{rows}x{cols} visual tokens, {rows * cols} queried" in r.output
    return d


def assert_logitlens_matches_own_logits(vlm, size: tuple[int, int] = (96, 48)):
    """LogitLens at the last layer equals the VLM's own next-token softmax at its image tokens
    (same top-3 ids and probabilities): the heads, norm and positions are the model's. Returns
    the lens for family-specific checks."""
    import torch

    from latentlens.lenses import VocabularyLens

    img = sample_image(size)
    last = vlm.num_layers
    vt = vlm.visual_tokens(img, layers=[last])
    inputs, _ = vlm.encode(img, vt.prompt, None)
    with torch.inference_mode():
        logits = vlm.model(**inputs).logits[0, torch.from_numpy(vt.positions)].float()
    lens = VocabularyLens.of(vlm)
    hits = lens.logit_lens(vt.vectors[last], last, k=3)
    want = torch.topk(torch.softmax(logits, -1), 3)
    assert [[h.token_id for h in row] for row in hits] == want.indices.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], want.values.numpy(), atol=1e-5)
    return lens
