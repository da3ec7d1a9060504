"""Tiny random PaliGemma models (Gemma or Gemma 2 text), saved with save_pretrained (see vlm_tiny.py).

SigLIP on a 32-px canvas with 8-px patches: 4 x 4 = 16 visual tokens. No
processor is saved (PaliGemmaProcessor adds 1,152 <locNNNN>/<segNNN> tokens to
the tokenizer); the tests build one to compare the encoding with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from vlm_tiny import make_tokenizer


def build_paligemma(out: Path, *, v2: bool = False, seed: int = 0) -> Path:
    import transformers as tf
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = make_tokenizer(["<image>"], None)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if v2:  # Gemma 2: sliding window on every other layer, soft-capped logits
        text.update(model_type="gemma2", sliding_window=8, final_logit_softcapping=5.0,
                    attn_logit_softcapping=50.0, query_pre_attn_scalar=16)
    else:
        text.update(model_type="gemma")
    cfg = tf.PaliGemmaConfig(
        text_config=text,
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=64, hidden_size=64, vocab_size=len(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = tf.PaliGemmaForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_seq_length=16).save_pretrained(out)
    return out
