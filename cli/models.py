"""`llens models`: what the store holds."""

from __future__ import annotations

import json

import click
from latentlens.cli._common import (
    database_option,
    emit,
    handle_errors,
    output_format,
    output_options,
)


@click.command()
@output_options
@database_option
@handle_errors
def models(as_json: bool, as_csv: bool, database_url: str | None) -> None:
    """List models with their layers, row counts, index state and corpora.

    \b
    Examples:
        llens models
        llens models --json | jq '.[].layers'
    """
    from latentlens.query import Lens

    fmt = output_format(as_json, as_csv)
    with Lens.connect(database_url) as lens:
        found = lens.models()
    if fmt == "json":
        click.echo(json.dumps(found, indent=2, ensure_ascii=False))
        return
    rows = []
    for m in found:
        kinds = sorted({li["index"] or "none" for li in m["layers"]})
        rows.append({
            "model": m["model"], "hidden": m["hidden_size"],
            "layers": ",".join(str(li["layer"]) for li in m["layers"]),
            "rows": m["rows"], "rows/layer": _per_layer(m["layers"]),
            "index": ",".join(kinds) if kinds else "none", "corpora": ",".join(m["corpora"]),
        })
    if not rows and fmt == "table":
        click.echo("No models yet: run `llens ingest MODEL CORPUS` or `llens import-index DIR --model NAME`.")
        return
    emit(rows, fmt, ["model", "hidden", "layers", "rows", "rows/layer", "index", "corpora"])


def _per_layer(layers: list[dict]) -> str:
    counts = [li["rows"] for li in layers]
    if counts and len(set(counts)) == 1:
        return f"{counts[0]} each"
    return ",".join(str(c) for c in counts)
