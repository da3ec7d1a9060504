"""The atlas on tiny random VLMs (LLaVA, Qwen2.5-VL, Molmo2), answers known by construction.

For each architecture: the text side is indexed (tests/vlm_tiny.ingest_text), then two
contexts are planted whose stored vectors ARE the visual tokens of chosen patches ("dog"
for image A's middle patch, "cat" for image B's first patch, at visual layer L). The
build must then store those contexts as those patches' rank-1 neighbours (cosine ~1), and
`find --word` must return exactly those patches first. `find --text` is checked against a
numpy brute force over the visual tokens the model itself gives. The collection holds a
byte-identical copy of A under another name: stored once.
"""

from __future__ import annotations

import shutil

import numpy as np
import psycopg
import pytest
from vlm_tiny import CORPUS, build_llava, build_qwen, ingest_text
from vlm_tiny_molmo2 import build_molmo2

from latentlens import atlas as atl
from latentlens.errors import InputError, UnknownAtlas
from latentlens.query import Lens
from latentlens.store import EmbeddingBatch, Store
from latentlens.vlm import load_vlm
from latentlens.vlm.extract import extract_visual_tokens

L = 2  # the visual layer the words are planted at
BUILDERS = {
    "llava": lambda d: build_llava(d / "tiny-llava-atlas"),
    "qwen25": lambda d: build_qwen(d / "tiny-qwen25-atlas", v25=True),
    "molmo2": lambda d: build_molmo2(d / "tiny-molmo2-atlas"),
}


def make_images(folder):
    """Three distinct generated images (sizes differ, so grids differ for the dynamic ones) and a copy."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    sizes = {"a.png": (64, 48), "b.png": (48, 64), "c.png": (56, 56)}
    for name, (w, h) in sizes.items():
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
    shutil.copy(folder / "a.png", folder / "sub_copy_of_a.png")
    return folder


def plant(store: Store, model: str, corpus_tag: str, plants: list[tuple[str, str, np.ndarray]]) -> None:
    """Store, at layer L, a context for each (sentence, word, vector): the vector is the word's row."""
    info = store.get_model(model)
    texts = [s for s, _, _ in plants]
    corpus = store.register_corpus(f"planted-{corpus_tag}", content_hash=f"planted-{corpus_tag}")
    sids = store.add_sentences(corpus, texts)
    starts = [s.index(w) for s, w, _ in plants]
    batch = EmbeddingBatch(
        sentence_id=np.asarray(sids, dtype=np.int64), position=np.full(len(plants), 2, dtype=np.int32),
        token_id=np.zeros(len(plants), dtype=np.int32),
        char_start=np.asarray(starts, dtype=np.int32),
        char_end=np.asarray([a + len(w) for a, (_, w, _) in zip(starts, plants)], dtype=np.int32),
        prefix_hash=np.arange(10_000, 10_000 + len(plants), dtype=np.int64),
        vectors={L: np.stack([v for _, _, v in plants]).astype(np.float32)},
    )
    store.write_embeddings(info, batch)


@pytest.fixture(scope="module", params=list(BUILDERS))
def world(request, db_url, tmp_path_factory, one_torch_thread):
    arch = request.param
    base = tmp_path_factory.mktemp(f"atlas-{arch}")
    model_dir = BUILDERS[arch](base)
    vlm = load_vlm(str(model_dir))
    images = make_images(base / "images")
    lens = Lens.connect(db_url)
    ingest_text(lens.store, vlm, CORPUS)
    vt = {n: extract_visual_tokens(vlm, images / n, layers=[0, L]) for n in ("a.png", "b.png", "c.png")}
    mid = len(vt["a.png"].patches) // 2
    plant(lens.store, vlm.name, arch, [
        ("my old dog sleeps", "dog", vt["a.png"].vectors[L][mid]),
        ("a black cat waits", "cat", vt["b.png"].vectors[L][0]),
    ])
    opts = atl.AtlasOptions(layers=[0, L], k=3, progress=False)
    result = atl.build(lens, vlm.name, images, name=f"atlas-{arch}", options=opts, vlm=vlm, echo=lambda m: None)
    yield {"arch": arch, "lens": lens, "vlm": vlm, "images": images, "vt": vt, "mid": mid, "result": result,
           "name": f"atlas-{arch}", "model_dir": model_dir}
    lens.close()


def test_build_stores_each_image_once_with_every_patch(world):
    r = world["result"]
    s = r.summary()
    assert s["status"] == "done" and s["images_in_shard"] == 3 and s["atlas_images"] == 3
    assert r.run.counters["duplicates_in_collection"] == 1
    info = world["lens"].store.get_atlas(world["name"])
    total = sum(len(v.patches) for v in world["vt"].values())
    assert {li.layer: li.row_count for li in info.layer_info} == {0: total, L: total}
    with psycopg.connect(world["lens"].store.url) as conn:
        paths = {r[0] for r in conn.execute("SELECT path FROM atlas_image WHERE atlas_id = %s", (info.id,))}
        n_nb = conn.execute("SELECT count(*) FROM atlas_neighbour WHERE atlas_id = %s", (info.id,)).fetchone()[0]
        boxes = conn.execute(
            "SELECT p.patch, p.row, p.col, p.x0, p.y0, p.x1, p.y1 FROM atlas_patch p JOIN atlas_image i "
            "ON i.id = p.image_id WHERE i.atlas_id = %s AND i.path LIKE %s ORDER BY p.patch",
            (info.id, "%/b.png")).fetchall()
    assert not any("sub_copy_of_a" in p for p in paths)  # the copy comes after a.png: first path kept
    assert n_nb == 2 * total * 3  # two layers, k = 3
    want = world["vt"]["b.png"].patches
    assert [(b[0], b[1], b[2]) for b in boxes] == [(p.idx, p.row, p.col) for p in want]
    assert np.allclose([b[3:] for b in boxes], [p.box for p in want], atol=1e-3)


def test_find_word_returns_the_planted_patches_first(world):
    store = world["lens"].store
    dog = atl.find_word(store, world["name"], "dog", layer=L, k=5)
    assert dog[0].path.endswith("/a.png") and dog[0].patch == world["mid"]
    assert dog[0].rank == 1 and dog[0].similarity > 0.99 and dog[0].layer == L
    assert all((h.path, h.patch) != (dog[0].path, dog[0].patch) for h in dog[1:])  # one row per patch
    assert atl.find_word(store, world["name"], "DOG", layer=L, k=1)[0].patch == world["mid"]  # case-insensitive
    cat = atl.find_word(store, world["name"], "cat", layer=L, k=5)
    assert cat[0].path.endswith("/b.png") and cat[0].patch == 0 and cat[0].similarity > 0.99
    # the box is the patch's box in image pixels
    want = world["vt"]["a.png"].patches[world["mid"]].box
    assert np.allclose(dog[0].box, want, atol=1e-3) and dog[0].image_size == (64, 48)
    assert all(h.layer == 0 for h in atl.find_word(store, world["name"], "dog", layer=0, k=50))
    # paging: offset 1 starts at the second hit
    assert [h.patch for h in atl.find_word(store, world["name"], "dog", layer=L, k=1, offset=1)] == \
        [h.patch for h in dog[1:2]]


def test_find_text_is_the_brute_force_answer(world):
    from latentlens.models import load_language_model

    lm = load_language_model(str(world["model_dir"]))
    text = "a small dog runs on the grass"
    hits, how = atl.find_text(world["lens"], world["name"], text, token="dog", layer=L, k=5, mode="exact", lm=lm)
    assert how["token"].strip("Ġ▁ ").lower() == "dog" and how["search"] == {L: "exact"}
    st = lm.hidden_states([text], [L])[0]
    q = st.vectors[L][how["position"]]
    q = q / np.linalg.norm(q)
    ref = []
    for name in ("a.png", "b.png", "c.png"):
        v = world["vt"][name].vectors[L]
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        ref += [(float(s), name, i) for i, s in enumerate(v @ q)]
    ref.sort(reverse=True)
    assert len(hits) == 5
    assert np.allclose([h.similarity for h in hits], [r[0] for r in ref[:5]], atol=3e-3)
    # tie-aware (halfvec storage; a tiny random tower gives near-equal tokens): each hit is the
    # visual token the model gives, at its true similarity
    truth = {(name, i): s for s, name, i in ref}
    for h in hits:
        assert truth[(h.path.rsplit("/", 1)[1], h.patch)] == pytest.approx(h.similarity, abs=3e-3)


def test_sql_function_and_view(world):
    info = world["lens"].store.get_atlas(world["name"])
    with psycopg.connect(world["lens"].store.url) as conn:
        rows = conn.execute("SELECT path, patch, similarity, rank FROM llens_atlas_find(%s, 'dog', %s, 3)",
                            (world["name"], L)).fetchall()
        view = conn.execute(
            "SELECT path, patch FROM atlas_patch_word WHERE atlas = %s AND lower(word) = 'cat' AND layer = %s "
            "ORDER BY similarity DESC LIMIT 1", (world["name"], L)).fetchone()
        vec = world["vt"]["c.png"].vectors[L][1]
        near = conn.execute(
            "SELECT path, patch, similarity FROM llens_atlas_nearest(%s, %s, %s::halfvec, 50, true)",
            (world["name"], L, "[" + ",".join(map(str, vec.tolist())) + "]")).fetchall()
        with pytest.raises(psycopg.errors.NoDataFound, match="unknown atlas"):
            conn.execute("SELECT * FROM llens_atlas_find('no-such-atlas', 'dog')")
    assert rows[0][0].endswith("/a.png") and rows[0][1] == world["mid"] and rows[0][3] == 1
    assert view[0].endswith("/b.png") and view[1] == 0
    sims = [r[2] for r in near]
    assert sims[0] > 0.99 and sims == sorted(sims, reverse=True)
    mine = [s for p, i, s in near if p.endswith("/c.png") and i == 1]
    assert mine and mine[0] > 0.999  # the token itself (other patches of a tiny random tower may tie)
    assert info.params["k"] == 3


def test_rerun_is_a_no_op_and_other_params_are_refused(world):
    lens = world["lens"]
    opts = atl.AtlasOptions(layers=[0, L], k=3, progress=False)
    again = atl.build(lens, world["vlm"].name, world["images"], name=world["name"], options=opts,
                      vlm=world["vlm"], echo=lambda m: None)
    assert again.already_done and again.skipped_done == 3 and again.atlas.images == 3
    assert again.run.id == world["result"].run.id  # no new run recorded for nothing
    with pytest.raises(InputError, match="exists with another k"):
        atl.build(lens, world["vlm"].name, world["images"], name=world["name"],
                  options=atl.AtlasOptions(layers=[0, L], k=4, progress=False), vlm=world["vlm"], echo=lambda m: None)
    with pytest.raises(UnknownAtlas):
        atl.find_word(lens.store, "no-such-atlas", "dog")
    with pytest.raises(InputError, match="has no layer 1"):
        atl.find_word(lens.store, world["name"], "dog", layer=1)


def _neighbour_table(store: Store, name: str) -> list[tuple]:
    info = store.get_atlas(name)
    with psycopg.connect(store.url) as conn:
        return conn.execute(
            "SELECT i.content_hash, n.layer, n.patch, n.rank, n.word, round(n.similarity::numeric, 3) "
            "FROM atlas_neighbour n JOIN atlas_image i ON i.id = n.image_id WHERE n.atlas_id = %s "
            "ORDER BY 1, 2, 3, 4", (info.id,)).fetchall()


def test_interrupted_build_resumes_exactly(world):
    if world["arch"] != "llava":
        pytest.skip("the run machinery is architecture-neutral: checked once")
    lens = world["lens"]
    opts = atl.AtlasOptions(layers=[0, L], k=3, progress=False)

    def stop(n: int) -> None:
        if n == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atl.build(lens, world["vlm"].name, world["images"], name="resumed", options=opts, vlm=world["vlm"],
                  echo=lambda m: None, on_image=stop)
    info = lens.store.get_atlas("resumed")
    run = lens.store.atlas_runs(info)[0]
    assert run.status == "interrupted" and run.images_done == 1 and info.images == 1
    done = atl.build(lens, world["vlm"].name, world["images"], name="resumed", options=opts, vlm=world["vlm"],
                     echo=lambda m: None)
    assert done.resumed and done.run.id == run.id and done.run.images_done == 3 and done.atlas.images == 3
    assert _neighbour_table(lens.store, "resumed") == _neighbour_table(lens.store, world["name"])


def test_shards_together_equal_one_run(world):
    if world["arch"] != "llava":
        pytest.skip("the run machinery is architecture-neutral: checked once")
    lens = world["lens"]
    notes = []
    for i in (0, 1):
        opts = atl.AtlasOptions(layers=[0, L], k=3, progress=False, shard=(i, 2))
        r = atl.build(lens, world["vlm"].name, world["images"], name="sharded", options=opts, vlm=world["vlm"],
                      echo=notes.append)
    assert lens.store.get_atlas("sharded").images == 3
    assert _neighbour_table(lens.store, "sharded") == _neighbour_table(lens.store, world["name"])
    assert r.run.shard == 1


def test_collect_images_from_a_list(tmp_path):
    folder = make_images(tmp_path / "imgs")
    lst = tmp_path / "list.txt"
    lst.write_text("# my images\nimgs/a.png\n\n" + str(folder / "c.png") + "\n", encoding="utf-8")
    assert [p.name for p in atl.collect_images(lst)] == ["a.png", "c.png"]
    lst.write_text("imgs/nope.png\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1: image file not found"):
        atl.collect_images(lst)
    with pytest.raises(InputError, match="no such directory"):
        atl.collect_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images in"):
        atl.collect_images(tmp_path / "empty")
    files = atl.hash_images(atl.collect_images(folder))
    assert len(files) == 3  # the copy of a.png is the same content


def test_a_failing_write_fails_the_run_and_a_rerun_finishes(world, monkeypatch, tmp_path):
    """The writer thread's error reaches the caller; an unreadable file is skipped and counted."""
    if world["arch"] != "llava":
        pytest.skip("the run machinery is architecture-neutral: checked once")
    lens = world["lens"]
    images = tmp_path / "imgs"
    shutil.copytree(world["images"], images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    opts = atl.AtlasOptions(layers=[L], k=2, progress=False)
    real = Store.write_atlas_image
    calls = []

    def flaky(self, atlas, run_id, rows, counters=None):
        calls.append(rows.path)
        if len(calls) == 2:
            raise InputError("disk on fire")
        return real(self, atlas, run_id, rows, counters)

    monkeypatch.setattr(Store, "write_atlas_image", flaky)
    with pytest.raises(InputError, match="disk on fire"):
        atl.build(lens, world["vlm"].name, images, name="flaky", options=opts, vlm=world["vlm"], echo=lambda m: None)
    info = lens.store.get_atlas("flaky")
    run = lens.store.atlas_runs(info)[0]
    assert run.status == "failed" and run.error == "disk on fire" and info.images == 1
    monkeypatch.setattr(Store, "write_atlas_image", real)
    said = []
    done = atl.build(lens, world["vlm"].name, images, name="flaky", options=opts, vlm=world["vlm"], echo=said.append)
    assert done.resumed and done.atlas.images == 3 and done.run.counters["unreadable"] == 1
    assert any("broken.png" in m and "Skipped" in m for m in said)


def _more_builders() -> dict:
    from test_vlm_more_a import build_llava_onevision, build_qwen3_vl
    from vlm_tiny import build_gemma3, build_llava_next
    from vlm_tiny_idefics3 import build_idefics3
    from vlm_tiny_internvl import build_internvl
    from vlm_tiny_paligemma import build_paligemma

    return {
        "llava_next": build_llava_next, "qwen2": build_qwen, "gemma3": build_gemma3, "idefics3": build_idefics3,
        "smolvlm": lambda d: build_idefics3(d, smol=True), "paligemma": build_paligemma,
        "internvl": build_internvl, "qwen3_vl": build_qwen3_vl, "llava_onevision": build_llava_onevision,
    }


@pytest.mark.parametrize("arch", ["llava_next", "qwen2", "gemma3", "idefics3", "smolvlm", "paligemma", "internvl",
                                  "qwen3_vl", "llava_onevision"])
def test_every_other_family_finds_its_planted_word(arch, db_url, tmp_path, one_torch_thread):
    """The other adapters of the registry: a word planted on one patch comes back first."""
    model_dir = _more_builders()[arch](tmp_path / f"tiny-{arch}-atlas")
    vlm = load_vlm(str(model_dir))
    images = tmp_path / "images"
    make_images(images)
    (images / "c.png").unlink()
    (images / "sub_copy_of_a.png").unlink()
    with Lens.connect(db_url) as lens:
        ingest_text(lens.store, vlm, CORPUS)
        vt = extract_visual_tokens(vlm, images / "a.png", layers=[L])
        mid = len(vt.patches) // 2
        plant(lens.store, vlm.name, f"more-{arch}", [("my old dog sleeps", "dog", vt.vectors[L][mid])])
        atl.build(lens, vlm.name, images, name=f"more-{arch}", vlm=vlm, echo=lambda m: None,
                  options=atl.AtlasOptions(layers=[L], k=2, progress=False))
        hit = atl.find_word(lens.store, f"more-{arch}", "dog", layer=L, k=1)[0]
    assert hit.path.endswith("/a.png") and hit.patch == mid and hit.rank == 1 and hit.similarity > 0.99
    assert np.allclose(hit.box, vt.patches[mid].box, atol=1e-3)
