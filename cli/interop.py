"""`llens import-index` / `llens export-index`: the reference library's index layout."""

from __future__ import annotations

import json

import click
from latentlens.cli._common import database_option, handle_errors, open_store, parse_int_list


def _bar():
    """A tqdm progress callback (stderr) for (stage, done, total) reports."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def report(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="row", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


@click.command("import-index")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model", required=True, help="Store the index under this model name.")
@click.option("--hidden-size", default="auto", show_default=True,
              help="Expected vector size (auto: read it from the files).")
@click.option("--num-layers", type=int, help="The model's number of blocks (default: the highest layer found).")
@click.option("--corpus-name", help="Name of the corpus made of the captions (default: the directory's name).")
@click.option("--layers", metavar="L[,L...]", help="Import only these layers.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@database_option
@handle_errors
def import_index(directory: str, model: str, hidden_size: str, num_layers: int | None,
                 corpus_name: str | None, layers: str | None, as_json: bool, database_url: str | None) -> None:
    """Load an index saved by the reference LatentLens library (ContextualIndex.save).

    DIRECTORY holds metadata.json and layer_N/embeddings_cache.pt. Files are
    read with torch.load(weights_only=True, mmap=True); a file that needs
    arbitrary unpickling is refused. Captions become one corpus, vectors are
    normalised, and running it again skips rows already imported.

    \b
    Examples:
        llens import-index ./latentlens-qwen2vl-embeddings --model qwen2vl-ref
        llens import-index ./idx --model smol-ref --layers 8,16 --corpus-name captions
    """
    from latentlens.interop import import_index as run

    size = None if hidden_size.strip().lower() == "auto" else _int(hidden_size, "--hidden-size")
    with open_store(database_url) as store:
        rep = run(store, directory, model, hidden_size=size, num_layers=num_layers, corpus_name=corpus_name,
                  layers=parse_int_list(layers, "--layers"), progress=_bar())
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
        return
    for layer, r in rep.layers.items():
        click.echo(f"layer {layer}: {r['written']} rows written, {r['skipped']} skipped "
                   f"(already stored or duplicate), {r['spans_found']} token spans located")
    click.echo(f"Imported into model '{rep.model}' (hidden size {rep.hidden_size}), "
               f"corpus '{rep.corpus}' ({rep.sentences} sentences).")


@click.command("export-index")
@click.argument("model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--layers", metavar="L[,L...]", help="Export only these layers (default: all with rows).")
@click.option("--overwrite", is_flag=True, help="Replace an index already in DIRECTORY.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@database_option
@handle_errors
def export_index(model: str, directory: str, layers: str | None, overwrite: bool, as_json: bool,
                 database_url: str | None) -> None:
    """Write MODEL's stored embeddings in the reference LatentLens layout.

    The result loads with the reference library's
    ContextualIndex.from_directory(DIRECTORY). One layer is held in memory
    at a time (float16, as stored).

    \b
    Examples:
        llens export-index HuggingFaceTB/SmolLM2-135M ./smol-index
        llens export-index SmolLM2 ./idx --layers 8,16 --overwrite
    """
    from latentlens.interop import export_index as run

    with open_store(database_url) as store:
        rep = run(store, model, directory, layers=parse_int_list(layers, "--layers"), overwrite=overwrite,
                  progress=_bar())
    if as_json:
        click.echo(json.dumps(rep, indent=2))
        return
    rows = ", ".join(f"layer {k}: {v}" for k, v in rep["layers"].items())
    click.echo(f"Exported '{rep['model']}' to {rep['directory']} ({rows} rows).")


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected an integer or 'auto', got {value!r}", param_hint=name) from None
