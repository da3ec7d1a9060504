"""The two baselines LatentLens is measured against: LogitLens and EmbeddingLens.

Both read a hidden state through the model's own vocabulary, so they need
only the model (its heads, found by its family class in latentlens.architectures), never the
store:

* **LogitLens**: the model's final norm then its LM head (tied or not,
  scaled and soft-capped as the model does), softmax over the vocabulary;
  the top-k tokens with their probability. ``hidden_states[num_layers]`` is
  already after the final norm, so at the last layer only the head is
  applied and the result is the model's own next-token distribution.
* **EmbeddingLens**: cosine between the hidden state and every row of the
  input embedding matrix; the top-k tokens with their cosine.

Everything is computed in float32 whatever the model's dtype (vocabulary
chunks are upcast one at a time, so a bf16 262k-row head is never copied
whole).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from latentlens.errors import InputError

if TYPE_CHECKING:
    import torch

METHODS = ("latentlens", "logitlens", "embeddinglens")
VOCAB_METHODS = ("logitlens", "embeddinglens")
#: what each method's score means (CSV/table column docs)
SCORES = {"latentlens": "cosine", "logitlens": "probability", "embeddinglens": "cosine"}

QUERY_CHUNK = 256
VOCAB_CHUNK = 32768


def parse_methods(spec: str | Iterable[str] | None) -> list[str]:
    """``"all"``, ``"latentlens,logitlens"`` or a list -> validated methods in canonical order."""
    if spec is None:
        return ["latentlens"]
    parts = [p.strip().lower() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    parts = [p for p in parts if p]
    if "all" in parts:
        return list(METHODS)
    bad = [p for p in parts if p not in METHODS]
    if not parts:
        raise InputError(f"no method chosen (choose from {', '.join(METHODS)} or all)")
    if bad:
        raise InputError(f"unknown method '{bad[0]}' (choose from {', '.join(METHODS)} or all)")
    return [m for m in METHODS if m in parts]


@dataclass
class VocabHit:
    """One vocabulary token a baseline ranks high for a hidden state."""

    token: str  # decoded as the tokenizer decodes it alone (leading space kept)
    token_id: int
    score: float  # probability (logitlens) or cosine (embeddinglens)

    @property
    def word(self) -> str:
        """The token as a word: surrounding whitespace (and byte-level markers) removed."""
        t = self.token.replace("Ġ", " ").replace("▁", " ").strip()
        return t or self.token

    def to_dict(self) -> dict:
        return {**asdict(self), "word": self.word}


class VocabularyLens:
    """LogitLens and EmbeddingLens over one model's heads (see latentlens.models.LensHeads)."""

    def __init__(self, heads: Any, tokenizer: Any, num_layers: int):
        if heads is None:
            raise InputError("this model was loaded without its LM head (lens_heads=False)")
        self.heads = heads
        self.tokenizer = tokenizer
        self.num_layers = int(num_layers)
        self._inv_norm: torch.Tensor | None = None  # 1 / |E_v|, float32, made on first EmbeddingLens call
        self._norm = None  # the final norm in float32, made on first LogitLens call
        self._decoded: dict[int, str] = {}

    @classmethod
    def of(cls, model: Any) -> VocabularyLens:
        """For a loaded LanguageModel or VisionLanguageModel."""
        lens = getattr(model, "_vocabulary_lens", None)
        if lens is None:
            lens = cls(model.heads, model.tokenizer, model.num_layers)
            model._vocabulary_lens = lens
        return lens

    @property
    def vocab_size(self) -> int:
        return int(self.heads.unembedding.shape[0])

    # ---- the two lenses ----------------------------------------------------

    def logit_lens(self, vectors: Any, layer: int, k: int = 5) -> list[list[VocabHit]]:
        """Top-k next-token probabilities of hidden states taken at ``layer`` (0..num_layers)."""
        import torch

        if not 0 <= int(layer) <= self.num_layers:
            raise InputError(f"layer {layer} is out of range 0..{self.num_layers}")
        h = self._queries(vectors)
        w = self.heads.unembedding
        out: list[list[VocabHit]] = []
        with torch.inference_mode():
            for lo in range(0, h.shape[0], QUERY_CHUNK):
                x = h[lo: lo + QUERY_CHUNK].to(w.device)
                if int(layer) < self.num_layers:
                    x = self._norm32()(x)
                logits = torch.cat([x @ w[c: c + VOCAB_CHUNK].float().T
                                    for c in range(0, w.shape[0], VOCAB_CHUNK)], dim=1)
                logits = logits * self.heads.logit_scale
                if self.heads.logit_softcap:
                    cap = self.heads.logit_softcap
                    logits = torch.tanh(logits / cap) * cap
                probs = torch.softmax(logits, dim=-1)
                top = torch.topk(probs, min(k, probs.shape[1]), dim=-1)
                out.extend(self._hits(top.values, top.indices))
        return out

    def embedding_lens(self, vectors: Any, k: int = 5) -> list[list[VocabHit]]:
        """Top-k input-embedding rows by cosine with each hidden state."""
        import torch

        h = self._queries(vectors)
        e = self.heads.embedding
        inv = self._inverse_norms()
        out: list[list[VocabHit]] = []
        with torch.inference_mode():
            for lo in range(0, h.shape[0], QUERY_CHUNK):
                x = h[lo: lo + QUERY_CHUNK].to(e.device)
                x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                sims = torch.cat([(x @ e[c: c + VOCAB_CHUNK].float().T) * inv[c: c + VOCAB_CHUNK]
                                  for c in range(0, e.shape[0], VOCAB_CHUNK)], dim=1)
                top = torch.topk(sims, min(k, sims.shape[1]), dim=-1)
                out.extend(self._hits(top.values, top.indices))
        return out

    def apply(self, method: str, vectors: Any, layer: int, k: int = 5) -> list[list[VocabHit]]:
        if method == "logitlens":
            return self.logit_lens(vectors, layer, k)
        if method == "embeddinglens":
            return self.embedding_lens(vectors, k)
        raise InputError(f"'{method}' is not a vocabulary lens (choose from {', '.join(VOCAB_METHODS)})")

    def methods(self, methods: Sequence[str], vectors: Any, layer: int, k: int = 5
                ) -> list[dict[str, list[VocabHit]]]:
        """Per query, {method: hits} for the vocabulary methods among ``methods``."""
        h = self._queries(vectors)  # checked and converted once for every method
        out: list[dict[str, list[VocabHit]]] = [{} for _ in range(len(h))]
        for m in methods:
            if m in VOCAB_METHODS:
                for i, hits in enumerate(self.apply(m, h, layer, k)):
                    out[i][m] = hits
        return out

    # ---- helpers -------------------------------------------------------------

    def _queries(self, vectors: Any):
        import torch

        if isinstance(vectors, torch.Tensor):
            h = vectors.detach().float().cpu()
        else:
            h = torch.from_numpy(np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)))
        if h.ndim == 1:
            h = h[None]
        d = int(self.heads.embedding.shape[1])
        if h.ndim != 2 or h.shape[1] != d:
            from latentlens.errors import DimensionMismatch

            raise DimensionMismatch(f"query vectors have shape {tuple(h.shape)}, the model's hidden size is {d}")
        if not torch.isfinite(h).all():
            raise InputError("query vectors contain NaN or infinite values")
        return h

    def _norm32(self):
        """The final norm in float32 (a LayerNorm with bf16 weights refuses float32 input)."""
        if self._norm is None:
            import copy

            self._norm = copy.deepcopy(self.heads.norm).float()
        return self._norm

    def _inverse_norms(self):
        import torch

        if self._inv_norm is None:
            e = self.heads.embedding
            with torch.inference_mode():
                norms = torch.cat([e[c: c + VOCAB_CHUNK].float().norm(dim=-1)
                                   for c in range(0, e.shape[0], VOCAB_CHUNK)])
            self._inv_norm = 1.0 / norms.clamp_min(1e-30)
        return self._inv_norm

    def _hits(self, values, indices) -> list[list[VocabHit]]:
        vals = values.float().cpu().numpy()
        ids = indices.cpu().numpy()
        missing = [int(i) for i in np.unique(ids) if int(i) not in self._decoded]
        if missing:
            for i, text in zip(missing, self.tokenizer.batch_decode([[i] for i in missing])):
                self._decoded[i] = text
        return [[VocabHit(self._decoded[int(t)], int(t), float(v)) for t, v in zip(row_i, row_v)]
                for row_i, row_v in zip(ids, vals)]


def token_text(token: str | None) -> str:
    """A vocabulary token as text: byte-level markers (Ġ space, ▁ space, Ċ newline) undone,
    surrounding whitespace stripped; the token itself when nothing is left."""
    tok = token or ""
    return tok.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n").strip() or tok


def expand_word(sentence: str, start: int | None, end: int | None) -> str | None:
    """The whole word a token's characters sit in: ``h«iker»`` -> ``hiker``.

    Word characters are letters, digits and ``_`` (``str.isalnum``, so any
    script), as the reference expands before judging; hyphens and
    apostrophes end a word (``dog's`` -> ``dog``). A span that already
    holds whitespace or no word character, or is in a script written
    without spaces (Chinese, Japanese, Thai, ...), is returned stripped, as is.
    """
    if start is None or end is None or not (0 <= start < end <= len(sentence)):
        return None
    span = sentence[start:end]
    core = span.strip()
    if not core:
        return None
    if any(c.isspace() for c in core) or not any(_word_char(c) for c in core) or _unspaced_script(core):
        return core
    lo = start + (len(span) - len(span.lstrip()))
    hi = end - (len(span) - len(span.rstrip()))
    if _word_char(sentence[lo]):
        while lo > 0 and _word_char(sentence[lo - 1]):
            lo -= 1
    if _word_char(sentence[hi - 1]):
        while hi < len(sentence) and _word_char(sentence[hi]):
            hi += 1
    return sentence[lo:hi]


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


_UNSPACED = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")


def _unspaced_script(text: str) -> bool:
    """Scripts written without spaces between words: a token is not widened to a whole clause."""
    import unicodedata

    return any(unicodedata.name(c, "").startswith(_UNSPACED) for c in text if c.isalnum())
