"""A tiny random InternVL for tests, saved with save_pretrained (see vlm_tiny.py).

Tiles of 32 px, 4-px patches (8 x 8 per tile), pixel-shuffled 2 x 2 -> 4 x 4 =
16 tokens per tile; up to ``max_patches`` tiles plus a thumbnail. The
tokenizer names InternVL's image tokens the way the real ones do
(``start_image_token`` etc.), so InternVLProcessor can be built on it where
torchvision is installed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from vlm_tiny import SPECIALS, WORDS

INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
TILE, PATCH, TOKENS_PER_TILE = 32, 4, 16


def make_internvl_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens=dict(IMAGE_TOKENS),
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = INTERNVL_TEMPLATE
    return tok


def build_internvl(out: Path, *, max_patches: int = 4, seed: int = 0) -> Path:
    import transformers as tf
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = make_internvl_tokenizer()
    cfg = tf.InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
    )
    torch.manual_seed(seed)
    model = tf.InternVLForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # the real checkpoints save crop_to_patches=False; InternVLProcessor (and the adapter) turn it on
    GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=False,
                             min_patches=1, max_patches=max_patches).save_pretrained(out)
    return out


def internvl_processor(vlm):
    """InternVLProcessor over the loaded tokenizer and image processor (needs torchvision)."""
    import transformers as tf
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    return tf.InternVLProcessor(image_processor=vlm.image_processor, tokenizer=vlm.tokenizer,
                                video_processor=InternVLVideoProcessor(), image_seq_length=TOKENS_PER_TILE,
                                chat_template=INTERNVL_TEMPLATE)
