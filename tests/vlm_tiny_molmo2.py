"""A tiny random Molmo2 for tests, saved with save_pretrained (see vlm_tiny.py).

Crops of 28 px, 4-px patches (7 x 7 per crop, odd like the real 27 x 27),
overlap margins of 1 + 1 patches (each crop adds a 5-patch = 20-px window),
pooled 2 x 2, at most 4 high-res crops; the ViT feeds the adapter two of its
layers, as the real one does. The special tokens sit in the text model's
additional vocabulary (past ``vocab_size``, outside the LM head), as in the
real checkpoints, and BOS = EOS = ``<|im_end|>``.

Molmo2's image processor needs torchvision: without it the checkpoint's
preprocessor_config.json is written by hand (the keys the real one has) and
the adapter falls back to its torch-only processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from vlm_tiny import SPECIALS, WORDS

MOLMO2_SPECIALS = ["<|im_start|>", "<|im_end|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>",
                   "<low_res_im_start>", "<|image|>", "<im_low>", "<frame_start>", "<frame_end>", "<|video|>"]
# as the real template: the images first, then the turns
MOLMO2_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% endif %}"
    "{% endfor %}{% endfor %}{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
CROP, PATCH, MARGINS, MAX_CROPS = 28, 4, [1, 1], 4
PREPROCESSOR = {
    "image_processor_type": "Molmo2ImageProcessor", "processor_class": "Molmo2Processor",
    "size": {"height": CROP, "width": CROP}, "patch_size": PATCH, "max_crops": MAX_CROPS,
    "overlap_margins": MARGINS, "pooling_size": [2, 2], "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "resample": 2, "do_convert_rgb": True,
}


def make_molmo2_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<|im_end|>",
                                  eos_token="<|im_end|>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": MOLMO2_SPECIALS})
    tok.chat_template = MOLMO2_TEMPLATE
    return tok, len(vocab)


def build_molmo2(out: Path, *, seed: int = 0, processor_config: dict | None = None) -> Path:
    import transformers as tf

    tok, base_vocab = make_molmo2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in MOLMO2_SPECIALS}
    cfg = tf.Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=8, image_size=[CROP, CROP], patch_size=PATCH),
        adapter_config=dict(vision_feature_layer=[-1, 0], hidden_size=32, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=8, intermediate_size=64, text_hidden_size=64),
        text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=base_vocab, additional_vocab_size=len(tok) - base_vocab,
                         num_hidden_layers=3, intermediate_size=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
        image_start_token_id=ids["<im_start>"], low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"], image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"], frame_end_token_id=ids["<frame_end>"],
    )
    torch.manual_seed(seed)
    model = tf.Molmo2ForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2), encoding="utf-8")
    if processor_config is not None:
        (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2), encoding="utf-8")
    return out


def molmo2_processor(vlm):
    """Molmo2Processor over the loaded tokenizer and image processor (needs torchvision)."""
    import transformers as tf
    from transformers.models.molmo2.video_processing_molmo2 import Molmo2VideoProcessor

    return tf.Molmo2Processor(image_processor=vlm.image_processor, video_processor=Molmo2VideoProcessor(),
                              tokenizer=vlm.tokenizer, chat_template=MOLMO2_TEMPLATE,
                              **vlm.processor_options)
