"""`llens import-index OWNER/NAME`: reference indices fetched from the Hugging Face Hub.

No hub is reached: huggingface_hub's own ``snapshot_download`` talks to
tests/_fake_hub.py, a small HTTP server on 127.0.0.1 that speaks the four
requests it makes (repo info, file tree, HEAD and GET of a file) over
repositories laid out on disk. The library tests point it there with
``endpoint=``; the in-process CLI tests patch ``huggingface_hub.constants``
(which reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE at import); the
subprocess tests set those environment variables, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from _fake_hub import FakeHub
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.errors import InputError, UnknownModel
from latentlens.interop import fetch_hub_index, import_hub_index, import_index, locate_index
from latentlens.query import Lens

REPO = "McGill-NLP/contextual_embeddings-tiny"
LAYER = "layer_{}/embeddings_cache.pt"
CAPTIONS = ["a brown dog on the grass", "the cat sat on the mat", "a dog and a cat"]


def write_reference_dir(path: Path, layers=(2, 5, 7), dim: int = 16, seed: int = 0) -> Path:
    """ContextualIndex.save's layout, plus a README as a hub repository has."""
    rng = np.random.default_rng(seed)
    meta = [{"token_str": (" " if p else "") + w, "token_id": 100 + 7 * len(w) + ord(w[0]), "caption": c,
             "position": p + 1} for c in CAPTIONS for p, w in enumerate(c.split(" "))]
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"layers": list(layers), "hidden_dim": dim}))
    (path / "README.md").write_text("# a pre-built contextual index\n")
    for layer in layers:
        (path / f"layer_{layer}").mkdir()
        emb = torch.from_numpy(rng.normal(size=(len(meta), dim)).astype(np.float32)) * 30
        torch.save({"embeddings": emb.half(), "metadata": meta}, path / LAYER.format(layer))
    return path


@pytest.fixture
def hub():
    h = FakeHub().start()
    yield h
    h.stop()


@pytest.fixture
def online(monkeypatch):
    """The session sets HF_HUB_OFFLINE=1 (tests never reach the hub); the fake hub is local."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_env(monkeypatch, hub, online, tmp_path):
    """What HF_ENDPOINT=<fake> and HF_HUB_CACHE=<tmp> do, for code already running (the CLI in-process)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return hub


def layer_files(hub: FakeHub) -> list[str]:
    return sorted(p.split("/", 2)[2] for p in hub.downloads())


def run(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def one_line_error(r, *needles: str, code: int = 2) -> str:
    assert "Traceback" not in r.output, r.output
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------
# which argument is what


def test_a_directory_a_hub_id_or_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "idx").mkdir(parents=True)
    (tmp_path / "file.pt").write_bytes(b"x")
    assert locate_index("org/idx") == ("dir", "org/idx")  # an existing path wins
    assert locate_index(str(tmp_path)) == ("dir", str(tmp_path))
    assert locate_index(REPO) == ("hub", REPO)
    assert locate_index("Qwen/Qwen2.5-VL-7B-Instruct") == ("hub", "Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(InputError, match="is a file"):
        locate_index("file.pt")
    for bad in ("nothing-here", "./org/missing", "/abs/missing", "a/b/c", "a--b/c", "a/b..c", "-a/b", "a/b c"):
        with pytest.raises(InputError, match="neither a directory here nor a hub repository id"):
            locate_index(bad)


# --------------------------------------------------------------------------
# fetching: huggingface_hub against the fake hub


def test_only_metadata_and_the_chosen_layers_are_downloaded(hub, online, tmp_path):
    sha = hub.add(REPO, write_reference_dir(tmp_path / "repo"))
    cache = tmp_path / "cache"
    got = fetch_hub_index(REPO, layers=[5], cache_dir=cache, endpoint=hub.url, progress=False)
    assert (got.repo_id, got.revision, got.commit, got.layers) == (REPO, "main", sha, [5])
    assert layer_files(hub) == ["layer_5/embeddings_cache.pt", "metadata.json"]  # not 2, 7 nor README
    assert got.path == cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / sha
    assert sorted(p.relative_to(got.path).as_posix() for p in got.path.rglob("*") if p.is_file()) == \
        ["layer_5/embeddings_cache.pt", "metadata.json"]
    assert (got.path / LAYER.format(5)).read_bytes() == (tmp_path / "repo" / LAYER.format(5)).read_bytes()
    # no --layers: those metadata.json lists; layer 5 comes from the cache
    hub.requests.clear()
    got = fetch_hub_index(REPO, cache_dir=cache, endpoint=hub.url, progress=False)
    assert got.layers == [2, 5, 7]
    assert layer_files(hub) == ["layer_2/embeddings_cache.pt", "layer_7/embeddings_cache.pt"]


def test_a_layer_the_repository_lacks_is_refused_before_any_layer_downloads(hub, online, tmp_path):
    hub.add(REPO, write_reference_dir(tmp_path / "repo"))
    with pytest.raises(InputError, match=r"has no layer 9 at main \(its layers: 2, 5, 7\)"):
        fetch_hub_index(REPO, layers=[5, 9], cache_dir=tmp_path / "c", endpoint=hub.url, progress=False)
    assert layer_files(hub) == ["metadata.json"]
    # metadata.json listing a layer whose file is not in the repository
    d = write_reference_dir(tmp_path / "short", layers=(2, 5))
    (d / "metadata.json").write_text(json.dumps({"layers": [2, 5, 7], "hidden_dim": 16}))
    hub.add("org/short", d)
    with pytest.raises(InputError, match=r"incomplete: its metadata.json lists layer 7 .*choose --layers"):
        fetch_hub_index("org/short", cache_dir=tmp_path / "c", endpoint=hub.url, progress=False)
    assert fetch_hub_index("org/short", layers=[2, 5], cache_dir=tmp_path / "c", endpoint=hub.url,
                           progress=False).layers == [2, 5]


def test_revisions_and_unknown_names(hub, online, tmp_path):
    old = hub.add(REPO, write_reference_dir(tmp_path / "v1", seed=1), ref="v1")
    new = hub.add(REPO, write_reference_dir(tmp_path / "v2", seed=2), ref="main")
    kw = {"cache_dir": tmp_path / "c", "endpoint": hub.url, "progress": False}
    assert fetch_hub_index(REPO, layers=[2], **kw).commit == new
    got = fetch_hub_index(REPO, layers=[2], revision="v1", **kw)
    assert (got.revision, got.commit) == ("v1", old)
    assert (got.path / LAYER.format(2)).read_bytes() == (tmp_path / "v1" / LAYER.format(2)).read_bytes()
    assert fetch_hub_index(REPO, layers=[2], revision=old, **kw).commit == old  # a commit as revision
    with pytest.raises(InputError, match=f"{REPO} has no revision 'v9' on the hub"):
        fetch_hub_index(REPO, revision="v9", **kw)
    with pytest.raises(InputError, match="no repository org/nothing on the hub, and no directory"):
        fetch_hub_index("org/nothing", **kw)


def test_an_interrupted_download_resumes(hub, online, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes (and resumes from) whole 10 MB chunks: 1 KiB ones for a small file
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    repo = write_reference_dir(tmp_path / "repo", layers=(2,), dim=256)
    hub.add(REPO, repo)
    size = (repo / LAYER.format(2)).stat().st_size
    hub.drop_after[f"{REPO}/{LAYER.format(2)}"] = size // 3  # the connection dies a third of the way in
    got = fetch_hub_index(REPO, cache_dir=tmp_path / "c", endpoint=hub.url, progress=False)
    assert (got.path / LAYER.format(2)).read_bytes() == (repo / LAYER.format(2)).read_bytes()
    gets = [h for m, p, h in hub.requests if m == "GET" and p.endswith(LAYER.format(2))]
    assert len(gets) == 2 and "range" not in gets[0]
    assert gets[1]["range"] == f"bytes={size // 3 // 1024 * 1024}-"  # resumed after the chunks it had, not restarted


# --------------------------------------------------------------------------
# importing what was fetched


def test_hub_import_records_provenance_and_equals_the_directory_import(hub, online, store, tmp_path):
    repo = write_reference_dir(tmp_path / "repo")
    sha = hub.add(REPO, repo)
    kw = {"cache_dir": tmp_path / "c", "endpoint": hub.url, "download_progress": False}
    rep = import_hub_index(store, REPO, "from-hub", layers=[2, 7], chunk_rows=4, **kw)
    assert rep.corpus == REPO and sorted(rep.layers) == [2, 7] and rep.source is None
    assert rep.origin == {"imported_from": f"hf://{REPO}@{sha}", "hub_repo": REPO, "hub_revision": "main",
                          "hub_commit": sha}
    info = store.get_model("from-hub")
    assert info.layer_numbers == [2, 7] and info.revision is None  # model.revision is the checkpoint's
    assert {k: info.params[k] for k in rep.origin} == rep.origin
    corpus = store.get_corpus(REPO)
    assert corpus.source == f"hf://{REPO}@{sha}" and corpus.sentence_count == len(CAPTIONS)
    # the same rows and neighbours as importing the directory itself
    import_index(store, repo, "from-dir", layers=[2, 7])
    q = torch.from_numpy(np.random.default_rng(5).normal(size=(4, 16)).astype(np.float32))
    with nullcontext(Lens(store, cache_dir=tmp_path / "scan")) as lens:
        a, b = lens.neighbors(q, "from-hub", k=5), lens.neighbors(q, "from-dir", k=5)
    for ra, rb in zip(a, b, strict=True):
        assert [(n.sentence, n.position, n.layer, n.token) for n in ra.neighbours] == \
               [(n.sentence, n.position, n.layer, n.token) for n in rb.neighbours]
    # again: nothing downloaded (only the listing is asked for), nothing written; then one more layer
    hub.requests.clear()
    again = import_hub_index(store, REPO, "from-hub", layers=[2, 7], **kw)
    assert all(r["written"] == 0 for r in again.layers.values()) and layer_files(hub) == []
    more = import_hub_index(store, REPO, "from-hub", layers=[5], **kw)
    assert more.layers[5]["written"] > 0 and layer_files(hub) == [LAYER.format(5)]
    assert store.get_model("from-hub").layer_numbers == [2, 5, 7]


def test_a_truncated_layer_on_the_hub_imports_nothing(hub, online, store, tmp_path):
    """tests/test_bad_input.py covers a truncated and a missing layer in a directory; this is the hub path."""
    repo = write_reference_dir(tmp_path / "repo")
    f = repo / LAYER.format(7)
    f.write_bytes(f.read_bytes()[:400])  # the last layer: checked before 2 and 5 are written
    sha = hub.add(REPO, repo)
    corpora = [c.name for c in store.list_corpora()]
    with pytest.raises(InputError) as e:
        import_hub_index(store, REPO, "cut", cache_dir=tmp_path / "c", endpoint=hub.url, download_progress=False)
    msg = str(e.value)
    assert LAYER.format(7) in msg and "truncated or corrupt" in msg
    assert f"it came from {REPO} at commit {sha}: fetch it afresh with --force-download" in msg
    with pytest.raises(UnknownModel):
        store.get_model("cut")
    assert [c.name for c in store.list_corpora()] == corpora


# --------------------------------------------------------------------------
# the command


def test_cli_import_from_the_hub(hub_env, db_url, tmp_path):
    sha = hub_env.add(REPO, write_reference_dir(tmp_path / "repo"))
    r = run("import-index", REPO, "--model", "cli-hub", "--layers", "2,5", "--no-progress", "--json",
            "--database-url", db_url)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert sorted(d["layers"]) == ["2", "5"] and d["origin"]["hub_commit"] == sha and d["corpus"] == REPO
    assert layer_files(hub_env) == [LAYER.format(2), LAYER.format(5), "metadata.json"]
    r = run("import-index", REPO, "--model", "cli-hub", "--layers", "2", "--no-progress", "--database-url", db_url)
    assert r.exit_code == 0, r.output
    assert f"Imported from {REPO} at {sha[:12]} into model 'cli-hub'" in r.stdout
    assert "layer 2: 0 rows written" in r.stdout and "import again with --source" in r.stdout


def test_cli_argument_errors(hub_env, db_url, tmp_path):
    hub_env.add(REPO, write_reference_dir(tmp_path / "repo"))
    one_line_error(run("import-index", "a/b/c", "--model", "m"), "neither a directory here nor a hub repository id")
    one_line_error(run("import-index", tmp_path / "repo" / "metadata.json", "--model", "m"), "is a file")
    one_line_error(run("import-index", tmp_path / "repo", "--model", "m", "--revision", "v1"),
                   "apply to a hub repository, not to the directory")
    one_line_error(run("import-index", REPO), "give --model NAME")
    one_line_error(run("import-index", REPO, "--model", "m", "--layers", "3", "--no-progress"),
                   f"{REPO} has no layer 3 at main (its layers: 2, 5, 7)")
    one_line_error(run("import-index", REPO, "--model", "m", "--revision", "nope", "--no-progress"),
                   "has no revision 'nope'")


def _llens(args, env_extra: dict, cwd: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(env_extra)
    code = "import sys; from latentlens.cli.main import cli; sys.argv = ['llens'] + sys.argv[1:]; cli()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_hf_environment_in_a_fresh_process(hub, db_url, tmp_path):
    """HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE as a user sets them: read by huggingface_hub at import."""
    hub.add(REPO, write_reference_dir(tmp_path / "repo"))
    home = tmp_path / "hf-home"
    base = ["import-index", REPO, "--model", "proc-hub", "--no-progress", "--database-url", db_url]
    r = _llens(base + ["--layers", "2"], {"HF_ENDPOINT": hub.url, "HF_HOME": home, "HF_HUB_OFFLINE": "0"}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (home / "hub" / f"models--{REPO.replace('/', '--')}").is_dir()
    assert layer_files(hub) == [LAYER.format(2), "metadata.json"]
    hub.requests.clear()
    offline = {"HF_ENDPOINT": hub.url, "HF_HOME": home, "HF_HUB_OFFLINE": "1"}
    # offline, cached: imports from the cache without a request
    r = _llens(base + ["--layers", "2"], offline, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "already imported" in r.stdout and hub.requests == []
    # offline, a layer not cached
    r = _llens(base + ["--layers", "5"], offline, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [x for x in r.stderr.splitlines() if x.strip()] == [
        f"Error: HF_HUB_OFFLINE is set and {REPO} (revision main) is only partly in the Hugging Face cache "
        f"({home / 'hub'}): layer_5/embeddings_cache.pt missing; unset HF_HUB_OFFLINE to download them"]
    # offline, nothing cached
    r = _llens(base, dict(offline, HF_HOME=str(tmp_path / "empty-home")), tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [x for x in r.stderr.splitlines() if x.strip()] == [
        f"Error: HF_HUB_OFFLINE is set and {REPO} (revision main) is not in the Hugging Face cache "
        f"({tmp_path / 'empty-home' / 'hub'}): unset HF_HUB_OFFLINE to download it"]
    assert hub.requests == []


# --------------------------------------------------------------------------
# tied to a loadable model: --source


@pytest.fixture(scope="module")
def tiny_qwen(db_url, tmp_path_factory):
    """A tiny Qwen2.5-VL, its text side ingested as 'tiny-orig' and exported in the reference layout."""
    from vlm_tiny import CORPUS, build_qwen, sample_image

    base = tmp_path_factory.mktemp("tie")
    model_dir = build_qwen(base / "tiny-qwen25", v25=True)
    corpus = base / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    sample_image((96, 64)).save(base / "photo.png")
    r = run("ingest", model_dir, corpus, "--name", "tiny-orig", "--layers", "0,1,2,3", "--no-index",
            "--no-progress")
    assert r.exit_code == 0, r.output
    r = run("export-index", "tiny-orig", base / "exported")
    assert r.exit_code == 0, r.output
    return {"dir": model_dir, "exported": base / "exported", "image": base / "photo.png", "base": base}


def _keys(d: dict) -> list:
    return [[(n["sentence"], n["position"], n["layer"]) for n in p["neighbours"]]
            for vl in d["layers"] for p in vl["patches"]]


def test_source_ties_the_imported_rows_to_a_loadable_model(tiny_qwen, hub_env, db_url):
    """import-index REPO --source CHECKPOINT, then `llens query NAME --image/--text` loads the checkpoint
    and searches the imported rows: the same neighbours as the model ingested here."""
    sha = hub_env.add("McGill-NLP/contextual_embeddings-tiny-qwen", tiny_qwen["exported"])
    r = run("import-index", "McGill-NLP/contextual_embeddings-tiny-qwen", "--source", tiny_qwen["dir"],
            "--layers", "0,2", "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    name = tiny_qwen["dir"].name  # named as `llens ingest DIR` names it
    assert d["model"] == name and d["source"] == str(tiny_qwen["dir"].resolve())
    assert d["origin"]["hub_commit"] == sha
    from latentlens.store import Store

    with Store.open(db_url) as s:
        info = s.get_model(name)
    assert info.num_layers == 3 and info.layer_numbers == [0, 2]  # from the config: 3 blocks, not "top layer 2"
    assert info.params["source"] == str(tiny_qwen["dir"].resolve())
    image = ["--image", tiny_qwen["image"], "--visual-layers", "1,3", "--patches", "center", "-k", "3",
             "--mode", "exact", "--json"]
    mine = run("query", name, *image)
    assert mine.exit_code == 0, mine.output
    theirs = run("query", "tiny-orig", *image, "--layers", "0,2")
    assert theirs.exit_code == 0, theirs.output
    assert _keys(json.loads(mine.stdout)) == _keys(json.loads(theirs.stdout))
    text = ["--text", "a small dog runs on the grass", "--token", "dog", "-k", "3", "--mode", "exact", "--json"]
    mine, theirs = run("query", name, *text), run("query", "tiny-orig", *text, "--layers", "0,2")
    assert mine.exit_code == 0, mine.output
    assert theirs.exit_code == 0, theirs.output
    a, b = json.loads(mine.stdout)[0]["neighbours"], json.loads(theirs.stdout)[0]["neighbours"]
    assert [(n["token"], n["sentence"], n["position"], n["layer"], n["char_start"]) for n in a] == \
           [(n["token"], n["sentence"], n["position"], n["layer"], n["char_start"]) for n in b]
    np.testing.assert_allclose([n["similarity"] for n in a], [n["similarity"] for n in b], atol=2e-3)


def test_source_is_checked_against_the_index(tiny_qwen, hub_env, db_url, tmp_path):
    hub_env.add(REPO, write_reference_dir(tmp_path / "repo", dim=16))  # the tiny model has 64
    one_line_error(run("import-index", REPO, "--source", tiny_qwen["dir"], "--model", "wrong", "--no-progress"),
                   f"--source {tiny_qwen['dir']} has hidden size 64, the index has 16 dimensions")
    one_line_error(run("import-index", REPO, "--source", tmp_path / "no-such-model", "--model", "x"),
                   "model not found")
    # imported without a source (2 layers guessed from the top one), then again with one: the source
    # and its 3 layers are recorded, no rows rewritten; another source is then refused
    r = run("import-index", tiny_qwen["exported"], "--model", "late-source", "--layers", "0,2")
    assert r.exit_code == 0, r.output
    from latentlens.store import Store

    with Store.open(db_url) as s:
        assert s.get_model("late-source").num_layers == 2
    r = run("import-index", tiny_qwen["exported"], "--model", "late-source", "--layers", "0,2",
            "--source", tiny_qwen["dir"])
    assert r.exit_code == 0, r.output
    assert "0 rows written" in r.stdout and f"load {tiny_qwen['dir'].resolve()}" in r.stdout
    with Store.open(db_url) as s:
        info = s.get_model("late-source")
    assert info.num_layers == 3 and info.params["source"] == str(tiny_qwen["dir"].resolve())
    other = tmp_path / "other-qwen"
    (other).mkdir()
    (other / "config.json").write_text((tiny_qwen["dir"] / "config.json").read_text())
    one_line_error(run("import-index", tiny_qwen["exported"], "--model", "late-source", "--layers", "0",
                       "--source", other), "is stored from", "not from")
