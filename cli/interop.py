"""`llens import-index` / `llens export-index`: the reference library's index layout."""

from __future__ import annotations

import json

import click
from latentlens.cli._common import database_option, handle_errors, open_store, parse_int_list


class _Bars:
    """A tqdm progress callback (stderr) for (stage, done, total) reports; a context manager
    that closes an unfinished bar, so an error starts on its own line."""

    def __init__(self) -> None:
        self.bars: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="row", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self.bars.values():
            bar.close()


@click.command("import-index")
@click.argument("index")
@click.option("--model", "model", help="Store the rows under this model name (default: the --source's name, "
              "as llens ingest names it).")
@click.option("--source", metavar="CHECKPOINT",
              help="The model the index was built from (hub id, local dir or .gguf): recorded so --text and "
                   "--image queries of the model load it; its config gives the number of layers and must have "
                   "the index's hidden size.")
@click.option("--layers", metavar="L[,L...]", help="Import (and, from the hub, download) only these layers.")
@click.option("--revision", help="Hub: the branch, tag or commit of INDEX (default: main); the commit it "
              "resolves to is recorded.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Hub: download into this cache instead of huggingface_hub's (HF_HOME / HF_HUB_CACHE).")
@click.option("--force-download", is_flag=True, help="Hub: fetch the files again even if they are cached.")
@click.option("--hidden-size", default="auto", show_default=True,
              help="Expected vector size (auto: read it from the files).")
@click.option("--num-layers", type=int, help="The model's number of blocks (default: from --source's config, "
              "else the highest layer found).")
@click.option("--corpus-name", help="Name of the corpus made of the captions (default: the directory's name, "
              "or the hub repository id).")
@click.option("--no-progress", is_flag=True, help="No progress bars (download bytes, imported rows).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@database_option
@handle_errors
def import_index(index: str, model: str | None, source: str | None, layers: str | None, revision: str | None,
                 cache_dir: str | None, force_download: bool, hidden_size: str, num_layers: int | None,
                 corpus_name: str | None, no_progress: bool, as_json: bool, database_url: str | None) -> None:
    """Load an index built by the reference LatentLens library: a directory, or a
    repository on the Hugging Face Hub.

    INDEX is a directory holding metadata.json and layer_N/embeddings_cache.pt
    (ContextualIndex.save), or a hub id (owner/name, not a path here) in that
    layout, such as the reference's pre-built indices. From the hub only
    metadata.json and the chosen layers' files are downloaded, into
    huggingface_hub's cache (resumed if interrupted; HF_TOKEN, HF_ENDPOINT and
    HF_HUB_OFFLINE apply); the repository and commit are recorded with the
    model and corpus. Files are read with torch.load(weights_only=True,
    mmap=True); a file that needs arbitrary unpickling is refused. Captions
    become one corpus, vectors are normalised, and running it again skips rows
    already imported (so an interrupted import continues: the import is
    recorded as a run, listed by `llens runs`).

    With --source each caption is re-tokenized with the model's tokenizer,
    exactly as `llens ingest` does, so every token gets its place in its
    caption (whole words in answers), and a later `llens ingest` onto the
    model counts the imported rows in its per-token cap and prefix dedup.

    Give --source (the model the index was built from) so that `llens query
    NAME --text/--image` loads it and searches the imported rows.

    \b
    Examples:
        llens import-index McGill-NLP/contextual_embeddings-qwen2.5-vl-7b \\
            --source Qwen/Qwen2.5-VL-7B-Instruct --layers 8,16
        llens query Qwen/Qwen2.5-VL-7B-Instruct --image photo.jpg --visual-layers 8,16
        llens ingest Qwen/Qwen2.5-VL-7B-Instruct more.txt --layers 8,16   # a top-up
        llens runs --model Qwen/Qwen2.5-VL-7B-Instruct                  # the import's run
        llens import-index ./latentlens-qwen2vl-embeddings --model qwen2vl-ref
        llens import-index ./idx --model smol-ref --layers 8,16 --corpus-name captions
    """
    from latentlens.errors import InputError
    from latentlens.interop import fetch_hub_index, locate_index, resolve_source
    from latentlens.interop import import_index as run

    kind, where = locate_index(index)
    if kind == "dir" and (revision or cache_dir or force_download):
        raise InputError("--revision, --cache-dir and --force-download apply to a hub repository, "
                         f"not to the directory {index}")
    if not model and not source:  # an empty --model "" or --source "" names nothing either
        raise InputError("give --model NAME to store the index under, or --source CHECKPOINT "
                         "(the model it was built from, whose name it then gets)")
    size = None if hidden_size.strip().lower() == "auto" else _int(hidden_size, "--hidden-size")
    chosen = parse_int_list(layers, "--layers")
    src = resolve_source(source, read_config=num_layers is None) if source else None  # before any download
    if model:
        name = model
    else:
        assert src is not None  # no --model, so a --source (checked above)
        name = src.default_name
    hub = None
    if kind == "hub":
        with open_store(database_url):
            pass  # the database answers before a long download, not after it
        hub = fetch_hub_index(where, layers=chosen, revision=revision, cache_dir=cache_dir,
                              force_download=force_download, progress=not no_progress)
        where, chosen = str(hub.path), hub.layers
    with open_store(database_url) as store, _Bars() as bars:
        rep = run(store, where, name, hidden_size=size, num_layers=num_layers, corpus_name=corpus_name,
                  layers=chosen, progress=None if no_progress else bars, source=src, hub=hub,
                  echo=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
        return
    origin = f" from {hub.repo_id} at {hub.commit[:12]}" if hub is not None else ""
    if rep.already_done:
        click.echo(f"Run {rep.run} already imported{origin} into model '{rep.model}'; nothing to do.")
        return
    for layer, r in rep.layers.items():
        click.echo(f"layer {layer}: {r['written']} rows written, {r['skipped']} skipped "
                   f"(already stored or duplicate), {r['spans_found']} token spans located")
    click.echo(f"Imported{origin} into model '{rep.model}' (hidden size {rep.hidden_size}), "
               f"corpus '{rep.corpus}' ({rep.sentences} sentences): run {rep.run}.")
    pl = rep.placement
    if pl.get("unplaced"):
        how = ("with its tokenizer" if rep.source else
               "by their text (give --source to place every token with the model's tokenizer)")
        click.echo(f"{pl['unplaced']:,} of {sum(pl[k] for k in ('tokenizer', 'text', 'unplaced')):,} rows "
                   f"could not be placed in their captions {how}: their word is the token itself.")
    if rep.source:
        click.echo(f"Queries of '{rep.model}' load {rep.source}.")
    else:
        click.echo(f"No checkpoint recorded: '{rep.model}' answers --vectors queries; for --text and --image, "
                   "import again with --source CHECKPOINT.")


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

    with open_store(database_url) as store, _Bars() as bars:
        rep = run(store, model, directory, layers=parse_int_list(layers, "--layers"), overwrite=overwrite,
                  progress=bars)
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
