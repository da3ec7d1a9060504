"""Tiny random models saved as ordinary model dirs, for tests and demos.

They load through exactly the same code as a real model
(``load_language_model(dir)``), in well under a second, offline. The
tokenizer is a word-level one built in code over a few texts, optionally
adding a BOS and padding on the left (Gemma-3's convention) or adding no
BOS and padding on the right (SmolLM2's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ARCHS = ("llama", "qwen2", "gemma3_text", "llava", "qwen2_vl", "qwen2_5_vl")

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def sample_corpus_path() -> Path:
    """The demo corpus shipped with latentlens (a spread of concepts.txt, MIT)."""
    return Path(__file__).resolve().parents[1] / "data" / "concepts_sample.txt"


def build_tokenizer(texts: Iterable[str], *, bos: bool, padding_side: str, max_vocab: int = 4000):
    """A fast word-level tokenizer over the words of ``texts`` (with char offsets)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    counts: dict[str, int] = {}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]", t):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))[: max_vocab - len(SPECIALS)]
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side=padding_side,
    )


def _text_kwargs(vocab_size: int, hidden: int, layers: int, tie: bool = True) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        tie_word_embeddings=tie,
    )


def build_model(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 4, seed: int = 0,
                tie: bool = True):
    """A randomly initialised model of ``arch`` (see ARCHS); ``tie=False`` gives it its own LM head."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    text = _text_kwargs(vocab_size, hidden, layers, tie)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**text))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**text))
    if arch == "gemma3_text":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**text, head_dim=16, sliding_window=8))
    if arch == "llava":
        vision: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14)
        return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**text),
            image_token_index=vocab_size - 1))
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        head_dim = hidden // 4
        section = [head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 8 * 3 // 2]
        section[0] = head_dim // 2 - section[1] - section[2]
        text_cfg = dict(text, rope_parameters={"rope_type": "default", "mrope_section": section,
                                               "rope_theta": 10000.0})
        if arch == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
            return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(
                text_config=text_cfg, vision_config=vision, image_token_id=vocab_size - 1,
                video_token_id=vocab_size - 2))
        vision = dict(depth=1, hidden_size=32, out_hidden_size=hidden, num_heads=2,
                      intermediate_size=64, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[0])
        return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(
            text_config=text_cfg, vision_config=vision, image_token_id=vocab_size - 1,
            video_token_id=vocab_size - 2))
    raise ValueError(f"unknown tiny arch {arch!r} (choose from {', '.join(ARCHS)})")


def make_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    bos: bool = False,
    padding_side: str = "right",
    texts: Iterable[str] | None = None,
    hidden: int = 64,
    layers: int = 4,
    seed: int = 0,
    tie: bool = True,
) -> Path:
    """Save a tiny random ``arch`` model and its tokenizer in ``path``; return it."""
    path = Path(path)
    if texts is None:
        texts = sample_corpus_path().read_text(encoding="utf-8").splitlines()
    tokenizer = build_tokenizer(texts, bos=bos, padding_side=padding_side)
    model = build_model(arch, len(tokenizer), hidden=hidden, layers=layers, seed=seed, tie=tie)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
