"""Recall of the default query path on a real small model's index (SmolLM2-135M).

"Default settings" are what a user gets: here (no ANN on this CPU) the exact
scan; on a server with HNSW, auto mode (HNSW, exact fallback for
out-of-distribution queries). Ground truth is PostgreSQL's own exact scan
(Store.knn(exact=True)), an independent implementation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_CORPUS, SHARED_CORPUS

from latentlens.query import Lens

pytestmark = pytest.mark.slow

LAYERS = [0, 8, 16, 24]
LINES = 120
K = 10


@pytest.fixture(scope="module")
def smol(db_url, smollm2_gguf, tmp_path_factory):
    from latentlens.corpus import read_corpus
    from latentlens.ingest import IngestOptions, ingest
    from latentlens.models import load_language_model

    # the shared corpus where it is beside the checkout, else the sample we ship
    source = SHARED_CORPUS if SHARED_CORPUS.is_file() else SAMPLE_CORPUS
    path = tmp_path_factory.mktemp("corpus") / "concepts300.txt"
    lines = source.read_text(encoding="utf-8").splitlines()[:LINES]
    lines += ["The dog ran across the grass.", "A brown dog slept on the porch."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    lm = load_language_model(str(smollm2_gguf), name="smol")
    ingest(lm, read_corpus(str(path)), database_url=db_url,
           options=IngestOptions(layers=LAYERS, progress=False, max_contexts_per_token=None))
    lens = Lens.connect(db_url, cache_dir=tmp_path_factory.mktemp("scan"))
    lens._models["smol"] = lm  # reuse the loaded model for hidden_states
    yield lens
    lens.close()


def exact_merged(lens: Lens, q: np.ndarray, layers: list[int]) -> list[set]:
    """Global top-K over layers from PostgreSQL's exact scan."""
    per = {layer: lens.store.knn("smol", layer, q, K, exact=True) for layer in layers}
    out = []
    for i in range(len(q)):
        cands = [(float(r.similarity[i, j]), layer, int(r.sentence_id[i, j]), int(r.position[i, j]))
                 for layer, r in per.items() for j in range(K) if np.isfinite(r.similarity[i, j])]
        cands.sort(key=lambda c: -c[0])
        out.append({c[1:] for c in cands[:K]})
    return out


def recall(lens: Lens, q: np.ndarray, layers: list[int]) -> float:
    got = lens.neighbors(q, "smol", layers=layers, k=K)
    truth = exact_merged(lens, q, layers)
    return float(np.mean([len({(n.layer, n.sentence_id, n.position) for n in r.neighbours} & t) / K
                          for r, t in zip(got, truth, strict=True)]))


def test_recall_in_distribution(smol):
    st = smol.hidden_states("smol", "Volcanic lava cools into dark rock while a brown dog watches.", [8, 16])
    q = np.concatenate([st.vectors[8][1:], st.vectors[16][1:]])
    assert recall(smol, q, [8, 16]) >= 0.95


def test_recall_out_of_distribution(smol):
    st = smol.hidden_states("smol", "A brown dog on the grass near the old volcano.", [0])
    # layer-0 input embeddings searched among mid-layer contexts: far from everything stored
    layer0 = st.vectors[0][1:]
    rnd = np.random.default_rng(0).normal(size=(32, layer0.shape[1])).astype(np.float32)
    top = smol.neighbors(rnd, "smol", layers=[16], k=1)
    assert max(r.neighbours[0].similarity for r in top) < 0.5  # really out of distribution
    assert recall(smol, layer0, [8, 16, 24]) >= 0.95
    assert recall(smol, rnd, [8, 16, 24]) >= 0.95


def test_cli_text_query(smol, db_url, monkeypatch):
    from latentlens.query import Lens as L

    monkeypatch.setattr(L, "language_model", lambda self, m, **kw: smol._models["smol"])
    r = CliRunner().invoke(
        __import__("latentlens.cli.main", fromlist=["cli"]).cli,
        ["query", "smol", "--text", "a brown dog on the grass", "--token", "dog", "--query-layer", "8",
         "-k", "3", "--json", "--database-url", db_url],
    )
    assert r.exit_code == 0, r.output
    [res] = json.loads(r.output)
    assert res["query_token"].strip() == "dog" and res["query_layer"] == 8
    assert len(res["neighbours"]) == 3
    assert any("dog" in (n["token"] or "") for n in res["neighbours"])
    r = CliRunner().invoke(
        __import__("latentlens.cli.main", fromlist=["cli"]).cli,
        ["query", "smol", "--text", "a brown dog", "--database-url", db_url],
    )
    assert r.exit_code == 0, r.output
    assert "at layer 0" in r.output and "at layer 24" in r.output
