"""Corrupt inputs through the real CLI (issue 12; the table in docs/reliability.md, "Bad input").

Each case runs the command a user would run and checks: the documented exit
code (2 = bad input), exactly one line on stderr that names the file and the
problem, no traceback, and that nothing half-written is left in the store.
All fast: a synthetic stored model (tests/_query_data.fill), a tiny random
LM, hand-made files; no VLM is loaded (the image is checked first).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _query_data import fill
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.errors import InputError, UnknownModel
from latentlens.store import Store
from latentlens.store.types import unit_queries

CALLS: list[str] = []


def record_call(what: str) -> str:
    CALLS.append(what)
    return what


class Payload:
    """Not a plain type: unpickling it calls record_call (any code could run there)."""

    def __reduce__(self):
        return record_call, ("unpickled",)


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, *needles: str, code: int = 2) -> str:
    """The single stderr line of a failed command; asserts its exit code and that it names each needle."""
    assert "Traceback" not in r.output, r.output
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert r.stdout == "", r.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def stored(db_url):
    """'qm': hidden size 32, layers 0, 4, 8 (stored rows, no loadable model behind it)."""
    with Store.open(db_url) as s:
        fill(s, "qm", n_sentences=20)
    return "qm"


@pytest.fixture(scope="module")
def store_counts(db_url):
    def counts() -> dict:
        with Store.open(db_url) as s:
            return {"models": sorted(m.name for m in s.list_models()),
                    "corpora": sorted(c.name for c in s.list_corpora()),
                    "runs": len(s.list_runs(None, None))}
    return counts


# --------------------------------------------------------------------------
# llens query MODEL --vectors FILE


def _good_pt(path: Path) -> bytes:
    torch.save(torch.randn(4, 32), path)
    return path.read_bytes()


def test_truncated_pt(stored, tmp_path):
    data = _good_pt(tmp_path / "good.pt")
    for cut in (len(data) // 2, 10):  # no zip directory; not even a zip header
        (tmp_path / "bad.pt").write_bytes(data[:cut])
        one_line_error(run("query", stored, "--vectors", tmp_path / "bad.pt"), str(tmp_path / "bad.pt"),
                       "truncated or not a torch file")
    torch.save(torch.randn(4, 32), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "legacy_cut.pt").write_bytes((tmp_path / "legacy.pt").read_bytes()[:300])
    one_line_error(run("query", stored, "--vectors", tmp_path / "legacy_cut.pt"), "legacy_cut.pt", "truncated")
    (tmp_path / "empty.pt").write_bytes(b"")
    one_line_error(run("query", stored, "--vectors", tmp_path / "empty.pt"), "empty.pt", "empty (0 bytes)")
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(500))
    one_line_error(run("query", stored, "--vectors", tmp_path / "noise.pt"), "noise.pt", "not a torch file")


def test_pt_that_needs_unpickling_is_refused_never_run(stored, tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"v": torch.randn(2, 32), "extra": Payload()}, p)
    CALLS.clear()
    line = one_line_error(run("query", stored, "--vectors", p), str(p), "refusing to load",
                          "arbitrary unpickling", "record_call", "weights-only")
    assert "weights_only=False" not in line  # no advice to switch the guard off
    assert CALLS == []  # nothing in the file ran
    torch.save(np.ones((2, 32), np.float32), tmp_path / "np.pt")  # a numpy array pickled by torch.save
    one_line_error(run("query", stored, "--vectors", tmp_path / "np.pt"), "np.pt", "arbitrary unpickling",
                   "np.save")
    # a set is one of the plain types weights_only reads: the file loads, the key is no array
    torch.save({"v": torch.randn(2, 32), "s": {1, 2}}, tmp_path / "set.pt")
    one_line_error(run("query", stored, "--vectors", tmp_path / "set.pt"), "set.pt", "choose one with --key")
    one_line_error(run("query", stored, "--vectors", tmp_path / "set.pt", "--key", "s"), "set.pt",
                   "does not hold an array or tensor (found set)")


@pytest.mark.parametrize("array, needle", [
    (np.array(["a", "b"]), "holds text"),
    (np.ones((2, 32), np.int64), "holds integer values (int64)"),
    (np.ones((2, 32), bool), "holds boolean values"),
    (np.ones((2, 32), np.complex64), "holds complex values"),
    (np.zeros(2, dtype=[("a", "<f4")]), "holds record values"),
    (np.ones((2, 3, 32), np.float32), "shape (2, 3, 32): expected [N, D] or [D]"),
    (np.float32(1.0), "shape (): expected"),
    (np.zeros((0, 32), np.float32), "holds no vectors"),
])
def test_npy_of_the_wrong_dtype_or_shape(stored, tmp_path, array, needle):
    p = tmp_path / "bad.npy"
    np.save(p, array)
    one_line_error(run("query", stored, "--vectors", p), str(p), needle)


def test_npy_that_needs_pickle_or_is_cut(stored, tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    one_line_error(run("query", stored, "--vectors", tmp_path / "obj.npy"), "obj.npy", "Python objects",
                   "refused")
    np.save(tmp_path / "ok.npy", np.ones((4, 32), np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:200])
    one_line_error(run("query", stored, "--vectors", tmp_path / "cut.npy"), "cut.npy", "cannot read vectors")
    torch.save({"a": torch.ones(2, 32, dtype=torch.int32)}, tmp_path / "int.pt")
    one_line_error(run("query", stored, "--vectors", tmp_path / "int.pt"), "int.pt", "integer values (int32)")


def test_wrong_hidden_size_names_the_model_and_size(stored, tmp_path):
    np.save(tmp_path / "d31.npy", np.ones((2, 31), np.float32))
    one_line_error(run("query", stored, "--vectors", tmp_path / "d31.npy"), "31 dimensions",
                   "'qm' has hidden size 32")
    np.save(tmp_path / "f16.npy", np.random.default_rng(0).normal(size=(2, 32)).astype(np.float16))
    r = run("query", stored, "--vectors", tmp_path / "f16.npy", "--json")  # float16 is fine
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 2, r.output


@pytest.mark.parametrize("rows, needle", [
    ([1, np.nan], "vector 1 contains NaN or infinite values"),
    ([np.inf, 1], "vector 0 contains NaN or infinite values"),
    ([1, 0], "vector 1 is all zeros"),
])
def test_nan_inf_and_zero_vectors(stored, tmp_path, rows, needle):
    q = np.ones((2, 32), np.float32) * np.array(rows, dtype=np.float32)[:, None]
    p = tmp_path / "q.npy"
    np.save(p, q)
    # NaN/inf: load_vectors names the file; a zero vector: the query names the vector (load_vectors
    # reads zeros, as a loader should: tests/test_query.py::test_load_vectors_formats)
    one_line_error(run("query", stored, "--vectors", p), *((str(p),) if "NaN" in needle else ()), needle)
    big = np.ones((1, 32)) * 1e39  # finite in float64, infinite in float32
    np.save(p, big)
    one_line_error(run("query", stored, "--vectors", p), str(p), "beyond float32's range")


def test_unit_queries_api_checks():
    with pytest.raises(InputError, match="must be numbers"):
        unit_queries(np.array(["x"] * 4), 4)
    with pytest.raises(InputError, match="query vector 0 is all zeros"):
        unit_queries(np.zeros((1, 4)), 4)
    huge = np.full((1, 4), 1e30, np.float32)  # finite, but its squared norm overflows float32
    np.testing.assert_allclose(unit_queries(huge, 4), np.full((1, 4), 0.5), rtol=1e-6)
    tiny = np.full((1, 4), 1e-30, np.float32)  # not zero, but its squares underflow float32
    np.testing.assert_allclose(unit_queries(tiny, 4), np.full((1, 4), 0.5), rtol=1e-6)


# --------------------------------------------------------------------------
# llens ingest MODEL CORPUS


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from latentlens.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("lm") / "tiny-llama", "llama", hidden=16, layers=2)


@pytest.mark.parametrize("name, content, needle", [
    ("latin1.txt", "a dog\ncaf\xe9 au lait\n".encode("latin-1"), "is not UTF-8 text: line 2, byte 4 (0xe9"),
    ("latin1.csv", "text\na dog\ncaf\xe9\n".encode("latin-1"), "is not UTF-8 text: line 3"),
    ("utf16.txt", "a dog\n".encode("utf-16"), "is UTF-16 text"),
    ("nul.txt", b"a dog\nthe \x00cat\n", "line 2 contains a NUL character"),
    ("nul.csv", b"text\na dog\nthe \x00cat\n", "row 3 contains a NUL character"),
    ("nul.jsonl", b'{"text": "a dog"}\n{"text": "the \\u0000cat"}\n', "line 2 contains a NUL character"),
    ("surrogate.jsonl", b'{"text": "a \\ud800 dog"}\n', "line 1 has an unpaired surrogate"),
])
def test_corpus_in_a_wrong_encoding_or_with_nul(tiny_lm, store_counts, tmp_path, name, content, needle):
    before = store_counts()
    p = tmp_path / name
    p.write_bytes(content)
    one_line_error(run("ingest", tiny_lm, p, "--no-progress"), str(p), needle)
    assert store_counts() == before  # refused before any model, corpus or run was registered


def test_corpus_with_a_utf8_bom_is_read(tmp_path):
    from latentlens.corpus import read_corpus

    p = tmp_path / "bom.csv"
    p.write_bytes("\ufefftext\na dog\n".encode())
    c = read_corpus(str(p))
    assert c.texts == ["a dog"] and c.params == {"column": "text"}


# --------------------------------------------------------------------------
# llens ingest X.gguf CORPUS


def _tiny_gguf(path: Path) -> bytes:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["text", "random", "empty", "truncated"])
def test_a_gguf_that_is_not_one(store_counts, tmp_path, kind):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a brown dog\nthe cat sat\n")
    p = tmp_path / "x.gguf"
    needle = {"text": "is not a GGUF file", "random": "is not a GGUF file", "empty": "is empty (0 bytes)",
              "truncated": "is a truncated or corrupt GGUF file"}[kind]
    if kind == "text":
        p.write_text("this is a text file, not model weights\n")
    elif kind == "random":
        p.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        p.write_bytes(b"")
    else:
        data = _tiny_gguf(tmp_path / "whole.gguf")
        p.write_bytes(data[: len(data) - 600])  # the header is whole, the tensor data is cut
    before = store_counts()
    one_line_error(run("ingest", p, corpus, "--no-progress"), str(p), needle)
    assert store_counts() == before


# --------------------------------------------------------------------------
# llens query MODEL --image FILE (checked before the VLM loads: 'qm' has none to load)


def test_an_image_that_is_not_one(stored, tmp_path):
    from vlm_tiny import sample_image

    text = tmp_path / "notanimage.png"
    text.write_text("hello, I am text\n")
    one_line_error(run("query", stored, "--image", text), str(text), "not an image file")
    sample_image((96, 64)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    one_line_error(run("query", stored, "--image", tmp_path / "cut.png"), "cut.png", "truncated or corrupt")


def test_a_100_megapixel_image(stored, tmp_path, monkeypatch):
    from PIL import Image

    p = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(p)  # 100 MP, ~12 KB on disk, written in a fraction of a second
    assert p.stat().st_size < 100_000
    one_line_error(run("query", stored, "--image", p), str(p), "10000x10000 = 100.0 megapixels",
                   "over the limit of 16.8 megapixels")
    # under Pillow's own guard (89.5 MP), over the pixel budget (4096 x 4096, the largest VLM input)
    Image.new("1", (9_400, 9_400)).save(p)
    one_line_error(run("query", stored, "--image", p), str(p), "9400x9400 = 88.4 megapixels",
                   "over the limit of 16.8 megapixels (LLENS_MAX_IMAGE_PIXELS)")
    monkeypatch.setenv("LLENS_MAX_IMAGE_PIXELS", "1000000")
    one_line_error(run("query", stored, "--image", p), "over the limit of 1.0 megapixels")
    Image.new("1", (20_000, 10_000)).save(p)  # over 2x Pillow's limit: its own error, refused in open
    one_line_error(run("query", stored, "--image", p), str(p), "200.0 megapixels", "over Pillow's")


def test_load_image_api_checks(monkeypatch):
    from PIL import Image

    from latentlens.images import load_image

    with pytest.raises(InputError, match="HxW or HxWx3"):
        load_image(np.zeros((4, 4, 5), np.uint8))
    monkeypatch.setenv("LLENS_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(InputError, match="over the limit"):
        load_image(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(InputError, match="over the limit"):
        load_image(Image.new("L", (20, 20)))
    assert load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=None).size == (20, 20)
    monkeypatch.setenv("LLENS_MAX_IMAGE_PIXELS", "0")  # no limit
    assert load_image(np.zeros((20, 20, 3), np.uint8)).size == (20, 20)


# --------------------------------------------------------------------------
# llens import-index DIR


def _reference_dir(path: Path, layers=(1, 2, 5), listed=None, dim: int = 8) -> Path:
    """The reference ContextualIndex.save layout; metadata.json lists ``listed`` (default: layers)."""
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"layers": list(listed or layers), "hidden_dim": dim}))
    meta = [{"token_str": " dog", "token_id": 7, "caption": "a dog", "position": 2},
            {"token_str": " cat", "token_id": 9, "caption": "a cat", "position": 2}]
    for layer in layers:
        (path / f"layer_{layer}").mkdir()
        torch.save({"embeddings": torch.randn(2, dim).half(), "metadata": meta},
                   path / f"layer_{layer}" / "embeddings_cache.pt")
    return path


def test_import_index_empty_model_or_source_names_nothing(tmp_path):
    """An empty --model "" or --source "" was taken as given, then crashed on the missing source
    (AttributeError, found by mypy): it is one line, as when neither is given."""
    d = _reference_dir(tmp_path / "idx", layers=(1,))
    one_line_error(run("import-index", d, "--model", ""), "give --model NAME")
    one_line_error(run("import-index", d, "--source", ""), "give --model NAME")


def _nothing_imported(db_url, model: str, before: dict, counts) -> None:
    with Store.open(db_url) as s, pytest.raises(UnknownModel):
        s.get_model(model)
    assert counts() == before


def test_reference_index_with_a_missing_layer(db_url, store_counts, tmp_path):
    d = _reference_dir(tmp_path / "idx", layers=(1, 2), listed=(1, 2, 5))
    before = store_counts()
    one_line_error(run("import-index", d, "--model", "ref-missing"), str(d), "incomplete",
                   "lists layer 5", str(d / "layer_5" / "embeddings_cache.pt"), "missing")
    _nothing_imported(db_url, "ref-missing", before, store_counts)
    # the layers that are there can be imported on purpose
    r = run("import-index", d, "--model", "ref-missing", "--layers", "1,2")
    assert r.exit_code == 0, r.output
    with Store.open(db_url) as s:
        assert s.get_model("ref-missing").layer_numbers == [1, 2]


def test_reference_index_with_a_truncated_layer_file_imports_nothing(db_url, store_counts, tmp_path):
    d = _reference_dir(tmp_path / "idx")
    f = d / "layer_5" / "embeddings_cache.pt"
    f.write_bytes(f.read_bytes()[:300])  # the last layer: checked before layers 1 and 2 are written
    before = store_counts()
    one_line_error(run("import-index", d, "--model", "ref-cut"), str(f), "truncated or corrupt")
    _nothing_imported(db_url, "ref-cut", before, store_counts)


def test_reference_index_that_needs_unpickling(db_url, store_counts, tmp_path):
    d = _reference_dir(tmp_path / "idx", layers=(1,))
    f = d / "layer_1" / "embeddings_cache.pt"
    torch.save({"embeddings": torch.randn(1, 8), "metadata": [Payload()]}, f)
    before = store_counts()
    one_line_error(run("import-index", d, "--model", "ref-evil"), str(f), "arbitrary unpickling")
    _nothing_imported(db_url, "ref-evil", before, store_counts)


def test_query_bad_scan_device(stored, tmp_path):
    np.save(tmp_path / "q.npy", np.ones((2, 32), np.float32))
    one_line_error(run("query", stored, "--vectors", tmp_path / "q.npy", "--device", "gpu0"), "gpu0",
                   "unknown scan device")
    r = run("query", stored, "--vectors", tmp_path / "q.npy", "--device", "cpu", "--mode", "exact", "--json")
    assert r.exit_code == 0, r.output
