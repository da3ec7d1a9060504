"""`llens atlas build|find|list|drop`: thin wrappers over latentlens.atlas."""

from __future__ import annotations

import json

import click
from latentlens.cli._common import (
    database_option,
    emit,
    handle_errors,
    open_store,
    output_format,
    output_options,
    parse_int_list,
)

HIT_COLUMNS = ["path", "patch", "row", "col", "box", "layer", "similarity", "rank"]
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


@click.group()
def atlas() -> None:
    """From a word to the image patches a VLM reads as that word, across a collection.

    `llens atlas build` runs a vision-language model over a folder (or list)
    of images and stores every patch's visual token and its top-k LatentLens
    neighbours; `llens atlas find` then answers "which patches does the model
    represent as 'dog' at layer 16?" from the database. See docs/atlas.md.

    \b
    Examples:
        llens ingest llava-hf/llava-1.5-7b-hf captions.txt --layers 8,16,24
        llens atlas build llava-hf/llava-1.5-7b-hf --images ./photos --layers 16 --name photos
        llens atlas find photos --word dog --layer 16 -k 50
        llens atlas find photos --text "a dog on grass" --token dog --layer 16 --html dogs.html
    """


@atlas.command()
@click.argument("model")
@click.option("--images", required=True, metavar="DIR|LIST",
              help="A folder of images (searched recursively) or a text file listing image paths, one a line.")
@click.option("--layers", metavar="L[,L...]", help="Visual layers to store (default: the model's stored layers).")
@click.option("--name", help="Atlas name (default: the folder's or list's name).")
@click.option("-k", "--top-k", "k", type=click.IntRange(1, 100), default=10, show_default=True,
              help="LatentLens neighbours stored per patch and layer.")
@click.option("--text-layers", metavar="L[,L...]", help="Stored text layers searched (default: all).")
@click.option("--prompt", help="Text prompt around each image (default: the query's).")
@click.option("--resolution", help="Resize to this (e.g. 336 or 448x448), as llens query --image.")
@click.option("--shard", default=None, metavar="I/N", help="Process shard I of N (run N of these at once).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="float32", show_default=True)
@click.option("--device", help="torch device (default: cuda if available, else cpu).")
@click.option("--no-index", is_flag=True, help="Don't build the ANN indexes at the end.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@database_option
@handle_errors
def build(model: str, images: str, layers: str | None, name: str | None, k: int, text_layers: str | None,
          prompt: str | None, resolution: str | None, shard: str | None, dtype: str, device: str | None,
          no_index: bool, no_progress: bool, as_json: bool, database_url: str | None) -> None:
    """Run the VLM MODEL over a collection and store each patch's visual token and neighbours.

    MODEL is a stored model (`llens ingest` of the VLM: its text side is
    what the patches are compared with). Images are stored once per content
    (sha256), with their path and size; patches with their box in image
    pixels. Re-running the same command continues an interrupted build;
    --shard i/n splits the images between processes.

    \b
    Examples:
        llens atlas build llava-hf/llava-1.5-7b-hf --images ./photos --layers 8,16 --name photos
        llens atlas build Qwen/Qwen2.5-VL-3B-Instruct --images list.txt --shard 0/2 --device cuda:0
    """
    from latentlens import atlas as atl
    from latentlens.ingest import parse_shard
    from latentlens.query import Lens

    opts = atl.AtlasOptions(
        layers=parse_int_list(layers, "--layers"), text_layers=parse_int_list(text_layers, "--text-layers"),
        k=k, prompt=prompt, resolution=resolution, shard=parse_shard(shard), build_index=not no_index,
        progress=not no_progress, dtype=dtype, device=device)
    with Lens.connect(database_url) as lens:
        result = atl.build(lens, model, images, name=name, options=opts, echo=_err)
    s = result.summary()
    if as_json:
        click.echo(json.dumps(s, indent=2, default=str))
        return
    if s["already_done"]:
        click.echo(f"Atlas '{s['atlas']}' already holds every image of this collection (shard {s['shard']}: "
                   f"{s['images_in_shard']:,} images, stored by run {s['run']}); nothing to do.")
        return
    c = s["counters"]
    click.echo(
        f"Atlas '{s['atlas']}' ({s['model']}, layers {','.join(map(str, s['layers']))}, k {s['k']}): run {s['run']} "
        f"{s['status']}, shard {s['shard']}: {s['images_done']:,} images ({s['patches_done']:,} patches) stored "
        f"in {s['duration_s']}s, {s['already_stored']:,} already there, {c.get('unreadable', 0):,} unreadable, "
        f"{c.get('duplicates_in_collection', 0):,} duplicate files; the atlas holds {s['atlas_images']:,} images.")


@atlas.command()
@click.argument("name")
@click.option("--word", help="Patches whose stored top-k words include this word (case-insensitive).")
@click.option("--text", help="Patches nearest a token's contextual embedding in this text.")
@click.option("--token", help="With --text: the token to use (default: the text's last token).")
@click.option("--layer", type=int, help="One visual layer (default: every layer of the atlas).")
@click.option("-k", "--top-k", "k", type=click.IntRange(1, 10_000), default=50, show_default=True,
              help="Patches to return.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Skip this many (paging).")
@click.option("--max-rank", type=click.IntRange(min=1), help="With --word: only neighbours up to this rank.")
@click.option("--mode", type=click.Choice(["auto", "exact", "ann"]), default="auto", show_default=True,
              help="With --text: auto answers exactly unless the leaf has an ANN index and the query is near "
                   "the stored visual tokens; exact; ann (HNSW wherever indexed).")
@click.option("--html", "html_out", type=click.Path(dir_okay=True), metavar="OUT",
              help="Also write a gallery: each patch's crop and its image with the box.")
@output_options
@database_option
@handle_errors
def find(name: str, word: str | None, text: str | None, token: str | None, layer: int | None, k: int,
         offset: int, max_rank: int | None, mode: str, html_out: str | None, as_json: bool, as_csv: bool,
         database_url: str | None) -> None:
    """Find the patches of atlas NAME that mean a word.

    --word reads the stored neighbours (patches whose top-k words include
    it, best similarity first); --text runs the model's language model on
    the text and returns the stored visual tokens nearest the token's
    contextual embedding at that layer.

    \b
    Examples:
        llens atlas find photos --word dog --layer 16
        llens atlas find photos --word dog --max-rank 3 --json
        llens atlas find photos --text "a dog on grass" --token dog --layer 16 --html dogs.html
    """
    from latentlens import atlas as atl

    fmt = output_format(as_json, as_csv)
    if (word is None) == (text is None):
        raise click.UsageError("give --word or --text (one of them)")
    if token is not None and text is None:
        raise click.UsageError("--token needs --text")
    how: dict = {}
    if word is not None:
        with open_store(database_url) as store:
            hits = atl.find_word(store, name, word, layer=layer, k=k, offset=offset, max_rank=max_rank)
        title = f"atlas {name}: '{word}'" + (f" at layer {layer}" if layer is not None else "")
    else:
        from latentlens.query import Lens

        if offset:
            raise click.UsageError("--offset works with --word (a --text search returns its top -k)")
        with Lens.connect(database_url) as lens:
            hits, how = atl.find_text(lens, name, text or "", token=token, layer=layer, k=k, mode=mode)
        title = f"atlas {name}: '{how['token']}' in \"{text}\""
    if html_out:
        path = atl.write_gallery(hits, html_out, title=title)
        click.echo(f"Wrote {path} ({len(hits)} patches).", err=True)
    rows = [h.to_dict() for h in hits]
    if fmt == "json":
        click.echo(json.dumps({"atlas": name, "word": word, "text": text, **how, "hits": rows}, indent=2,
                              default=str, ensure_ascii=False))
        return
    for r in rows:
        r["path"] = _short(r["path"])
        r["box"] = "{:.0f},{:.0f},{:.0f},{:.0f}".format(*r["box"])
    emit(rows, fmt, HIT_COLUMNS)


@atlas.command("list")
@output_options
@database_option
@handle_errors
def list_(as_json: bool, as_csv: bool, database_url: str | None) -> None:
    """List atlases: model, layers, images, patches per layer, index.

    \b
    Example:
        llens atlas list --json
    """
    fmt = output_format(as_json, as_csv)
    with open_store(database_url) as store:
        rows = [a.to_dict() for a in store.list_atlases()]
    emit(rows, fmt, None if fmt == "json" else ["atlas", "model", "layers", "images", "created_by"])


@atlas.command()
@click.argument("name")
@output_options
@database_option
@handle_errors
def runs(name: str, as_json: bool, as_csv: bool, database_url: str | None) -> None:
    """List the builds of atlas NAME: shard, status, images, patches, duration, error.

    A run whose status is 'running' but whose process is gone was killed: run the
    same build command again to continue it.

    \b
    Example:
        llens atlas runs photos --json
    """
    fmt = output_format(as_json, as_csv)
    with open_store(database_url) as store:
        info = store.get_atlas(name)
        rows = [{"id": r.id, "shard": f"{r.shard}/{r.num_shards}", "status": r.status,
                 "images": f"{r.images_done}/{r.images_total if r.images_total is not None else '?'}",
                 "images_done": r.images_done, "images_total": r.images_total, "patches": r.patches_done,
                 "duration_s": round(r.duration_s, 1), "error": r.error, "source": r.source,
                 "counters": r.counters, "host": r.hostname, "pid": r.pid, "started_at": r.started_at}
                for r in sorted(store.atlas_runs(info), key=lambda r: r.id)]
    emit(rows, fmt, None if fmt == "json" else ["id", "shard", "status", "images", "patches", "duration_s", "error"])


@atlas.command()
@click.argument("name")
@click.option("--yes", is_flag=True, help="Don't ask.")
@database_option
@handle_errors
def drop(name: str, yes: bool, database_url: str | None) -> None:
    """Delete atlas NAME: its visual tokens, neighbours, images and runs (not the image files).

    \b
    Example:
        llens atlas drop photos --yes
    """
    with open_store(database_url) as store:
        info = store.get_atlas(name)
        if not yes:
            click.confirm(f"Drop atlas '{name}' ({info.images:,} images)?", abort=True)
        store.drop_atlas(name)
    click.echo(f"Dropped atlas '{name}'.")


def _short(path: str, width: int = 60) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1):]


def _err(msg: str) -> None:
    click.echo(msg, err=True)
