"""Import/export of the reference library's index layout."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from _query_data import fill
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.errors import InputError
from latentlens.interop import export_index, find_span, import_index, prefix_hash
from latentlens.query import Lens

REF_INDEX = Path(os.environ.get(
    "LLENS_REFERENCE_INDEX_PY",
    Path(__file__).resolve().parents[1] / ".cache/reference/latentlens/index.py",  # .ci/setup unpacks it
))


def reference_module():
    """The reference library's index.py, loaded under another name (its package name clashes with ours)."""
    if not REF_INDEX.is_file():
        pytest.skip(f"reference latentlens index.py not found at {REF_INDEX} (set LLENS_REFERENCE_INDEX_PY)")
    spec = importlib.util.spec_from_file_location("reference_latentlens_index", REF_INDEX)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look themselves up there
    spec.loader.exec_module(mod)
    return mod


def write_reference_dir(path: Path, layers: dict[int, tuple[torch.Tensor, list[dict]]]) -> None:
    """What ContextualIndex.save writes (without needing the reference installed)."""
    path.mkdir(parents=True, exist_ok=True)
    dim = next(iter(layers.values()))[0].shape[1]
    (path / "metadata.json").write_text(json.dumps({"layers": sorted(layers), "hidden_dim": dim}))
    for layer, (emb, meta) in layers.items():
        (path / f"layer_{layer}").mkdir()
        torch.save({"embeddings": emb.half(), "metadata": meta}, path / f"layer_{layer}" / "embeddings_cache.pt")


def load_like_reference(path: Path) -> dict[int, tuple[torch.Tensor, list[dict]]]:
    """ContextualIndex.from_directory's reading, for when the reference is not installed."""
    out = {}
    for d in sorted(path.glob("layer_*")):
        cache = torch.load(d / "embeddings_cache.pt", map_location="cpu", weights_only=True)
        out[int(d.name.split("_")[1])] = (torch.nn.functional.normalize(cache["embeddings"].float(), dim=-1),
                                           cache["metadata"])
    return out


def reference_search(layers, q: torch.Tensor, k: int) -> list[list[tuple]]:
    """Global cross-layer top-k as in ContextualIndex.search: (caption, position, layer, sim)."""
    q = torch.nn.functional.normalize(q.float(), dim=-1)
    out = []
    for qi in range(q.shape[0]):
        cands = []
        for layer, (emb, meta) in layers.items():
            s = emb @ q[qi]
            v, i = torch.topk(s, min(k, len(meta)))
            cands += [(float(a), meta[b]["caption"], meta[b]["position"], layer) for a, b in zip(v, i, strict=True)]
        cands.sort(key=lambda x: -x[0])
        out.append(cands[:k])
    return out


class Payload:
    """Not a plain type: needs arbitrary unpickling."""


CAPTIONS = ["a brown dog on the grass", "the cat sat on the mat", "a dog and a cat"]


@pytest.fixture
def ref_dir(tmp_path):
    """A small synthetic index in the reference layout, with a duplicated row."""
    rng = np.random.default_rng(0)
    meta = []
    for c in CAPTIONS:
        for p, w in enumerate(c.split(" ")):
            meta.append({"token_str": " " + w if p else w, "token_id": 100 + len(w) * 7 + ord(w[0]),
                         "caption": c, "position": p + 2})
    meta.append(dict(meta[0]))  # the same context twice: stored once
    layers = {}
    for layer in (2, 5):
        emb = torch.from_numpy(rng.normal(size=(len(meta), 24)).astype(np.float32)) * 50
        emb[-1] = emb[0]
        layers[layer] = (emb, meta)
    write_reference_dir(tmp_path / "refidx", layers)
    return tmp_path / "refidx"


def test_find_span_only_when_unambiguous():
    assert find_span("a brown dog on the grass", " dog") == (8, 11)
    assert find_span("a dog and a cat", " a") == (-1, -1)  # two whole-word 'a'
    assert find_span("a cat", "a") == (-1, -1)  # no leading space: also inside 'cat'
    assert find_span("a brown dog", "a") == (0, 1)
    assert find_span("the cat", " ") == (-1, -1)
    assert prefix_hash("x", 3) == prefix_hash("x", 3) != prefix_hash("x", 4)


def test_import_reference_layout(store, ref_dir, tmp_path):
    rep = import_index(store, ref_dir, "imported", chunk_rows=5)
    assert rep.corpus == "refidx" and rep.hidden_size == 24
    n_rows = sum(len(c.split(" ")) for c in CAPTIONS)
    assert {layer: r["written"] for layer, r in rep.layers.items()} == {2: n_rows, 5: n_rows}
    assert rep.layers[2]["skipped"] == 1
    assert rep.sentences == len(CAPTIONS)
    info = store.get_model("imported")
    assert info.layer_numbers == [2, 5] and info.num_layers == 5
    # neighbours equal the reference search over the same files
    ref = load_like_reference(ref_dir)
    q = torch.from_numpy(np.random.default_rng(1).normal(size=(4, 24)).astype(np.float32))
    want = reference_search(ref, q, 5)
    with nullcontext(Lens(store, cache_dir=tmp_path / "scan")) as lens:
        got = lens.neighbors(q, "imported", k=5)
        for r, w in zip(got, want, strict=True):
            assert [(n.sentence, n.position, n.layer) for n in r.neighbours] == [x[1:] for x in w]
            np.testing.assert_allclose([n.similarity for n in r.neighbours], [x[0] for x in w], atol=2e-3)
        # token strings came from the metadata; spans located where unambiguous
        [hit] = lens.neighbors(ref[2][0][2], "imported", layers=[2], k=1)
        top = hit.neighbours[0]
        assert top.token == " dog" and top.sentence == CAPTIONS[0]
        assert top.sentence[top.char_start: top.char_end] == "dog"
    # idempotent
    again = import_index(store, ref_dir, "imported")
    assert all(r["written"] == 0 for r in again.layers.values())
    assert store.get_model("imported").row_count == 2 * n_rows


def test_import_refuses_arbitrary_pickle(store, tmp_path):
    d = tmp_path / "evil" / "layer_1"
    d.mkdir(parents=True)
    torch.save({"embeddings": torch.ones(1, 4), "metadata": [Payload()]}, d / "embeddings_cache.pt")
    with pytest.raises(InputError, match="arbitrary unpickling"):
        import_index(store, tmp_path / "evil", "evil")
    with pytest.raises(InputError, match="layer_N/embeddings_cache.pt"):
        import_index(store, tmp_path, "evil")


def test_round_trip_export_import(store, tmp_path):
    d = fill(store, "orig", n_sentences=40, dim=32, layers=(0, 3))
    out = tmp_path / "exported"
    rep = export_index(store, "orig", out)
    assert rep["layers"] == {"0": d["info"].layer(0).row_count, "3": d["info"].layer(3).row_count}
    assert json.loads((out / "metadata.json").read_text())["layers"] == [0, 3]
    with pytest.raises(InputError, match="already holds"):
        export_index(store, "orig", out)
    ref = load_like_reference(out)
    q = torch.from_numpy(np.random.default_rng(7).normal(size=(5, 32)).astype(np.float32))
    want = reference_search(ref, q, 6)
    import_index(store, out, "copy", corpus_name="orig-copy")
    with nullcontext(Lens(store, cache_dir=tmp_path / "scan")) as lens:
        a = lens.neighbors(q, "orig", k=6)
        b = lens.neighbors(q, "copy", k=6)
    for ra, rb, w in zip(a, b, want, strict=True):
        key_a = [(n.token, n.sentence, n.position, n.layer) for n in ra.neighbours]
        key_b = [(n.token, n.sentence, n.position, n.layer) for n in rb.neighbours]
        assert key_a == key_b
        assert [(n.sentence, n.position, n.layer) for n in ra.neighbours] == [x[1:] for x in w]
        np.testing.assert_allclose([n.similarity for n in ra.neighbours], [n.similarity for n in rb.neighbours],
                                   atol=1e-3)
        # spans recovered for unambiguous tokens match the original ones
        for na, nb in zip(ra.neighbours, rb.neighbours, strict=True):
            if nb.char_start is not None:
                assert (na.char_start, na.char_end) == (nb.char_start, nb.char_end)


def test_export_loads_in_reference_library(store, tmp_path):
    ref = reference_module()
    fill(store, "for-ref", n_sentences=20, dim=16, layers=(1, 2))
    export_index(store, "for-ref", tmp_path / "x")
    index = ref.ContextualIndex.from_directory(tmp_path / "x")
    assert index.available_layers == [1, 2] and index.hidden_dim == 16
    q = torch.from_numpy(np.random.default_rng(3).normal(size=(3, 16)).astype(np.float32))
    theirs = index.search(q, top_k=4)
    with nullcontext(Lens(store, cache_dir=tmp_path / "scan")) as lens:
        ours = lens.neighbors(q, "for-ref", k=4)
    for t, o in zip(theirs, ours, strict=True):
        assert [(n.caption, n.position, n.contextual_layer, n.token_str) for n in t] == \
               [(n.sentence, n.position, n.layer, n.token) for n in o.neighbours]


def test_cli_import_export(db_url, ref_dir, tmp_path):
    r = CliRunner().invoke(cli, ["import-index", str(ref_dir), "--model", "cli-imp", "--json",
                                 "--database-url", db_url])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["layers"]["2"]["written"] > 0
    r = CliRunner().invoke(cli, ["export-index", "cli-imp", str(tmp_path / "e"), "--layers", "5",
                                 "--database-url", db_url])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "e" / "layer_5" / "embeddings_cache.pt").is_file()
    assert not (tmp_path / "e" / "layer_2").exists()
    r = CliRunner().invoke(cli, ["import-index", str(ref_dir), "--model", "x", "--hidden-size", "7",
                                 "--database-url", db_url])
    assert r.exit_code != 0 and "24 dimensions" in r.output
