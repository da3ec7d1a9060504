"""Where an imported token sits in its caption (its character span), and its prefix hash.

The reference layout stores no offsets, only (caption, position, token). With
the model's tokenizer each caption is re-tokenized exactly as ingest does
(:func:`latentlens.models.base.encode_texts`), and a row whose stored token id
is the one at its position takes that position's span and ingest's prefix hash:
the imported row then equals the ingested one, and a later ingest onto the
model deduplicates prefixes against it. Without a tokenizer a token is placed
by its text where that is unambiguous: tokens at lower positions of the same
caption end before it and tokens at higher positions start after it, so each
placed token narrows where its neighbours can be; the rest stay unplaced.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np


def text_prefix_hash(caption: str, position: int) -> int:
    """Deterministic int64 for (caption, position) when the token ids are unknown:
    equal prefixes of equal captions agree."""
    d = hashlib.blake2b(f"{position}\0{caption}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little", signed=True)


prefix_hash = text_prefix_hash  # its name before the tokenizer placement


def _hits(caption: str, token: str, lo: int = 0, hi: int | None = None) -> list[int]:
    t = token.strip()
    if not t:
        return []
    hi = len(caption) if hi is None else hi
    pattern = (r"(?<!\w)" if token[:1].isspace() else "") + re.escape(t)
    return [m.start() for m in re.compile(pattern).finditer(caption, lo, hi)
            if m.start() >= lo and m.end() <= hi]


def find_span(caption: str, token: str) -> tuple[int, int]:
    """Character span of ``token`` in ``caption`` where it occurs once, else (-1, -1)
    (as a whole word if it starts with a space, else anywhere)."""
    hits = _hits(caption, token)
    if len(hits) == 1:
        return hits[0], hits[0] + len(token.strip())
    return -1, -1


def place_by_text(caption: str, rows: Sequence[tuple[int, str]]) -> list[tuple[int, int]]:
    """Spans of one caption's (position, token) rows from their texts alone; (-1, -1) where
    ambiguous. A token is placed when it occurs once between the end of the nearest placed
    token before it and the start of the nearest placed token after it; repeated until
    nothing more can be placed, so ``r`` in 'admirer' is found once 'admi' is."""
    order = sorted(range(len(rows)), key=lambda i: rows[i][0])
    spans = [(-1, -1)] * len(rows)
    changed = True
    while changed:
        changed = False
        lo_end = 0
        for j, i in enumerate(order):
            if spans[i][0] >= 0:
                lo_end = spans[i][1]
                continue
            hi = next((spans[k][0] for k in order[j + 1:] if spans[k][0] >= 0), len(caption))
            hits = _hits(caption, rows[i][1], lo_end, hi)
            if len(hits) == 1:
                spans[i] = (hits[0], hits[0] + len(rows[i][1].strip()))
                lo_end = spans[i][1]
                changed = True
    return spans


class Placer:
    """Spans and prefix hashes of imported rows, with the model's tokenizer if there is one
    (``text``: a :class:`latentlens.models.base.TextSide`), else by the tokens' texts.

    Captions are re-tokenized once each (memoised across layers); ``counts`` says how
    rows were placed: ``tokenizer``, ``text`` (no tokenizer, or the stored token id is not
    the one at its position), ``unplaced``.
    """

    def __init__(self, text: Any = None, batch: int = 1024):
        self.text = text
        self.batch = batch
        self._enc: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # caption -> ids, spans, hashes
        self._groups: dict[str, list[tuple[int, str]]] = {}
        self._by_text: dict[str, dict[tuple[int, str], tuple[int, int]]] = {}
        self.counts = {"tokenizer": 0, "text": 0, "unplaced": 0, "token_mismatch": 0}

    def prepare(self, captions: Sequence[str], positions: np.ndarray, tokens: Sequence[str]) -> None:
        """Group one layer's rows by caption for the text placement (all rows of a caption
        narrow each other, not only those of one chunk); placed lazily, where needed."""
        groups: dict[str, list[tuple[int, str]]] = {}
        for c, p, t in zip(captions, positions.tolist(), tokens, strict=True):
            groups.setdefault(c, []).append((p, t))
        self._groups = groups
        self._by_text = {}

    def _text_span(self, caption: str, position: int, token: str) -> tuple[int, int]:
        placed = self._by_text.get(caption)
        if placed is None:
            rows = list(dict.fromkeys(self._groups.get(caption, [])))
            placed = self._by_text[caption] = dict(zip(rows, place_by_text(caption, rows), strict=True))
        span = placed.get((position, token))
        return span if span is not None else find_span(caption, token)

    def _encode(self, captions: Sequence[str]) -> None:
        todo = [c for c in dict.fromkeys(captions) if c not in self._enc]
        if self.text is None or not todo:
            return
        from latentlens.ingest import prefix_hashes

        for lo in range(0, len(todo), self.batch):
            part = todo[lo: lo + self.batch]
            for c, e in zip(part, self.text.encode(part), strict=True):
                self._enc[c] = (e.token_ids, e.spans, prefix_hashes(e.token_ids))

    def place(self, captions: Sequence[str], positions: np.ndarray, token_ids: np.ndarray,
              tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(char_start, char_end, prefix_hash) of each row (-1 spans where unplaced)."""
        n = len(captions)
        cs, ce = np.full(n, -1, dtype=np.int32), np.full(n, -1, dtype=np.int32)
        ph = np.empty(n, dtype=np.int64)
        by_tok = np.zeros(n, dtype=bool)
        self._encode(captions)
        if self.text is not None and n:
            # the chunk's captions' encodings end to end: each row is one gather, no Python loop
            uniq = list(dict.fromkeys(captions))
            lengths = np.array([len(self._enc[c][0]) for c in uniq], dtype=np.int64)
            start = dict(zip(uniq, (np.cumsum(lengths) - lengths).tolist(), strict=True))
            ids = np.concatenate([self._enc[c][0] for c in uniq])
            spans = np.concatenate([self._enc[c][1] for c in uniq]).reshape(-1, 2)
            hashes = np.concatenate([self._enc[c][2] for c in uniq])
            pos = np.asarray(positions, dtype=np.int64)
            row_len = np.array([len(self._enc[c][0]) for c in captions], dtype=np.int64)
            at = np.array([start[c] for c in captions], dtype=np.int64) + pos
            inside = (pos >= 0) & (pos < row_len)
            at = np.where(inside, at, 0)
            by_tok = inside & (ids[at] == np.asarray(token_ids, dtype=np.int64))
            cs[by_tok], ce[by_tok] = spans[at[by_tok], 0], spans[at[by_tok], 1]
            ph[by_tok] = hashes[at[by_tok]]
            self.counts["tokenizer"] += int(by_tok.sum())
            self.counts["token_mismatch"] += int((~by_tok).sum())
        for j in np.flatnonzero(~by_tok).tolist():
            c, p, tok = captions[j], int(positions[j]), tokens[j]
            ph[j] = text_prefix_hash(c, p)
            cs[j], ce[j] = span = self._text_span(c, p, tok)
            self.counts["text" if span[0] >= 0 else "unplaced"] += 1
        return cs, ce, ph
