"""One module and one class per architecture, registered once (latentlens.architectures).

The registry maps each model_type to one class; that class is both the VLM
wrapper load_vlm returns and the text-side adapter ingest loads with, and
`llens ingest --help` lists what the registry holds (a new family shows up
with one module and one registry line).
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli

import latentlens.architectures as arch
from latentlens.architectures import (
    FAMILIES,
    DecoderAdapter,
    family_for,
    family_for_type,
    supported_model_types,
    supported_vlms,
    vlm_families,
    vlm_family_for,
)
from latentlens.errors import InputError, UnsupportedModel

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _all_vlm_subclasses() -> set[type]:
    from latentlens.vlm.base import VisionLanguageModel

    for pkg in ("latentlens.architectures", "latentlens.vlm"):
        for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
            importlib.import_module(f"{pkg}.{m.name}")
    seen: set[type] = set()
    todo = [VisionLanguageModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("latentlens.") and sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return seen


def test_every_model_type_maps_to_one_class_in_its_own_module():
    from latentlens.vlm.base import VisionLanguageModel

    assert not set(FAMILIES) & set(DecoderAdapter.model_types)
    families = vlm_families()
    assert len(families) == len(set(families)) >= 12
    for model_type, target in FAMILIES.items():
        cls = family_for_type(model_type)
        module, name = target.split(":")
        assert cls is not None and cls.__name__ == name and cls.__module__ == f"latentlens.architectures.{module}"
        assert issubclass(cls, VisionLanguageModel) and cls.multimodal
        # the class says which model types it handles; the registry agrees, both ways
        assert cls.model_types == tuple(t for t, f in FAMILIES.items() if family_for_type(t) is cls), cls
        assert family_for(types.SimpleNamespace(model_type=model_type)) is cls
        assert vlm_family_for(types.SimpleNamespace(model_type=model_type)) is cls
    # no VLM class anywhere in the package is left out of the registry (no second list of them)
    assert _all_vlm_subclasses() == set(families)
    assert supported_model_types() == sorted([*DecoderAdapter.model_types, *FAMILIES])


def test_unknown_and_text_only_types_fail_with_what_is_supported():
    with pytest.raises(InputError, match="unsupported architecture 'gpt2'.*supported model types:.*llava.*molmo2"):
        family_for(types.SimpleNamespace(model_type="gpt2"))
    assert family_for(types.SimpleNamespace(model_type="llama")) is DecoderAdapter
    with pytest.raises(UnsupportedModel, match="no vision-language adapter for model type 'llama'.*Molmo2"):
        vlm_family_for(types.SimpleNamespace(model_type="llama", architectures=["LlamaForCausalLM"]))


def test_old_public_names_answer_from_the_one_registry():
    import latentlens.models as models
    import latentlens.vlm as vlm

    assert vlm_families() == vlm.ADAPTERS and vlm.supported_models() == supported_vlms()
    assert vlm.adapter_for is vlm_family_for and models.adapter_for_config is family_for
    assert (DecoderAdapter, *vlm_families()) == models.ADAPTERS
    assert models.language_model_of is arch.language_model_of and models.heads_of is arch.heads_of
    import latentlens.vlm.extract as extract

    assert not hasattr(extract, "ADAPTERS")  # one registry, not a copy per package


def test_the_registry_and_vlm_package_import_no_torch():
    code = ("import sys, latentlens.architectures as a, latentlens.vlm; "
            "a.supported_model_types(); a.family_for_type('llama'); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


@pytest.fixture
def toy_family(monkeypatch):
    """A new family as a user adds one: a module under latentlens.architectures and one registry line."""
    from latentlens.architectures.llava import LlavaVLM

    module = types.ModuleType("latentlens.architectures.toy_vl")

    class ToyVLM(LlavaVLM):
        display_name = "Toy-VL"
        model_types = ("toy_vl",)

    ToyVLM.__module__ = module.__name__
    module.ToyVLM = ToyVLM  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(FAMILIES, "toy_vl", "toy_vl:ToyVLM")
    return ToyVLM


def test_a_family_is_one_module_and_one_registry_line(toy_family):
    cfg = types.SimpleNamespace(model_type="toy_vl")
    assert family_for(cfg) is toy_family and vlm_family_for(cfg) is toy_family
    assert "toy_vl" in supported_model_types() and vlm_families()[-1] is toy_family
    r = CliRunner().invoke(cli, ["ingest", "--help"], terminal_width=200)
    assert r.exit_code == 0
    text = "".join(r.output.split())  # help wraps lines (at hyphens too)
    assert "Toy-VL(toy_vl)" in text
    for family in vlm_families():
        assert f"{family.display_name}({'/'.join(family.model_types)})".replace(" ", "") in text


def test_docs_list_every_registered_model_type_and_how_to_add_one():
    text = (DOCS / "vlm.md").read_text()
    for model_type in FAMILIES:
        assert f"`{model_type}`" in text, model_type
    adding = text.split("## Adding an architecture", 1)[1].split("\n## ", 1)[0]
    assert "latentlens/architectures/" in adding and "FAMILIES" in adding


def _tiny(name: str, out: Path) -> Path:
    if name in ("llava", "qwen2_5_vl"):
        from vlm_tiny import build_llava, build_qwen

        return build_llava(out) if name == "llava" else build_qwen(out, v25=True)
    module = {"paligemma": "vlm_tiny_paligemma", "idefics3": "vlm_tiny_idefics3", "molmo2": "vlm_tiny_molmo2"}[name]
    return getattr(importlib.import_module(module), f"build_{name}")(out)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "paligemma", "idefics3", "molmo2"])
def test_ingest_and_load_vlm_ask_the_same_class(tmp_path, name):
    """The text side stored by ingest and the visual tokens come from one family class."""
    from latentlens.models import load_language_model
    from latentlens.vlm import load_vlm

    path = _tiny(name, tmp_path / name)
    lm = load_language_model(str(path))
    vlm = load_vlm(str(path), device="cpu")
    assert lm.adapter is type(vlm) is vlm_family_for(vlm.config)
    assert type(lm.model) is type(vlm.language_model)
    assert (lm.hidden_size, lm.num_layers) == (vlm.hidden_size, vlm.num_layers)
    heads = vlm.heads
    assert heads.embedding.shape[1] == vlm.hidden_size
