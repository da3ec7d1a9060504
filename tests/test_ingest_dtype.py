"""The forward dtype of `llens ingest` and its index builds.

--dtype auto picks bfloat16 only on a CPU with bfloat16 units, follows a
model's stored rows, and is recorded with the run and the model; rows
computed in bfloat16 are normalised from float32; a GGUF file is dequantized
once, in float32, and cast; the ANN indexes are built a few leaves at a time.
"""

from __future__ import annotations

import json
import threading

import psycopg
import pytest
import torch
from _ingest_ref import compare, expected_rows
from click.testing import CliRunner
from latentlens.cli.main import cli

import latentlens.models
from latentlens import ingest as ing
from latentlens.errors import InputError
from latentlens.models import load_language_model, loading
from latentlens.models.tiny import make_tiny_model, sample_corpus_path
from latentlens.store import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_dtype") / "llama", "llama", hidden=32, layers=3)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    lines = sample_corpus_path().read_text(encoding="utf-8").splitlines()
    base = tmp_path_factory.mktemp("dtype_corpora")
    out = {}
    for name, part in (("a", lines[:30]), ("b", lines[30:50]), ("c", lines[50:70])):
        out[name] = base / f"{name}.txt"
        out[name].write_text("\n".join(part) + "\n", encoding="utf-8")
    return out


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with bfloat16 units, with the suite's pin (LLENS_INGEST_DTYPE) lifted; returns a switch."""
    monkeypatch.delenv(loading.ENV_AUTO_DTYPE, raising=False)
    units = {"on": True}
    monkeypatch.setattr(loading, "cpu_bf16_units", lambda flags=None: units["on"])
    return units


def test_cpu_bf16_units_from_flags():
    assert loading.cpu_bf16_units({"avx512f", "avx512_bf16"})
    assert loading.cpu_bf16_units({"amx_tile", "amx_bf16"})
    assert not loading.cpu_bf16_units({"avx2", "fma", "avx512f", "avx512_vnni"})
    assert not loading.cpu_bf16_units(set())


def test_auto_dtype(monkeypatch):
    monkeypatch.delenv(loading.ENV_AUTO_DTYPE, raising=False)
    assert loading.auto_dtype("cpu", bf16_units=True) == "bf16-mixed"
    assert loading.auto_dtype("cpu", bf16_units=False) == "float32"  # AVX2 only: emulated bf16 is slower
    assert loading.auto_dtype("meta", bf16_units=True) == "float32"  # not the CPU
    monkeypatch.setenv(loading.ENV_AUTO_DTYPE, "float32")
    assert loading.auto_dtype("cpu", bf16_units=True) == "float32"
    monkeypatch.setenv(loading.ENV_AUTO_DTYPE, "int8")
    with pytest.raises(InputError, match="LLENS_INGEST_DTYPE"):
        loading.auto_dtype("cpu", bf16_units=True)


def test_cli_default_is_auto(db_url, tiny, corpora, bf16_cpu):
    r = CliRunner().invoke(cli, ["ingest", str(tiny), str(corpora["a"]), "--name", "default_auto", "--layers", "1",
                                 "--no-index", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert _dtypes(db_url, json.loads(r.stdout)) == ("bf16-mixed",) * 3


def test_bf16_mixed_keeps_the_first_block_and_the_residual_in_float32(tiny):
    """A bfloat16 residual stream reorders layer 1's near-ties (docs/ingest.md): bf16-mixed
    computes layer 1 exactly as float32 does, and the later ones close to it."""
    f32 = load_language_model(str(tiny), dtype="float32")
    mixed = load_language_model(str(tiny), dtype="bf16-mixed")
    pure = load_language_model(str(tiny), dtype="bfloat16")
    texts = sample_corpus_path().read_text(encoding="utf-8").splitlines()[:8]
    a, b, c = (m.hidden_states(texts, [1, 3]) for m in (f32, mixed, pure))
    assert mixed.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(torch.from_numpy(x.vectors[1]), torch.from_numpy(y.vectors[1]))
        assert not torch.equal(torch.from_numpy(x.vectors[1]), torch.from_numpy(z.vectors[1]))
        assert not torch.equal(torch.from_numpy(x.vectors[3]), torch.from_numpy(y.vectors[3]))  # bf16 matmuls ran
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(x.vectors[3]), torch.from_numpy(y.vectors[3]))
        assert cos.min() > 0.99


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_bf16_mixed_casts_the_linear_weights_once_with_the_same_states(arch, tmp_path):
    """mix_bf16 casts the later blocks' Linear weights to bfloat16 once (autocast cast them on
    every call: ~10% of an ingest's run): the hidden states are bitwise those of autocast over
    the float32 weights, at every layer, and the first block and the norms stay float32."""
    path = make_tiny_model(tmp_path / arch, arch, hidden=32, layers=3)
    mixed = load_language_model(str(path), dtype="bf16-mixed", lens_heads=False)
    ref = load_language_model(str(path), dtype="float32", lens_heads=False)
    for block in list(ref.model.layers)[1:]:  # what bf16-mixed was: autocast over float32 weights
        block.forward = torch.autocast("cpu", dtype=torch.bfloat16)(block.forward)
    later = mixed.model.layers[2]
    assert later.mlp.down_proj.weight.dtype == torch.bfloat16
    assert later.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert later.input_layernorm.weight.dtype == torch.float32
    assert mixed.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    texts = sample_corpus_path().read_text(encoding="utf-8").splitlines()[:12]
    a, b = (m.hidden_states(texts, [0, 1, 2, 3]) for m in (ref, mixed))
    for x, y in zip(a, b, strict=True):
        for layer in (0, 1, 2, 3):
            assert y.vectors[layer].dtype == x.vectors[layer].dtype
            assert torch.equal(torch.from_numpy(x.vectors[layer]), torch.from_numpy(y.vectors[layer])), layer


def test_choose_dtype(monkeypatch):
    monkeypatch.delenv(loading.ENV_AUTO_DTYPE, raising=False)
    assert ing.choose_dtype("float16", "bfloat16", bf16_units=True) == "float16"  # asked for: as asked
    assert ing.choose_dtype("auto", "float32", bf16_units=True) == "float32"  # the stored rows' dtype
    assert ing.choose_dtype("auto", "bfloat16", bf16_units=False) == "bfloat16"
    assert ing.choose_dtype("auto", None, bf16_units=True) == "bf16-mixed"
    assert ing.choose_dtype("auto", None, bf16_units=False) == "float32"


def _ingest(*args):
    dtype = [] if "--dtype" in args else ["--dtype", "auto"]
    r = CliRunner().invoke(cli, ["ingest", *map(str, args), *dtype, "--layers", "1,3", "--no-index",
                                 "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _dtypes(url, summary):
    with Store.open(url) as store:
        info = store.get_model(summary["model"])
        return store.get_run(summary["run"]).params["dtype"], info.dtype, info.params["dtype"]


def test_cli_auto_dtype_is_chosen_and_recorded(db_url, tiny, corpora, bf16_cpu):
    s = _ingest(tiny, corpora["a"], "--name", "auto_bf16")
    assert _dtypes(db_url, s) == ("bf16-mixed",) * 3
    # the rows are what a bf16-mixed forward gives, normalised from float32
    lm = load_language_model(str(tiny), name="auto_bf16", dtype="bf16-mixed")
    texts = corpora["a"].read_text(encoding="utf-8").splitlines()
    compare(db_url, "auto_bf16", expected_rows(lm, texts, [1, 3]), [1, 3], min_cos=0.99)

    bf16_cpu["on"] = False  # another CPU: the model's rows stay one dtype
    s = _ingest(tiny, corpora["b"], "--name", "auto_bf16")
    assert _dtypes(db_url, s)[0] == "bf16-mixed"
    s = _ingest(tiny, corpora["b"], "--name", "auto_f32")  # a new model there: float32
    assert _dtypes(db_url, s) == ("float32", "float32", "float32")
    s = _ingest(tiny, corpora["c"], "--name", "auto_bf16", "--dtype", "float32")  # asked for: as asked
    assert _dtypes(db_url, s)[0] == "float32"


def test_resume_loads_the_runs_dtype(db_url, tiny, corpora, bf16_cpu, monkeypatch):
    s = _ingest(tiny, corpora["a"], "--name", "resume_bf16")
    with psycopg.connect(db_url, autocommit=True) as conn:  # as if it had been interrupted
        conn.execute("UPDATE ingest_run SET status = 'interrupted' WHERE id = %s", (s["run"],))
    bf16_cpu["on"] = False
    asked = {}

    def load(info, **kw):
        asked.update(kw)
        raise InputError("stop here")

    monkeypatch.setattr(latentlens.models, "load_from_store", load)
    r = CliRunner().invoke(cli, ["ingest", "--resume", str(s["run"]), "--no-index", "--no-progress"])
    assert "stop here" in r.output and asked["dtype"] == "bf16-mixed"


def test_index_builds_run_on_their_own_connections(db_url, tiny, corpora, monkeypatch):
    calls: list[tuple[str, tuple, int]] = []
    real = Store.build_index

    def spy(self, model, layers=None, **kw):
        calls.append((threading.current_thread().name, tuple(layers), self.conn.info.backend_pid))
        return real(self, model, layers, **kw)

    monkeypatch.setattr(Store, "build_index", spy)
    lm = load_language_model(str(tiny), name="jobs", dtype="float32")
    from latentlens.corpus import read_corpus

    res = ing.ingest(lm, read_corpus(str(corpora["a"])), database_url=db_url,
                     options=ing.IngestOptions(layers=[0, 1, 2, 3], progress=False, index_jobs=2))
    assert "Built ANN indexes for layers 0,1,2,3." in res.notices
    assert sorted(layers for _, layers, _ in calls) == [(0,), (1,), (2,), (3,)]
    assert all(name.startswith("llens-index-") for name, _, _ in calls)
    with Store.open(db_url) as store:
        assert calls[0][2] != store.conn.info.backend_pid
        assert all(li.index_kind for li in store.get_model("jobs").layers)


def test_a_failed_index_build_stops_the_others_and_says_so(db_url, tiny, corpora, monkeypatch):
    real = Store.build_index

    def failing(self, model, layers=None, **kw):
        if list(layers) == [1]:
            raise InputError("no room for layer 1")
        return real(self, model, layers, **kw)

    monkeypatch.setattr(Store, "build_index", failing)
    lm = load_language_model(str(tiny), name="jobs_fail", dtype="float32")
    from latentlens.corpus import read_corpus

    said: list[str] = []
    with pytest.raises(InputError, match="no room for layer 1"):
        ing.ingest(lm, read_corpus(str(corpora["a"])), database_url=db_url, echo=said.append,
                   options=ing.IngestOptions(layers=[0, 1, 2], progress=False, index_jobs=2))
    assert any("run `llens index build jobs_fail`" in m for m in said)
    with Store.open(db_url) as store:
        assert store.list_runs("jobs_fail")[0].status == "done"  # the rows are kept


@pytest.mark.slow
def test_gguf_is_dequantized_once_in_float32_and_cast(smollm2_gguf, llens_dirs, monkeypatch):
    f32 = load_language_model(str(smollm2_gguf), lens_heads=False, dtype="float32")
    bf16 = load_language_model(str(smollm2_gguf), lens_heads=False, dtype="bfloat16")
    assert len(list((llens_dirs["cache"] / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*"))) == 1
    w32, w16 = (m.model.layers[3].mlp.down_proj.weight for m in (f32, bf16))
    assert w32.dtype == torch.float32 and w16.dtype == torch.bfloat16
    assert torch.equal(w32.to(torch.bfloat16), w16)
    assert bf16.store_params()["dtype"] == "bfloat16"
