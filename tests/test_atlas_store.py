"""The atlas store on synthetic rows (no model): word search against a Python reference, exact and
HNSW k-NN against numpy, the search policy, and team roles (a writer builds, a reader finds)."""

from __future__ import annotations

import uuid

import numpy as np
import psycopg
import pytest
from psycopg import sql

from latentlens import atlas as atl
from latentlens.errors import PermissionDenied
from latentlens.store import Store
from latentlens.store.atlas import AtlasImageRows

DIM = 24
WORDS = ["dog", "cat", "grass", "sky", "Dog", "car"]
N_IMAGES, GRID, K = 40, (4, 5), 3
TAG = uuid.uuid4().hex[:6]


def synthetic_rows(rng: np.random.Generator, i: int, layers: list[int]) -> AtlasImageRows:
    rows, cols = GRID
    p = rows * cols
    nb = {c: [] for c in ("layer", "patch", "rank", "word", "sim")}
    for layer in layers:
        for patch in range(p):
            sims = np.sort(rng.uniform(0.05, 0.4, size=K))[::-1]
            for r in range(K):
                nb["layer"].append(layer)
                nb["patch"].append(patch)
                nb["rank"].append(r + 1)
                nb["word"].append(WORDS[rng.integers(len(WORDS))])
                nb["sim"].append(float(sims[r]))
    n = len(nb["word"])
    rc = np.indices(GRID).reshape(2, -1)
    boxes = np.stack([rc[1] * 10, rc[0] * 10, rc[1] * 10 + 10, rc[0] * 10 + 10], axis=1).astype(np.float64)
    return AtlasImageRows(
        content_hash=f"{i:064x}", path=f"/data/img{i}.png", size=(cols * 10, rows * 10), grid=GRID,
        patch_row=rc[0].astype(np.int32), patch_col=rc[1].astype(np.int32), boxes=boxes,
        vectors={layer: rng.normal(size=(p, DIM)).astype(np.float32) for layer in layers},
        nb_layer=np.array(nb["layer"], dtype=np.int32), nb_patch=np.array(nb["patch"], dtype=np.int32),
        nb_rank=np.array(nb["rank"], dtype=np.int16), nb_token_id=np.zeros(n, dtype=np.int32),
        nb_token=[None] * n, nb_word=nb["word"], nb_similarity=np.array(nb["sim"], dtype=np.float32),
        nb_text_layer=np.full(n, 1, dtype=np.int32), nb_sentence_id=np.arange(n, dtype=np.int64),
        nb_position=np.zeros(n, dtype=np.int32))


def write_atlas(store: Store, name: str, model: str, layers: list[int], seed: int = 0):
    info = store.register_model(model, hidden_size=DIM, num_layers=4, architecture="synthetic")
    atlas = store.create_atlas(name, info, layers, {"k": K})
    run = store.create_atlas_run(atlas, source="synthetic", shard=0, num_shards=1, images_total=N_IMAGES,
                                 hostname="h", pid=1)
    rng = np.random.default_rng(seed)
    written = [synthetic_rows(rng, i, layers) for i in range(N_IMAGES)]
    for rows in written:
        assert store.write_atlas_image(atlas, run.id, rows) is not None
    assert store.write_atlas_image(atlas, run.id, written[0]) is None  # same content: stored once
    store.finish_atlas_run(run.id, "done")
    return store.get_atlas(name), written


@pytest.fixture(scope="module")
def synth(db_url):
    with Store.open(db_url) as store:
        atlas, written = write_atlas(store, "synth", "synth-model", [1, 3])
        if store.ann_supported():
            store.build_atlas_index(atlas)
        yield store.get_atlas("synth"), written


def test_find_word_is_the_reference(synth, store):
    atlas, written = synth
    for layer, max_rank in [(None, None), (3, None), (1, 2)]:
        best: dict = {}
        for i, rows in enumerate(written):
            for lay, patch, rank, word, sim in zip(rows.nb_layer, rows.nb_patch, rows.nb_rank, rows.nb_word,
                                                   rows.nb_similarity, strict=True):
                if word.lower() != "dog" or (layer is not None and lay != layer) or (max_rank and rank > max_rank):
                    continue
                key = (i, int(patch), int(lay))
                if key not in best or sim > best[key]:
                    best[key] = float(sim)
        want = sorted(best.values(), reverse=True)[:30]
        hits = atl.find_word(store, "synth", "dog", layer=layer, k=30, max_rank=max_rank)
        assert [h.similarity for h in hits] == pytest.approx(want, abs=1e-6)
        for h in hits:
            i = int(h.path.removeprefix("/data/img").removesuffix(".png"))
            assert best[(i, h.patch, h.layer)] == pytest.approx(h.similarity, abs=1e-6)
            assert h.box == (h.col * 10, h.row * 10, h.col * 10 + 10, h.row * 10 + 10)
        # pages of 7 are the same list
        pages = [h.similarity for o in range(0, 30, 7)
                 for h in atl.find_word(store, "synth", "dog", layer=layer, k=7, offset=o, max_rank=max_rank)]
        assert pages[:len(hits)] == [h.similarity for h in hits]


def test_the_word_index_answers(synth, db_url):
    atlas, _ = synth
    with psycopg.connect(db_url) as conn:
        conn.execute("ANALYZE atlas_neighbour")
        conn.execute("SET enable_seqscan = off")  # tiny table: only asks whether the index CAN serve it
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT * FROM llens_atlas_find('synth', 'dog', 3, 10)"))
    assert "atlas_neighbour_word" in plan, plan


def test_knn_exact_and_ann_against_numpy(synth, store):
    atlas, written = synth
    rng = np.random.default_rng(5)
    stored = np.concatenate([r.vectors[3] for r in written])
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    keys = [(i, p) for i in range(len(written)) for p in range(GRID[0] * GRID[1])]
    q = stored[rng.choice(len(stored), 8, replace=False)] + 0.1 * rng.normal(size=(8, DIM))
    got = store.atlas_knn(atlas, 3, q, 10, exact=True)
    ids = {i: int(h.path.removeprefix("/data/img").removesuffix(".png"))
           for h in store.atlas_patch_hits(atlas, [(3, im, p, s) for row in got for im, p, s in row])
           for i in [h.image_id]}
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    for qi in range(len(q)):
        sims = stored @ qn[qi]
        order = np.argsort(-sims)[:10]
        assert [s for _, _, s in got[qi]] == pytest.approx(sims[order], abs=2e-3)
        assert (ids[got[qi][0][0]], got[qi][0][1]) == keys[order[0]]
    if not store.ann_supported():
        pytest.skip("this server's pgvector has no ANN support")
    assert atlas.layer(3).index_kind == "hnsw_halfvec"
    ann = store.atlas_knn(atlas, 3, q, 10, exact=False)
    recall = np.mean([len({(a, b) for a, b, _ in x} & {(a, b) for a, b, _ in y}) / 10 for x, y in zip(ann, got)])
    assert recall >= 0.9


def test_search_policy(synth, store, monkeypatch):
    atlas, written = synth
    near = written[0].vectors[3][0]
    stored = np.concatenate([r.vectors[3] for r in written])
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    far = np.random.default_rng(9).normal(size=DIM)
    best = float((stored @ (far / np.linalg.norm(far))).max())
    monkeypatch.setattr(atl, "OOD_THRESHOLD", best + 0.01)  # the leaf is small: the sample is all of it
    assert atl.search_policy(store, atlas, 3, near, "exact") is True
    if store.ann_supported():
        assert atl.search_policy(store, atlas, 3, near, "ann") is False
        assert atl.search_policy(store, atlas, 3, near, "auto") is False  # in distribution: HNSW
        assert atl.search_policy(store, atlas, 3, far, "auto") is True  # out of distribution: exact
    with pytest.raises(Exception, match="unknown search mode"):
        atl.search_policy(store, atlas, 3, near, "fast")


# ---------------------------------------------------------------------------
# team roles


@pytest.fixture(scope="module")
def team(db_url):
    from click.testing import CliRunner
    from latentlens.cli.main import cli

    names = {"reader": f"atr_{TAG}", "writer": f"atw_{TAG}"}
    for kind, name in names.items():
        r = CliRunner().invoke(cli, ["db", f"grant-{kind}", name, "--password-env", "PW"], env={"PW": "pw-" + TAG})
        assert r.exit_code == 0, r.output
    yield names
    with psycopg.connect(db_url, autocommit=True) as conn:
        groups = list(conn.execute("SELECT llens_team_role('reader'), llens_team_role('writer')").fetchone())
        for name in [*names.values(), *groups]:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _url_as(db_url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(db_url)
    return urlunsplit(parts._replace(netloc=f"{name}:pw-{TAG}@{parts.netloc.rpartition('@')[2]}"))


def test_a_writer_builds_and_a_reader_finds(db_url, team):
    with Store.open(_url_as(db_url, team["writer"])) as w:
        atlas, _ = write_atlas(w, "by-writer", "writer-model", [2], seed=1)
        if w.ann_supported():
            w.build_atlas_index(atlas)  # SECURITY DEFINER: the leaf belongs to the owner
    with Store.open(_url_as(db_url, team["reader"])) as r:
        assert atl.find_word(r, "by-writer", "cat", k=3)
        assert r.atlas_knn(r.get_atlas("by-writer"), 2, np.ones(DIM), 2, exact=True)
        with pytest.raises(PermissionDenied):
            r.create_atlas("by-reader", r.get_model("writer-model"), [2], {})
        with pytest.raises(PermissionDenied):
            r.drop_atlas("by-writer")


def test_words_round_trip_whatever_their_characters(db_url):
    """Neighbour rows go in by COPY's text format: tabs, newlines, backslashes and a literal \\N survive."""
    odd = ["tab\there", "new\nline", "back\\slash", "\\N", "cr\rlf", "ünï 用户 'q' \"d\"", "nul\x00byte"]
    with Store.open(db_url) as store:
        info = store.register_model("odd-words", hidden_size=DIM, num_layers=4, architecture="synthetic")
        atlas = store.create_atlas("odd", info, [1], {"k": K})
        run = store.create_atlas_run(atlas, source="x", shard=0, num_shards=1, images_total=1, hostname="h", pid=1)
        rows = synthetic_rows(np.random.default_rng(3), 999, [1])
        n = len(rows.nb_word)
        rows.nb_word = [odd[i % len(odd)] for i in range(n)]
        rows.nb_token = [None if i % 2 else odd[i % len(odd)] for i in range(n)]
        store.write_atlas_image(atlas, run.id, rows)
        with psycopg.connect(db_url) as conn:
            got = conn.execute("SELECT word, token FROM atlas_neighbour WHERE atlas_id = %s "
                               "ORDER BY layer, patch, rank", (atlas.id,)).fetchall()
    want = [(w.replace("\x00", ""), None if t is None else t.replace("\x00", ""))
            for w, t in zip(rows.nb_word, rows.nb_token)]
    assert got == want
    with Store.open(db_url) as store:
        assert atl.find_word(store, "odd", "BACK\\slash", k=1)


def test_shards_starting_at_once_share_one_atlas(db_url):
    """Every shard of a build opens the atlas at its start: one creates it, the others get it."""
    import threading

    with Store.open(db_url) as store:
        info = store.register_model("race-model", hidden_size=DIM, num_layers=4, architecture="synthetic")
    for attempt in range(4):
        barrier = threading.Barrier(3)
        got: list = []

        def open_it(name=f"race-{attempt}", barrier=barrier, got=got):
            with Store.open(db_url) as s:
                barrier.wait()
                got.append(s.ensure_atlas(name, info, [1, 2], {"k": K}))

        threads = [threading.Thread(target=open_it) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 3 and len({a.id for a, _ in got}) == 1 and sum(c for _, c in got) == 1
        assert [li.layer for li in got[0][0].layer_info] == [1, 2]
