"""Option names and help that say what they mean (issue 21 c): `llens eval --judge-model` (the old
`--model` still works, hidden), and `llens ingest --help` lists every VLM family of the registry."""

from __future__ import annotations

from click.testing import CliRunner
from latentlens.cli.main import cli


def test_eval_help_names_the_judge_model():
    r = CliRunner().invoke(cli, ["eval", "--help"])
    assert r.exit_code == 0
    assert "--judge-model" in r.output
    assert "--model" not in r.output.replace("--judge-model", "")  # the old spelling is hidden


def test_eval_model_is_still_the_judge_model(monkeypatch):
    import latentlens.eval as ev

    seen = {}

    def fake_make_judge(name, **kw):
        seen.update(kw)
        raise ev.JudgeError("stop here")

    monkeypatch.setattr(ev, "make_judge", fake_make_judge)
    for flag in ("--model", "--judge-model"):
        seen.clear()
        r = CliRunner().invoke(cli, ["eval", "some-vlm", "--images", ".", "--judge", "openai-compatible",
                                     "--url", "http://127.0.0.1:9/v1", flag, "judge-x"])
        assert "stop here" in r.output and seen["model"] == "judge-x", r.output
    r = CliRunner().invoke(cli, ["eval", "some-vlm", "--images", ".", "--judge", "openai-compatible",
                                 "--model", "a", "--judge-model", "b"])
    assert r.exit_code == 2 and "old spelling of --judge-model" in r.output


def test_ingest_help_lists_every_vlm_family_of_the_registry():
    from latentlens.architectures import vlm_families

    r = CliRunner().invoke(cli, ["ingest", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())  # help text is wrapped
    for adapter in vlm_families():
        assert adapter.display_name in text, adapter.display_name
    assert "{vlm_families}" not in text
