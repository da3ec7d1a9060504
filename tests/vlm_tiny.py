"""Tiny random vision-language models for tests, saved with save_pretrained.

Each builder writes model + tokenizer + image processor (+ processor where it
builds without torchvision) into a directory, so ``load_vlm(dir)`` exercises
the real from_pretrained path. Tokenizers are WordLevel over a small
vocabulary, made in code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_PROSE = (
    "a the dog cat red blue green sky grass tree car house runs sits under over in on is "
    "and of with describe this image detail sun water boat bird flower road small big"
)
WORDS = _PROSE.split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]

CORPUS = [
    "a red car sits on the road",
    "the blue sky is over the green grass",
    "a small dog runs on the grass",
    "the cat sits under a big tree",
    "a boat is on the blue water",
    "a bird sits in the tree",
    "the sun is over the house",
    "a red flower in the green grass",
    "the big house with a red car",
    "a small bird and a big dog",
]

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
GEMMA3_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
)
GEMMA3_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                   "<image_soft_token>"]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
                 "<|vision_end|>", "<|video_pad|>"]


def make_tokenizer(specials: list[str], chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.add_special_tokens({"additional_special_tokens": specials})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def build_llava(out: Path, *, image_size: int = 32, patch_size: int = 8, seed: int = 0,
                with_processor: bool = True, text_layers: int = 3) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = make_tokenizer(["<image>"], None if with_processor else LLAVA_TEMPLATE)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=patch_size,
        ),
        text_config=LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
            pad_token_id=3,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": image_size},
                            crop_size={"height": image_size, "width": image_size})
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ip.save_pretrained(out)
    if with_processor:
        proc = LlavaProcessor(
            image_processor=ip, tokenizer=tok, patch_size=patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE,
        )
        proc.save_pretrained(out)
    return out


def build_llava_next(out: Path, *, seed: int = 0) -> Path:
    """CLIP 32 px / 8 px patches (4x4 per tile), tiles on a 32 or 64 px anyres canvas."""
    import transformers as tf
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    pinpoints = [[32, 64], [64, 32], [64, 64]]
    tok = make_tokenizer(["<image>"], LLAVA_TEMPLATE)
    cfg = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
        text_config=tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
            pad_token_id=3,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = tf.LlavaNextForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                               image_grid_pinpoints=pinpoints).save_pretrained(out)
    return out


def build_qwen(out: Path, *, v25: bool = False, seed: int = 0) -> Path:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if v25:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                      num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=56, fullatt_block_indexes=[1], in_channels=3)
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    tok = make_tokenizer(QWEN_SPECIALS, QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    cfg = Config(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
        ),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(out)
    return out


def build_gemma3(out: Path, *, seed: int = 0) -> Path:
    """SigLIP 32 px / 8 px patches (4x4), pooled to mm_tokens_per_image = 4 (2x2 tokens)."""
    import transformers as tf
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = make_tokenizer(GEMMA3_SPECIALS, GEMMA3_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS}
    cfg = tf.Gemma3Config(
        text_config=tf.Gemma3TextConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
            bos_token_id=1, eos_token_id=2, pad_token_id=3,
        ),
        vision_config=tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
    )
    torch.manual_seed(seed)
    model = tf.Gemma3ForConditionalGeneration(cfg).eval()
    # the projector's weight initialises to zeros: every visual token would be the
    # zero vector at layer 0 (a real checkpoint's is trained); give it random values
    with torch.no_grad():
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    Gemma3ImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def ingest_text(store, vlm, corpus: list[str] = CORPUS, name: str | None = None) -> None:
    """A contextual index through the VLM's language model, written with the Store.

    Every token of every sentence at every layer (no dedup, no quota): the
    tests need a small, exact reference, not the ingest pipeline.
    """
    import hashlib

    import numpy as np

    from latentlens.store import EmbeddingBatch

    name = name or vlm.name
    tok = vlm.tokenizer
    lm = vlm.language_model
    n_layers = vlm.num_layers
    info = store.register_model(name, hidden_size=vlm.hidden_size, num_layers=n_layers,
                                architecture=type(vlm.model).__name__)
    info = store.ensure_layers(info, list(range(n_layers + 1)))
    vocab = [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    store.set_vocabulary(info, vocab)
    digest = hashlib.sha256("\n".join(corpus).encode()).hexdigest()
    corpus_info = store.register_corpus(f"tiny-{digest[:8]}", content_hash=digest)
    sids = store.add_sentences(corpus_info, corpus)
    rows: dict[str, list] = {k: [] for k in ("sid", "pos", "tok", "cs", "ce")}
    vecs: dict[int, list] = {layer: [] for layer in range(n_layers + 1)}
    for sid, text in zip(sids, corpus):
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            out = lm(input_ids=ids, output_hidden_states=True)
        for p, (tid, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            rows["sid"].append(int(sid))
            rows["pos"].append(p)
            rows["tok"].append(int(tid))
            rows["cs"].append(a)
            rows["ce"].append(b)
            for layer in range(n_layers + 1):
                vecs[layer].append(out.hidden_states[layer][0, p].float().numpy())
    n = len(rows["sid"])
    batch = EmbeddingBatch(
        sentence_id=np.array(rows["sid"], dtype=np.int64),
        position=np.array(rows["pos"], dtype=np.int32),
        token_id=np.array(rows["tok"], dtype=np.int32),
        char_start=np.array(rows["cs"], dtype=np.int32),
        char_end=np.array(rows["ce"], dtype=np.int32),
        prefix_hash=np.arange(n, dtype=np.int64),
        vectors={layer: np.stack(v) for layer, v in vecs.items()},
    )
    store.write_embeddings(store.get_model(name), batch)


def sample_image(size: tuple[int, int] = (96, 64)):
    """A deterministic colourful image: quadrants plus a gradient."""
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = (x * 255 // max(w - 1, 1)).astype(np.uint8)
    arr[..., 1] = (y * 255 // max(h - 1, 1)).astype(np.uint8)
    arr[..., 2] = np.where((x < w // 2) ^ (y < h // 2), 200, 30)
    return Image.fromarray(arr)
