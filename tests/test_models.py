"""Model handling: adapters per architecture (LLMs and VLMs' text side), BOS detection,
padding invariance, layer selection, prefix hashes and shards, loading errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from latentlens.errors import InputError, UnknownLayer
from latentlens.ingest import default_layers, parse_shard, prefix_hashes, resolve_layers, shard_of
from latentlens.models import language_model_of, load_from_store, load_language_model
from latentlens.models.tiny import ARCHS, build_model, make_tiny_model
from latentlens.store import ModelInfo

TEXTS = ["The dog runs fast in the park.", "A cat.", "The aa lava flowed slowly over the old town."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny_models")
    return {a: make_tiny_model(base / a, a, bos=(a == "gemma3_text"),
                               padding_side="left" if a == "gemma3_text" else "right") for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_the_language_model(tiny_dirs, arch):
    """Our hidden states = the full model's own output_hidden_states on the same text."""
    import transformers as tf

    lm = load_language_model(str(tiny_dirs[arch]))
    assert lm.num_layers == 4 and lm.hidden_size == 64 and lm.name == arch
    assert not hasattr(lm.model, "lm_head") and not hasattr(lm.model, "visual")
    full_cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "gemma3_text": tf.Gemma3ForCausalLM,
                "llava": tf.LlavaForConditionalGeneration, "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
                "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration}[arch]
    full = full_cls.from_pretrained(tiny_dirs[arch]).eval()
    assert type(language_model_of(full)) is type(lm.model)
    states = lm.hidden_states(TEXTS, [0, 2, 4])
    for st in states:
        with torch.inference_mode():
            ref = full(input_ids=torch.from_numpy(st.token_ids)[None], output_hidden_states=True).hidden_states
        for layer in (0, 2, 4):
            np.testing.assert_allclose(st.vectors[layer], ref[layer][0].numpy(), atol=2e-4, rtol=1e-4)
        assert st.vectors[2].dtype == np.float32 and st.vectors[2].shape == (len(st.token_ids), 64)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_forward_stops_after_the_deepest_layer_asked(tiny_dirs, arch, dtype):
    """Below the last layer, forward runs the blocks up to the deepest layer asked and no
    further: the states are bitwise those of the full forward's output_hidden_states."""
    lm = load_language_model(str(tiny_dirs[arch]), dtype=dtype)
    ran: list[int] = []
    for i, block in enumerate(lm.model.layers):
        block.register_forward_hook(lambda mod, args, out, i=i: ran.append(i))
    seqs = [e.token_ids for e in lm.encode(TEXTS)]
    for layers in ([0], [0, 1, 3], [2], [1, 2, 4]):
        ran.clear()
        got, start = lm.forward(seqs, layers)
        assert ran == list(range(max(layers) if max(layers) < lm.num_layers else lm.num_layers)), layers
        lm.early_stop = False
        ref, start_ref = lm.forward(seqs, layers)
        lm.early_stop = True
        assert np.array_equal(start, start_ref)
        for layer in layers:
            assert torch.equal(got[layer], ref[layer]), (arch, layers, layer)


def test_bos_and_padding_conventions(tiny_dirs):
    llama = load_language_model(str(tiny_dirs["llama"]))
    gemma = load_language_model(str(tiny_dirs["gemma3_text"]))
    assert llama.bos_token_id is None and llama.padding_side == "right" and llama.first_position == 0
    assert gemma.bos_token_id == 2 and gemma.padding_side == "left" and gemma.first_position == 1
    g = gemma.hidden_states(TEXTS[:1], [1])[0]
    assert g.token_ids[0] == 2 and g.tokens[0] == "<bos>" and tuple(g.spans[0]) == (-1, -1)
    assert g.positions[0] == 0 and tuple(g.spans[1]) == (0, 3) and g.tokens[1] == "The"
    # the same text alone and in a padded batch, padded left or right: same states
    alone = [gemma.hidden_states([t], [1, 4])[0] for t in TEXTS]
    for side in ("left", "right"):
        gemma.padding_side = side
        batch = gemma.hidden_states(TEXTS, [1, 4])
        for a, b in zip(alone, batch):
            np.testing.assert_allclose(a.vectors[4], b.vectors[4], atol=1e-4)


def test_max_length_truncates(tiny_dirs):
    lm = load_language_model(str(tiny_dirs["llama"]))
    enc = lm.encode(TEXTS, max_length=4)
    assert [len(e.token_ids) for e in enc] == [4, 3, 4] and [e.truncated for e in enc] == [True, False, True]


def test_layer_selection():
    assert default_layers(30) == [1, 2, 4, 8, 16, 24, 28, 29]
    assert default_layers(32) == [1, 2, 4, 8, 16, 24, 30, 31]
    assert default_layers(4) == [1, 2, 3]
    assert default_layers(1) == [0]
    assert resolve_layers("all", 3) == [0, 1, 2, 3]
    assert resolve_layers("7, 0,3,3", 30) == [0, 3, 7]
    assert resolve_layers(None, 30) == default_layers(30)
    with pytest.raises(UnknownLayer, match="0 = input embeddings .. 30"):
        resolve_layers("31", 30)
    with pytest.raises(InputError):
        resolve_layers("a,b", 30)


def test_prefix_hashes_are_blake2b_of_int32_prefixes():
    ids = np.array([5, 70000, 3, 3], dtype=np.int64)
    h = prefix_hashes(ids)
    for p in range(len(ids)):
        raw = hashlib.blake2b(ids[: p + 1].astype("<i4").tobytes(), digest_size=8).digest()
        assert h[p] == int.from_bytes(raw, "little", signed=True)
    assert len(set(h.tolist())) == 4 and h.dtype == np.int64


def test_shards_keep_shared_prefixes_together():
    rng = np.random.default_rng(0)
    seqs = [np.r_[1, 2, 3, rng.integers(0, 1000, 5)] for _ in range(20)]
    assert len({shard_of(s, 2, 4) for s in seqs}) == 1  # same first 3 ids -> same shard
    many = [rng.integers(0, 1000, 6) for _ in range(400)]
    counts = np.bincount([shard_of(s, 2, 4) for s in many], minlength=4)
    assert counts.min() > 60  # and spread otherwise
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(InputError):
            parse_shard(bad)


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="model not found"):
        load_language_model(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="unknown dtype"):
        load_language_model(str(tmp_path), dtype="int8")
    import transformers as tf

    tf.GPT2Model(tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(InputError, match="unsupported architecture 'gpt2'.*supported model types:.*llava.*qwen2_vl"):
        load_language_model(str(tmp_path / "gpt2"))
    (tmp_path / "broken").mkdir()
    with pytest.raises(InputError, match="cannot load model"):
        load_language_model(str(tmp_path / "broken"))


def test_store_params_round_trip(tiny_dirs):
    lm = load_language_model(str(tiny_dirs["qwen2_vl"]), dtype="bfloat16", name="vlm text")
    p = lm.store_params()
    assert p == {"source": str(tiny_dirs["qwen2_vl"]), "gguf_file": None, "revision": None, "dtype": "bfloat16"}
    info = ModelInfo(id=1, name="vlm text", hidden_size=64, num_layers=4, params=p)
    again = load_from_store(info, dtype="float32")
    assert again.name == "vlm text" and again.dtype == torch.float32 and again.architecture == lm.architecture
    with pytest.raises(InputError, match="without a loadable source"):
        load_from_store(ModelInfo(id=2, name="imported", hidden_size=64, num_layers=4, params={}))


def test_build_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown tiny arch"):
        build_model("t5", 10)


def test_llava_next_text_side(tmp_path):
    """LLaVA-NeXT (anyres) ingests through its language model like LLaVA."""
    from vlm_tiny import build_llava_next

    lm = load_language_model(str(build_llava_next(tmp_path / "llava_next")))
    assert lm.architecture == "LlavaNextForConditionalGeneration"
    states = lm.hidden_states(["a small dog"], [0, 3])[0]
    assert states.vectors[3].shape == (len(states.token_ids), 64)
