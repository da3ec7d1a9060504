"""Lens._assemble (merge, distinct contexts, per layer, sentences) over whole arrays, checked
against the per-neighbour merge it replaced, and Store.context_columns against Store.contexts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from _query_data import fill

from latentlens.query import Lens, Neighbour
from latentlens.search import LayerSearch, merge_layers
from latentlens.store import KnnResult
from latentlens.store.search import ContextColumns
from latentlens.store.types import Context


class _Contexts:
    """A store that answers context_columns from a dict of Contexts (keys left out: not stored)."""

    def __init__(self, ctx: dict[tuple[int, int, int], Context]):
        self.ctx = ctx
        self.calls = 0

    def answer_columns(self, info, layer, sentence_id, position, token_id, layers, search, spans=None):
        """context_columns, and a stand-in provenance that shows what it was asked for."""
        assert len(token_id) == len(layer)
        return self.context_columns(info, layer, sentence_id, position), {"layers": layers, "search": search}

    def context_columns(self, info, layer, sentence_id, position) -> ContextColumns:
        self.calls += 1
        keys = list(zip(layer.tolist(), sentence_id.tolist(), position.tolist(), strict=True))
        assert len(set(keys)) == len(keys), "each key asked once"
        got = [self.ctx.get(key) for key in keys]
        return ContextColumns(
            found=np.array([c is not None for c in got], dtype=bool),
            token_id=np.array([c.token_id if c else -1 for c in got], dtype=np.int64),
            char_start=[c.char_start if c else None for c in got],
            char_end=[c.char_end if c else None for c in got],
            token=[c.token if c else None for c in got],
            sentence=[c.sentence if c else "" for c in got],
        )


def _reference(by_layer, k, per_layer, nq, ctx):
    """The per-neighbour assembly _assemble had (merge_layers, a dict per query), as lists."""
    picks = merge_layers(by_layer, k)
    pool = merge_layers(by_layer, k, keep=k * len(by_layer))

    def nb(layer, qi, r, found_in=None):
        res = by_layer[layer]
        sid, pos = int(res.sentence_id[qi, r]), int(res.position[qi, r])
        c = ctx.get((layer, sid, pos))
        return Neighbour(token=c.token if c else None, token_id=int(res.token_id[qi, r]),
                         similarity=float(res.similarity[qi, r]), layer=layer, sentence_id=sid,
                         sentence=c.sentence if c else "", position=pos,
                         char_start=c.char_start if c else None, char_end=c.char_end if c else None,
                         found_in=found_in)

    out = []
    for qi in range(nq):
        first: dict = {}
        for layer, r in pool[qi]:
            key = (int(by_layer[layer].sentence_id[qi, r]), int(by_layer[layer].position[qi, r]))
            if key in first:
                first[key][2].append(layer)
            else:
                first[key] = (layer, r, [layer])
        contexts = [nb(layer, qi, r, sorted(seen)) for layer, r, seen in list(first.values())[:k]]
        pl = None
        if per_layer:
            pl = {layer: [nb(layer, qi, r) for r in range(k) if np.isfinite(res.similarity[qi, r])]
                  for layer, res in sorted(by_layer.items())}
        out.append(([nb(layer, qi, r) for layer, r in picks[qi]], contexts, pl))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_layer", [False, True])
def test_assemble_equals_the_per_neighbour_merge(seed, per_layer):
    """Ties across layers (cosines on a coarse grid), one context in several layers, layers with
    fewer than k rows (-inf padding), a query with no answer, keys the store no longer has,
    spans unknown."""
    rng = np.random.default_rng(seed)
    layers, k, nq = [2, 5, 9, 11], 6, 37
    combos = [(s, p) for s in range(4) for p in range(5)]  # 20 contexts: many repeats across layers
    by_layer, ctx = {}, {}
    for li, layer in enumerate(layers):
        res = KnnResult.empty(layer, nq, k)
        rows = k if li != 1 else 3  # layer 5 holds 3 rows
        for qi in range(nq):
            pick = rng.choice(len(combos), size=rows, replace=False)
            sims = np.sort(np.round(rng.uniform(-0.2, 1.0, size=rows), 1))[::-1]
            res.similarity[qi, :rows] = sims
            res.sentence_id[qi, :rows] = [combos[c][0] + 100 for c in pick]
            res.position[qi, :rows] = [combos[c][1] for c in pick]
            res.token_id[qi, :rows] = [7 * combos[c][1] + 3 for c in pick]
        by_layer[layer] = res
        for s, p in combos:
            if rng.random() < 0.9:  # the rest: not in the store any more
                span = (None, None) if p == 0 else (2 * p, 2 * p + 1)
                ctx[(layer, s + 100, p)] = Context(s + 100, p, 7 * p + 3, f"t{p}", f"sentence {s}", *span)
    for res in by_layer.values():  # a query with no answer in any layer
        res.similarity[0], res.sentence_id[0], res.position[0], res.token_id[0] = -np.inf, -1, -1, -1
    store = _Contexts(ctx)
    lens = Lens.__new__(Lens)
    lens.store = store
    found = {layer: LayerSearch(res, [f"path{layer}-{q % 2}" for q in range(nq)], "test")
             for layer, res in by_layer.items()}
    got = lens._assemble(SimpleNamespace(id=1), found, k, per_layer, nq)
    want = _reference(by_layer, k, per_layer, nq, ctx)
    assert store.calls == 1
    assert [r.index for r in got] == list(range(nq))
    for r, (ns, contexts, pl) in zip(got, want, strict=True):
        assert r.neighbours == ns
        assert r.contexts == contexts
        assert r.per_layer == pl
        assert r.search == {layer: f"path{layer}-{r.index % 2}" for layer in layers}
        assert r.provenance == {"layers": layers, "search": {x: ls.paths for x, ls in found.items()}}
        assert [type(n.similarity) for n in r.neighbours] == [float] * len(r.neighbours)
        assert all(type(n.sentence_id) is int and type(n.token_id) is int for n in r.neighbours)
    assert got[0].neighbours == [] and got[0].contexts == []
    assert any(len(n.found_in) > 1 for r in got for n in r.contexts)
    assert any(n.token is None for r in got for n in r.neighbours)


@pytest.fixture(scope="module")
def data(db_url):
    from latentlens.store import Store

    with Store.open(db_url) as s:
        return fill(s, "qa", n_sentences=30)


def test_context_columns_answer_as_contexts(db_url, data):
    """Each key's stored token, sentence and span, as Store.contexts gives them, in the order
    asked; a key not stored answers found=False (contexts leaves it out)."""
    from latentlens.store import Store

    with Store.open(db_url) as s:
        info = s.get_model("qa")
        keys = [(layer, int(sid), int(pos)) for layer in (0, 8)
                for sid, pos in zip(data["sentence_id"][::3], data["position"][::3], strict=True)]
        keys.insert(3, (4, int(data["sentence_id"][0]), 999))  # no such position
        arr = np.array(keys, dtype=np.int64)
        cc = s.context_columns(info, arr[:, 0], arr[:, 1], arr[:, 2])
        want = s.contexts(info, keys)
        assert len(want) == len(keys) - 1
        for j, key in enumerate(keys):
            c = want.get(key)
            assert bool(cc.found[j]) == (c is not None)
            if c is None:
                assert (cc.token[j], cc.sentence[j], cc.char_start[j], cc.char_end[j]) == (None, "", None, None)
                continue
            assert (int(cc.token_id[j]), cc.token[j], cc.sentence[j], cc.char_start[j], cc.char_end[j]) == (
                c.token_id, c.token, c.sentence, c.char_start, c.char_end)
        empty = s.context_columns(info, arr[:0, 0], arr[:0, 1], arr[:0, 2])
        assert len(empty.found) == 0 and empty.sentence == []


def test_context_columns_with_expected_token_ids(db_url, data):
    """The token ids a caller expects (a scan's leaf keys) only let the token texts' query go
    with the others: ids that are wrong (a leaf older than the rows) or missing still get the
    stored rows' tokens, as without them."""
    from latentlens.store import Store

    with Store.open(db_url) as s:
        info = s.get_model("qa")
        keys = [(layer, int(sid), int(pos)) for layer in (0, 8)
                for sid, pos in zip(data["sentence_id"][::4], data["position"][::4], strict=True)]
        arr = np.array(keys, dtype=np.int64)
        plain = s.context_columns(info, arr[:, 0], arr[:, 1], arr[:, 2])
        assert plain.found.all() and all(t is not None for t in plain.token)
        wrong = plain.token_id.copy()
        wrong[::2] = 10**6 + np.arange(len(wrong[::2]))  # no such tokens
        for hint in (plain.token_id, wrong, plain.token_id[:1], np.zeros(0, dtype=np.int64)):
            cc = s.context_columns(info, arr[:, 0], arr[:, 1], arr[:, 2], hint)
            assert cc.found.tolist() == plain.found.tolist()
            assert cc.token_id.tolist() == plain.token_id.tolist() and cc.token == plain.token
            assert cc.sentence == plain.sentence and cc.char_start == plain.char_start


def test_answer_columns_are_context_columns_and_provenance(db_url, data):
    """One transaction and one pipeline for an answer's contexts and provenance: the same
    values as the two calls, and the connection usable after (also after an error)."""
    import psycopg

    from latentlens.store import Store

    with Store.open(db_url) as s:
        info = s.get_model("qa")
        keys = np.array([(0, int(sid), int(pos)) for sid, pos in
                         zip(data["sentence_id"][::5], data["position"][::5], strict=True)], dtype=np.int64)
        cc, prov = s.answer_columns(info, keys[:, 0], keys[:, 1], keys[:, 2], None, [0], {0: ["scan", "ann"]})
        want = s.context_columns(info, keys[:, 0], keys[:, 1], keys[:, 2])
        assert cc.token == want.token and cc.sentence == want.sentence and cc.found.all()
        p = s.provenance(info, [0], {0: ["ann", "scan"]})
        assert {**prov, "at": None} == {**p, "at": None} and prov["search"] == {"0": ["ann", "scan"]}
        assert s.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with pytest.raises(psycopg.errors.NumericValueOutOfRange):  # layer numbers beyond int: refused
            s.answer_columns(info, keys[:, 0] + 2**40, keys[:, 1], keys[:, 2], None, [0], {})
        assert s.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert s._fetch("SELECT 1") == [(1,)]


def test_answer_columns_with_some_spans_known(db_url, data):
    """Keys whose spans the search read (a cached leaf) are not probed; the others are: each
    key's columns equal those of a call that probes every key (-1 given: a NULL span)."""
    from latentlens.store import Store
    from latentlens.store.types import SPAN_UNKNOWN

    with Store.open(db_url) as s:
        info = s.get_model("qa")
        keys = np.array([(0, int(sid), int(pos)) for sid, pos in
                         zip(data["sentence_id"][::3], data["position"][::3], strict=True)], dtype=np.int64)
        keys = np.concatenate([keys, [[0, 10**9, 1]]])  # no such row: probed, not found
        plain, _ = s.answer_columns(info, keys[:, 0], keys[:, 1], keys[:, 2], None, [0], {})
        tok = plain.token_id.copy()
        spans = np.full((2, len(keys)), SPAN_UNKNOWN, dtype=np.int32)
        half = np.arange(0, len(keys) - 1, 2)
        spans[0, half] = [plain.char_start[j] for j in half]
        spans[1, half] = [plain.char_end[j] for j in half]
        spans[:, half[-1]] = -1  # one known row whose span is NULL
        cc, _ = s.answer_columns(info, keys[:, 0], keys[:, 1], keys[:, 2], tok, [0], {}, spans=spans)
        want_cs = list(plain.char_start)
        want_ce = list(plain.char_end)
        want_cs[half[-1]] = want_ce[half[-1]] = None
        assert cc.found.tolist() == plain.found.tolist() and not cc.found[-1]
        assert cc.token_id.tolist() == plain.token_id.tolist()
        assert cc.char_start == want_cs and cc.char_end == want_ce
        assert cc.token == plain.token and cc.sentence == plain.sentence


def test_collector_paused_restores_the_state_it_found():
    """The garbage collector is off while an answer is built and on again after, an error
    included; a collector someone else turned off stays off."""
    import gc

    from latentlens.query import _collector_paused

    assert gc.isenabled()
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _collector_paused():
        raise RuntimeError("mid-build")
    assert gc.isenabled()
    gc.disable()
    try:
        with _collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("high", [50, 2**40, 2**62])
def test_packed_sorts_equal_numpys(high):
    """_lexsort and _unique_rows give np.lexsort's and np.unique(axis=0)'s answers, whether the
    keys pack into 63 bits (small), do not (2**40 and 2**62 a column), or hold negatives (the
    fallbacks)."""
    from latentlens.query import _lexsort, _unique_rows

    rng = np.random.default_rng(high % 97)
    for negative in (False, True):
        cols = [rng.integers(-3 if negative else 0, high, 3000) for _ in range(3)]
        cols.append(rng.integers(0, 4, 3000))  # many ties: stability shows
        np.testing.assert_array_equal(_lexsort(cols), np.lexsort(cols))
        rows = np.stack(cols[:3] + [rng.integers(0, 3, 3000)], axis=1)
        rows = rows[rng.integers(0, 3000, 6000)]  # repeats
        want_u, want_i = np.unique(rows, axis=0, return_inverse=True)
        got_u, got_i = _unique_rows(rows)
        np.testing.assert_array_equal(got_u, want_u)
        np.testing.assert_array_equal(got_i, want_i.reshape(-1))
    u, i = _unique_rows(np.zeros((0, 3), dtype=np.int64))
    assert u.shape == (0, 3) and i.shape == (0,)


@pytest.mark.parametrize("bits", [63, 64])
def test_packed_at_the_63_bit_boundary(bits):
    """Columns whose widths sum to exactly 63 bits pack (and order right), 64 bits fall back;
    an all-zero column takes no bits, int32 and int64 columns mix."""
    from latentlens.query import _lexsort, _packed, _unique_rows

    rng = np.random.default_rng(bits)
    n = 4000
    a = rng.integers(0, 2**30, n, dtype=np.int64)
    a[0] = 2**30 - 1  # 30 bits
    b = rng.integers(0, 2**31, n).astype(np.int32) if bits == 63 else rng.integers(0, 2**32, n, dtype=np.int64)
    b[0] = np.iinfo(np.int32).max if bits == 63 else 2**32 - 1  # 31 or 32 bits
    c = rng.integers(0, 4, n, dtype=np.int64)
    c[0] = 3  # 2 bits
    zero = np.zeros(n, dtype=np.int64)
    cols = [a[rng.integers(0, n, n)], b[rng.integers(0, n, n)], zero, c]
    assert (_packed(cols) is None) == (bits == 64)
    np.testing.assert_array_equal(_lexsort(cols[::-1]), np.lexsort(cols[::-1]))
    rows = np.stack([x.astype(np.int64) for x in cols], axis=1)[rng.integers(0, n, 2 * n)]
    want_u, want_i = np.unique(rows, axis=0, return_inverse=True)
    got_u, got_i = _unique_rows(rows)
    np.testing.assert_array_equal(got_u, want_u)
    np.testing.assert_array_equal(got_i, want_i.reshape(-1))


def test_knn_take_keeps_spans_only_where_read():
    """KnnResult.take: answers with spans carry them over, answers without mark theirs unknown."""
    from latentlens.store.types import SPAN_UNKNOWN

    base = KnnResult.empty(0, 4, 2)
    assert base.char_start is None
    with_spans = KnnResult(0, np.zeros((2, 2), np.float32), np.ones((2, 2), np.int64), np.ones((2, 2), np.int32),
                           np.ones((2, 2), np.int32), char_start=np.full((2, 2), 3, np.int32),
                           char_end=np.full((2, 2), -1, np.int32))
    base.take(np.array([1, 3]), with_spans)
    assert base.char_start.tolist() == [[SPAN_UNKNOWN] * 2, [3, 3], [SPAN_UNKNOWN] * 2, [3, 3]]
    assert base.char_end[1].tolist() == [-1, -1]
    without = KnnResult(0, np.zeros((1, 2), np.float32), np.ones((1, 2), np.int64), np.ones((1, 2), np.int32),
                        np.ones((1, 2), np.int32))
    base.take(np.array([3]), without)
    assert base.char_start[3].tolist() == [SPAN_UNKNOWN] * 2 and base.char_start[1].tolist() == [3, 3]
