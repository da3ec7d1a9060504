"""Tiny random Idefics3 and SmolVLM models, saved with save_pretrained (see vlm_tiny.py).

Idefics3: a 32-px crop, 8-px patches (4 x 4), pixel shuffle by 2 -> 2 x 2 tokens
of 16 px per crop; images are resized to a 64-px longest edge, so they split
into at most 2 x 2 crops (+ the global view). Saved with an Idefics3Processor
(its chat template).

SmolVLM: a 34-px crop, 4-px patches (8 x 8 cover 32 px: the last 2 px of a crop
are seen by no patch, as SmolVLM2's 384-px crops with 14-px patches leave 6),
pixel shuffle by 4 -> 2 x 2 tokens of 16 px; 68-px longest edge. Its processor
needs torchvision (the video processor), so the chat template is the tokenizer's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from vlm_tiny import make_tokenizer

IDEFICS3_SPECIALS = (
    ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
)
TEMPLATE = (
    "<s>{% for m in messages %}{{ m['role'].capitalize() }}"
    "{% if m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_idefics3(out: Path, *, smol: bool = False, splitting: bool = True, seed: int = 0) -> Path:
    import transformers as tf
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tok = make_tokenizer(IDEFICS3_SPECIALS, None if not smol else TEMPLATE)
    crop, patch, scale = (34, 4, 4) if smol else (32, 8, 2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=crop, patch_size=patch)
    text = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
                          pad_token_id=3)
    Config, Vision, Model, Proc = (
        (tf.SmolVLMConfig, tf.SmolVLMVisionConfig, tf.SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil)
        if smol else
        (tf.Idefics3Config, tf.Idefics3VisionConfig, tf.Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil)
    )
    cfg = Config(text_config=text, vision_config=Vision(**vision), scale_factor=scale,
                 image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    ip = Proc(size={"longest_edge": 2 * crop}, max_image_size={"longest_edge": crop},
              do_image_splitting=splitting)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ip.save_pretrained(out)
    if not smol:
        n = (crop // patch) ** 2 // scale**2
        tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=n,
                             chat_template=TEMPLATE).save_pretrained(out)
    return out
