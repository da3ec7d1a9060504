"""A loaded language model: tokenize, run the decoder stack, return hidden states.

Which tokens are fed (the one rule every part of latentlens shares):

* the tokenizer's normal encoding of the text (``add_special_tokens=True``),
  so a BOS token is fed if and only if the tokenizer adds one;
* ``position`` is the index of a token in the sequence as fed: the BOS, if
  any, is position 0. It is counted from the first real token, never from
  the start of a padded row, and the model gets matching ``position_ids``,
  so left and right padding give the same hidden states;
* ``hidden_states[l]`` is the output of block ``l`` (1-based), 0 is the input
  embeddings, as transformers' ``output_hidden_states`` defines them (the
  last one, ``l = num_layers``, is after the final norm).

Hidden states come from the decoder stack itself (never through the LM head,
which for a 262k vocabulary costs more than the blocks).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from latentlens.errors import InputError
from latentlens.store.types import check_layer_range


@dataclass
class Encoding:
    """One text as fed: token ids, character spans (-1 where none), truncation flag."""

    token_ids: np.ndarray  # int64 [T]
    spans: np.ndarray  # int32 [T, 2]
    truncated: bool = False


class _StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a block hook once the deepest requested hidden state is captured."""


@dataclass
class TextStates:
    """Hidden states of one text, one row per token as fed."""

    text: str
    token_ids: np.ndarray  # int64 [T]
    spans: np.ndarray  # int32 [T, 2], -1 where the token has no characters (BOS)
    tokens: list[str]
    positions: np.ndarray  # int64 [T], 0 = first token fed (the BOS if any)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> float32 [T, D]


def encode_texts(tokenizer: Any, texts: Sequence[str], limit: int | None = None) -> list[Encoding]:
    """Tokenize as fed (see the module docstring), without padding, cut at ``limit`` tokens.

    The one tokenization of latentlens: ingest stores what it returns, and an
    import with the model's tokenizer places imported tokens with it.
    """
    kw: dict[str, Any] = {"add_special_tokens": True, "return_special_tokens_mask": True}
    fast = bool(getattr(tokenizer, "is_fast", False))
    if fast:
        kw["return_offsets_mapping"] = True
    enc = tokenizer(list(texts), **kw)
    out = []
    for i in range(len(texts)):
        ids = np.asarray(enc["input_ids"][i], dtype=np.int64)
        if fast:
            spans = np.asarray(enc["offset_mapping"][i], dtype=np.int32).reshape(-1, 2)
        else:
            spans = np.full((len(ids), 2), -1, dtype=np.int32)
        special = np.asarray(enc["special_tokens_mask"][i], dtype=bool)
        spans[special] = -1
        truncated = limit is not None and len(ids) > limit
        if truncated:
            ids, spans = ids[:limit], spans[:limit]
        out.append(Encoding(ids, spans, truncated))
    return out


def vocabulary(tokenizer: Any) -> list[str]:
    """Decoded text of every token id of a tokenizer (index = id)."""
    return list(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


def detect_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer's normal encoding starts with it (then it is fed), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


@dataclass
class TextSide:
    """A checkpoint's tokenizer without its weights: what an import needs to place tokens
    (encode exactly as ingest does) and to register the model as ingest would."""

    tokenizer: Any
    max_positions: int | None
    architecture: str | None  # as load_language_model records it (None: unknown)

    @property
    def bos_token_id(self) -> int | None:
        return detect_bos(self.tokenizer)

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> list[Encoding]:
        return encode_texts(self.tokenizer, texts, max_length or self.max_positions)

    def vocabulary(self) -> list[str]:
        return vocabulary(self.tokenizer)


class LanguageModel:
    """The decoder stack of a causal LM (or of a VLM's language model) and its tokenizer."""

    def __init__(
        self,
        *,
        name: str,
        model: torch.nn.Module,
        tokenizer: Any,
        config: Any,
        architecture: str,
        params: dict,
        device: torch.device,
        dtype: torch.dtype,
        adapter: Any = None,
        heads: Any = None,
    ):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.architecture = architecture
        self.device = device
        self.dtype = dtype
        #: the family class (latentlens.architectures) it was loaded with; for a VLM, the class load_vlm uses
        self.adapter = adapter
        #: LensHeads (final norm, LM head, input embedding) for the vocabulary lenses; None if not loaded
        self.heads = heads
        self._params = dict(params)
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.padding_side = getattr(tokenizer, "padding_side", "right") or "right"
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        self.bos_token_id = self._detect_bos()
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        #: stop the forward after the deepest requested layer (see _forward_to); False: run every block
        self.early_stop = True
        self._capture = threading.local()
        self._hooked = False
        self._hook_lock = threading.Lock()

    def mix_bf16(self) -> None:
        """Run the matmuls of every block but the first in bfloat16 (torch.autocast), keeping
        the residual stream and the first block in float32 (loading.BF16_MIXED).

        The weights of those blocks' ``nn.Linear`` layers are cast to bfloat16 once, here:
        autocast would cast every one of them again on every forward call (~100M values a
        batch for SmolLM2-135M, ~10% of the run), and a cast weight is the same bfloat16
        value either way, so the hidden states are bitwise the same (tested). Everything else
        (norms, embeddings, non-Linear parameters) keeps its float32 weights."""
        blocks = getattr(self.model, "layers", None)
        if blocks is None:
            raise InputError(f"{self.name}: no decoder blocks found for bf16-mixed")
        for block in list(blocks)[1:]:
            for mod in block.modules():
                if type(mod) is torch.nn.Linear:  # exactly: a subclass may compute differently
                    mod.to(torch.bfloat16)
            block.forward = torch.autocast(self.device.type, dtype=torch.bfloat16)(block.forward)

    def _detect_bos(self) -> int | None:
        return detect_bos(self.tokenizer)

    # ---- tokens ----------------------------------------------------------

    @property
    def first_position(self) -> int:
        """The first position that can be stored: 1 if a BOS is fed (never stored), else 0."""
        return 1 if self.bos_token_id is not None else 0

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> list[Encoding]:
        """Tokenize as fed (see the module docstring), without padding."""
        return encode_texts(self.tokenizer, texts, max_length or self.max_positions)

    def vocabulary(self) -> list[str]:
        """Decoded text of every token id (index = id)."""
        return vocabulary(self.tokenizer)

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        return self.tokenizer.batch_decode([[int(i)] for i in ids])

    # ---- forward ---------------------------------------------------------

    def check_layers(self, layers: Sequence[int]) -> list[int]:
        return check_layer_range(layers, self.num_layers, self.name)

    @torch.inference_mode()
    def forward(self, seqs: Sequence[np.ndarray], layers: Sequence[int]) -> tuple[dict[int, torch.Tensor], np.ndarray]:
        """Run one padded batch; return (layer -> [B, T, D] hidden states, row start of each sequence).

        Token ``p`` of sequence ``b`` is at column ``start[b] + p``.
        """
        b = len(seqs)
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        t = int(lengths.max())
        ids = np.full((b, t), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((b, t), dtype=np.int64)
        start = (t - lengths) if self.padding_side == "left" else np.zeros(b, dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, start[i]: start[i] + len(s)] = s
            mask[i, start[i]: start[i] + len(s)] = 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        inputs = {
            "input_ids": torch.from_numpy(ids).to(self.device),
            "attention_mask": torch.from_numpy(mask).to(self.device),
            "position_ids": torch.from_numpy(pos).to(self.device),
            "use_cache": False,
        }
        blocks = getattr(self.model, "layers", None)
        if self.early_stop and blocks is not None and len(blocks) == self.num_layers and max(layers) < self.num_layers:
            return self._forward_to(blocks, inputs, layers), start
        hs = self.model(**inputs, output_hidden_states=True).hidden_states
        return {layer: hs[layer] for layer in layers}, start

    def _forward_to(self, blocks: Any, inputs: dict, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Hidden states ``layers`` (all below num_layers), running blocks 1..max(layers) only.

        Why: the blocks after the deepest requested layer change nothing stored (ingest's
        default grid ends at n-1, so the last block of every model was run for nothing:
        1/30 of SmolLM2's forward). Hidden state ``l`` is what transformers records for
        it: the input of block 0 for ``l = 0``, else the output of block ``l - 1``; hooks on
        the blocks take them, per thread (two forward streams share the modules), and
        stop the forward at the deepest one. Bitwise the states of a full forward (tested)."""
        with self._hook_lock:  # two forward streams may start at once: hook the blocks once
            if not self._hooked:
                self._hook(blocks)
        got: dict[int, torch.Tensor] = {}
        self._capture.want = (set(layers), got, max(layers))
        try:
            self.model(**inputs, output_hidden_states=False)
            # a hook stops it: reaching here means the blocks were not run as hooked
            raise InputError(f"{self.name}: the forward ended before hidden state {max(layers)}")
        except _StopForward:
            pass
        finally:
            self._capture.want = None
        return {layer: got[layer] for layer in layers}

    def _hook(self, blocks: Any) -> None:
        """The hooks _forward_to reads through (inactive while this thread wants nothing)."""

        def pre(mod: Any, args: tuple, kwargs: dict) -> None:
            want = getattr(self._capture, "want", None)
            if want is not None and 0 in want[0]:
                want[1][0] = args[0] if args else kwargs["hidden_states"]
                if want[2] == 0:
                    raise _StopForward

        def post(i: int) -> Any:
            def hook(mod: Any, args: tuple, out: Any) -> None:
                want = getattr(self._capture, "want", None)
                if want is None:
                    return
                if i + 1 in want[0]:
                    want[1][i + 1] = out[0] if isinstance(out, tuple) else out
                if i + 1 == want[2]:
                    raise _StopForward
            return hook

        blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
        for i, block in enumerate(blocks):
            block.register_forward_hook(post(i))
        self._hooked = True

    def hidden_states(
        self, texts: list[str], layers: Sequence[int], max_length: int | None = None,
        batch_size: int = 32,
    ) -> list[TextStates]:
        """Hidden states (float32, not normalised) of every token of each text at these layers."""
        layers = self.check_layers(layers)
        encs = self.encode(texts, max_length)
        result: list[TextStates] = []
        for lo in range(0, len(texts), batch_size):
            chunk = encs[lo: lo + batch_size]
            states, start = self.forward([e.token_ids for e in chunk], layers)
            for j, e in enumerate(chunk):
                cols = slice(int(start[j]), int(start[j]) + len(e.token_ids))
                result.append(TextStates(
                    text=texts[lo + j],
                    token_ids=e.token_ids,
                    spans=e.spans,
                    tokens=self.decode_tokens(e.token_ids),
                    positions=np.arange(len(e.token_ids), dtype=np.int64),
                    vectors={layer: states[layer][j, cols].float().cpu().numpy() for layer in layers},
                ))
        return result

    # ---- bookkeeping -----------------------------------------------------

    def store_params(self) -> dict:
        """What the store records so ``load_from_store`` can load this model again."""
        return dict(self._params)

    def store_registration(self) -> dict:
        """Keyword arguments for Store.register_model."""
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "revision": self._params.get("revision"),
            "architecture": self.architecture,
            "dtype": self._params.get("dtype"),
            "tokenizer_class": type(self.tokenizer).__name__,
            "bos_token_id": self.bos_token_id,
            "params": self.store_params(),
        }

    def __repr__(self) -> str:
        return (f"LanguageModel({self.name!r}, {self.architecture}, layers={self.num_layers}, "
                f"hidden={self.hidden_size}, bos={self.bos_token_id})")
