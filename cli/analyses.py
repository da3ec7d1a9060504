"""`llens analyses`: the team's saved analyses (queries, reports, evaluations)."""

from __future__ import annotations

import json

import click
from latentlens.cli._common import database_option, emit, handle_errors, open_store


@click.group(invoke_without_command=True)
@click.option("--model", help="Only this model's analyses.")
@click.option("--author", help="Only analyses saved by this database user.")
@click.option("--title", help="Only titles containing this text (case-insensitive).")
@click.option("--kind", type=click.Choice(["text", "vectors", "image", "eval"]), help="Only this kind.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@database_option
@click.pass_context
@handle_errors
def analyses(ctx: click.Context, model, author, title, kind, limit, as_json, database_url) -> None:
    """List saved analyses: `llens query/report --save` and every `llens eval` run.

    Each keeps its input (text, or the image / vectors with their sha256),
    parameters, result and provenance (model revision, corpora, ingest runs,
    indexes and search paths, latentlens version, who and when). Everyone
    on the database reads them; a writer deletes only its own.

    \b
    Examples:
        llens analyses                                # newest first
        llens analyses --model llava-1.5-7b-hf --author alice --title dog
        llens analyses show 12 --json | jq .provenance
        llens report --analysis 12 --out dog/         # render a saved image analysis, no model needed
        llens analyses rm 12
    """
    if ctx.invoked_subcommand is not None:
        return
    with open_store(database_url) as store:
        rows = store.list_analyses(model=model, author=author, title=title, kind=kind, limit=limit)
    if as_json:
        click.echo(json.dumps([a.to_dict(result=False) for a in rows], indent=2, default=str))
        return
    emit([{"id": a.id, "kind": a.kind, "title": a.title or "", "model": a.model, "by": a.created_by,
           "saved": a.created_at.strftime("%Y-%m-%d %H:%M")} for a in rows], "table")


@analyses.command()
@click.argument("analysis_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="The whole analysis (result and provenance) as JSON.")
@database_option
@handle_errors
def show(analysis_id: int, as_json: bool, database_url: str | None) -> None:
    """Show one analysis: what it asked, of which model, with which data, by whom."""
    with open_store(database_url) as store:
        a = store.get_analysis(analysis_id)
    if as_json:
        click.echo(json.dumps(a.to_dict(), indent=2, default=str, ensure_ascii=False))
        return
    p = a.provenance or {}
    lines = [
        f"analysis {a.id} ({a.kind}) {a.title or ''}".rstrip(),
        f"model:      {a.model}" + (f" @ {p['model']['revision']}" if p.get("model", {}).get("revision") else ""),
        f"saved by:   {a.created_by} at {a.created_at:%Y-%m-%d %H:%M:%S %Z}",
        f"input:      {json.dumps(a.input, ensure_ascii=False, default=str)[:200]}",
        f"parameters: {json.dumps(a.params, ensure_ascii=False, default=str)[:200]}",
    ]
    if p:
        corpora = ", ".join(f"{c['name']} ({c['content_hash'][:12]}, runs {c['ingest_runs']})"
                            for c in p.get("corpora", []))
        lines += [f"corpora:    {corpora or '-'}",
                  f"layers:     {_layers(p.get('layers', {}))}",
                  f"search:     {json.dumps(p.get('search'))}",
                  f"latentlens: {p.get('latentlens_version')}, database {p.get('database')}"]
    click.echo("\n".join(lines))


@analyses.command()
@click.argument("analysis_id", type=int)
@database_option
@handle_errors
def rm(analysis_id: int, database_url: str | None) -> None:
    """Delete one analysis (a writer may delete only its own; an evaluation's verdicts stay)."""
    with open_store(database_url) as store:
        store.delete_analysis(analysis_id)
    click.echo(f"deleted analysis {analysis_id}", err=True)


def _layers(layers: dict) -> str:
    return ", ".join(f"{k}: {v.get('index') or 'no index'}, {v.get('rows')} rows" for k, v in layers.items()) or "-"
