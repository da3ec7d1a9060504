"""Comparison (issue 21 b): two visual layers, two methods or two models of one image side by side;
per patch both top-k lists and the words they share. Hand-built results where the overlap is known,
compare.html in headless Chromium, and `llens report --compare/--compare-layers/--compare-methods`."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli
from test_report import ALL, CHROMIUM, _dump_dom, make_result, requires_chromium
from vlm_tiny import build_qwen, ingest_text, sample_image

from latentlens.compare import (
    Side,
    compare,
    paired_layer,
    render_compare_html,
    shared_words,
    write_compare,
)
from latentlens.errors import InputError


def _words(p, method="latentlens"):
    if method == "latentlens":
        return [n.word.lower() for n in p.distinct()]
    return [h.word.lower() for h in p.lenses[method]]


def test_two_layers_overlap_is_the_shared_words():
    res = make_result(grid=(4, 6), layers=(0, 8), k=3)
    cmp = compare(Side(res, 0), Side(res, 8))
    assert cmp.k == 3 and len(cmp.pairs) == 24
    total = 0
    for pair, a, b in zip(cmp.pairs, res.layer(0).patches, res.layer(8).patches, strict=True):
        assert pair.patch_idx == a.patch_idx == pair.right_patch
        want = [w for w in dict.fromkeys(_words(a)) if w in set(_words(b))]
        assert pair.shared == want and pair.overlap == len(want)
        total += len(want)
    assert total > 0 and cmp.mean_overlap == pytest.approx(total / 24)
    same = compare(Side(res, 8), Side(res, 8))
    assert all(p.overlap == len(set(_words(q))) for p, q in zip(same.pairs, res.layer(8).patches))


def test_two_methods_and_errors():
    res = make_result(grid=(2, 3), layers=(0, 8), k=3, methods=ALL)
    cmp = compare(Side(res, 8, "latentlens"), Side(res, 8, "logitlens"))
    p = res.layer(8).patches[1]
    assert [h["word"] for h in cmp.pairs[1].right] == [h.word for h in p.lenses["logitlens"]]
    assert cmp.pairs[1].shared == [w for w in dict.fromkeys(_words(p)) if w in _words(p, "logitlens")]
    with pytest.raises(InputError, match="visual layer 5 is not in this result"):
        compare(Side(res, 5), Side(res, 8))
    only = make_result(grid=(2, 3), layers=(0,), k=3)
    with pytest.raises(InputError, match="method 'logitlens' is not in the result"):
        compare(Side(only, 0), Side(only, 0, "logitlens"))
    assert shared_words([{"word": " Dog"}, {"word": "dog"}, {"word": "cat"}], [{"word": "DOG "}]) == ["dog"]


def test_two_models_with_other_grids_match_by_patch_centre():
    fine = make_result(size=(240, 160), grid=(4, 6), layers=(8,), k=3)
    coarse = make_result(size=(240, 160), grid=(2, 3), layers=(8,), k=3, seed=1)
    coarse.model = "other/model"
    cmp = compare(Side(fine, 8), Side(coarse, 8))
    by = {p.patch_idx: p.right_patch for p in cmp.pairs}
    # 40-px cells against 80-px cells: (row 1, col 1) lies in coarse (0, 0); (row 2, col 2) in coarse (1, 1)
    assert by[0] == 0 and by[7] == 0 and by[14] == 4 and by[23] == 5
    # the two grids are said: in the page's summary and in --json
    assert cmp.grid_note and "A's grid is 4x6 visual tokens, B's 2x3" in cmp.grid_note
    assert cmp.to_dict()["grids"] == [[4, 6], [2, 3]]
    assert "B&#x27;s 2x3" in render_compare_html(cmp, sample_image(fine.image_size))
    assert compare(Side(fine, 8), Side(fine, 8)).grid_note is None
    other = make_result(size=(100, 100), grid=(2, 2), layers=(8,))
    with pytest.raises(InputError, match="different images"):
        compare(Side(fine, 8), Side(other, 8))


def test_another_models_layer_is_paired_by_number_else_its_first():
    b = make_result(layers=(0, 7, 14), seed=1)
    assert [paired_layer(x, b) for x in (0, 7, 8, 16)] == [0, 7, 0, 0]


@requires_chromium
def test_compare_html_in_headless_chromium(tmp_path):
    res = make_result(grid=(4, 6), layers=(0, 8), k=3)
    cmp = compare(Side(res, 0), Side(res, 8))
    idx = next(p.patch_idx for p in cmp.pairs if p.shared)
    path = write_compare(cmp, sample_image(res.image_size), tmp_path)
    html = path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # offline
    dom = _dump_dom(path, f"patch={idx}", tmp_path)
    assert len(re.findall(r'<div class="cell cmp', dom)) == 24
    pair = cmp.pairs[idx]
    assert f"{pair.overlap}/3" in dom
    assert re.search(rf'id="patch-title"[^>]*>Patch {idx} \(row', dom)
    a = re.search(r'<div class="list-a">(.*?)</div>', dom, re.S).group(1)
    b = re.search(r'<div class="list-b">(.*?)</div>', dom, re.S).group(1)
    assert len(re.findall(r"<li", a)) == len(pair.left) and len(re.findall(r"<li", b)) == len(pair.right)
    marked = re.findall(r'<li class="shared"><span class="nb-word">(.*?)</span>', a)
    assert [w.lower() for w in marked] == pair.shared
    assert CHROMIUM


@pytest.fixture(scope="module")
def qwen(db_url, tmp_path_factory):
    from latentlens.store import Store
    from latentlens.vlm import load_vlm

    d = build_qwen(tmp_path_factory.mktemp("vlm") / "tiny-qwen2-vl")
    with Store.open(db_url) as store:
        ingest_text(store, load_vlm(str(d)))
    img = tmp_path_factory.mktemp("img") / "photo.png"
    sample_image((96, 64)).save(img)
    return {"model": str(d), "image": str(img)}


def _report(qwen, out, *args):
    return CliRunner().invoke(cli, ["report", qwen["model"], "--image", qwen["image"], "--out", str(out), "-k", "3",
                                    "--resolution", "112", "--json", *args])


def test_cli_compare_layers_and_same_model(qwen, tmp_path):
    r = _report(qwen, tmp_path / "a", "--compare-layers", "0,2")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["visual_layers"] == [0, 2]
    c = out["compare"]
    assert "visual layer 0" in c["left"] and "visual layer 2" in c["right"] and len(c["patches"]) == 16
    for p in c["patches"]:
        assert len(p["left"]) == len(p["right"]) == 3
        assert p["shared"] == [w for w in dict.fromkeys(h["word"].lower() for h in p["left"])
                               if w in {h["word"].lower() for h in p["right"]}]
    assert (tmp_path / "a" / "compare.html").is_file()
    # the same model on the same image: every word is shared
    r = _report(qwen, tmp_path / "b", "--visual-layers", "2", "--compare", qwen["model"])
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)["compare"]
    assert all(p["overlap"] == len({h["word"].lower() for h in p["left"]}) for p in c["patches"])


def test_cli_compare_methods_and_bad_input(qwen, tmp_path):
    r = _report(qwen, tmp_path / "m", "--visual-layers", "2", "--method", "all",
                "--compare-methods", "latentlens,embeddinglens")
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)["compare"]
    assert "LatentLens" in c["left"] and "EmbeddingLens" in c["right"]
    for args, msg in ((["--compare-layers", "1"], "give two"), (["--compare-methods", "latentlens,latentlens"],
                                                                "two different methods"),
                      (["--compare-methods", "latentlens,logitlens"], "among --method")):
        r = _report(qwen, tmp_path / "x", *args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
