"""End to end with a real model: SmolLM2-135M-Instruct (GGUF) over 40 sentences.

`llens ingest` (CLI, loading the GGUF through the dequantized-weights cache)
must store exactly the rows an independent per-sentence computation with
``output_hidden_states=True`` gives under the same rules, with the same
vectors (cosine >= 0.999 after halfvec storage).
"""

from __future__ import annotations

import json

import pytest
from _ingest_ref import compare, expected_rows
from click.testing import CliRunner
from latentlens.cli.main import cli

from latentlens.models import load_language_model
from latentlens.models.tiny import sample_corpus_path

pytestmark = pytest.mark.slow
N = 40
LAYERS = [1, 15, 29, 30]


def test_smollm2_ingest_matches_independent_computation(db_url, smollm2_gguf, tmp_path, llens_dirs):
    lines = sample_corpus_path().read_text(encoding="utf-8").splitlines()
    texts = lines[::25][:N]  # a spread of concepts
    corpus = tmp_path / "slice.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")

    lm = load_language_model(str(smollm2_gguf))  # fills the GGUF cache
    assert (lm.name, lm.num_layers, lm.hidden_size, lm.bos_token_id) == (
        "SmolLM2-135M-Instruct.Q4_1", 30, 576, None)
    assert list((llens_dirs["cache"] / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))

    r = CliRunner().invoke(cli, ["ingest", str(smollm2_gguf), str(corpus), "--layers",
                                 ",".join(map(str, LAYERS)), "--max-contexts-per-token", "3",
                                 "--batch-size", "16", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["status"] == "done" and s["sentences_done"] == N

    exp = expected_rows(lm, texts, LAYERS, skip=2, cap=3)
    assert s["rows_written"] == len(exp) and len(exp) > 100
    compare(db_url, lm.name, exp, LAYERS, min_cos=0.999)
