"""`llens query`: nearest contextual neighbours of a text, raw vectors or an image."""

from __future__ import annotations

import json
import textwrap

import click
from latentlens.cli._common import (
    database_option,
    emit,
    handle_errors,
    output_format,
    output_options,
    parse_int_list,
)

CSV_COLUMNS = [
    "query_index", "query_token", "query_layer", "searched_layer", "rank", "token", "token_id",
    "similarity", "layer", "sentence_id", "position", "char_start", "char_end", "sentence",
]
SENTENCE_WIDTH = 90


@click.command()
@click.argument("model")
@click.option("--text", help="Run MODEL on this text and query each of its tokens.")
@click.option("--token", help="With --text: query only this token (e.g. dog).")
@click.option("--query-layer", "query_layer", metavar="L[,L...]",
              help="With --text: which hidden state(s) of the text to query (default: every stored layer).")
@click.option("--vectors", "vectors_path", type=click.Path(exists=True, dir_okay=False),
              help="Query raw vectors [N, D] or [D] from .npy, .npz, .pt (weights only) or .safetensors.")
@click.option("--key", help="With --vectors: the array to use in a file that holds several.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False),
              help="Query the visual tokens of an image (MODEL must be a vision-language model).")
@click.option("--visual-layers", metavar="L[,L...]", help="With --image: LLM layers of the visual tokens.")
@click.option("--patches", default="all", show_default=True,
              help='With --image: all, center, or "r,c;r,c" patch coordinates.')
@click.option("--sample", type=int, help="With --image: query N random patches.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample: random seed.")
@click.option("--prompt", help="With --image: text prompt around the image.")
@click.option("--resolution", help="With --image: resize to this (e.g. 336 or 448x448).")
@click.option("--layers", metavar="L[,L...]", help="Stored (contextual) layers to search (default: all).")
@click.option("--per-layer", is_flag=True, help="Show each searched layer's own top-k instead of the merge.")
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--mode", type=click.Choice(["auto", "exact", "ann"]), default="auto", show_default=True,
              help="auto: per layer, the cheaper of the exact scan and HNSW, HNSW only for in-distribution "
                   "queries; exact: always exact; ann: HNSW wherever an index exists (approximate).")
@click.option("--exact", is_flag=True, help="Same as --mode exact.")
@click.option("--ef-search", type=click.IntRange(min=1, max=1000), help="HNSW ef_search where HNSW answers (default: what the index measured at build time).")
@output_options
@database_option
@handle_errors
def query(model: str, text: str | None, token: str | None, query_layer: str | None,
          vectors_path: str | None, key: str | None, image: str | None, visual_layers: str | None,
          patches: str, sample: int | None, seed: int, prompt: str | None, resolution: str | None,
          layers: str | None, per_layer: bool, k: int, mode: str, exact: bool, ef_search: int | None,
          as_json: bool, as_csv: bool, database_url: str | None) -> None:
    """Nearest contextual neighbours of a text's tokens, raw vectors, or an image's patches.

    Each query vector is searched in every chosen stored layer and the hits
    are merged by cosine (each neighbour shows its layer), as the reference
    LatentLens does. By default each layer's batch goes to the cheaper of an
    exact scan (a local fp16 copy of the layer, made once) and the layer's
    HNSW index, and only queries near the stored rows may use HNSW: visual
    tokens are always answered exactly. --json says which path answered
    each result ("search"); see docs/query.md.

    \b
    Examples:
        llens query SmolLM2 --text "a brown dog on the grass"
        llens query SmolLM2 --text "a brown dog on the grass" --token dog --query-layer 8 -k 10
        llens query SmolLM2 --vectors patches.npy --layers 8,16 --per-layer --json
        llens query llava-1.5-7b --image dog.jpg --visual-layers 0,8,16 --patches center
        llens query SmolLM2 --vectors q.safetensors --key hidden --csv > hits.csv
        llens query SmolLM2 --vectors q.npy --mode exact --json | jq '.[0].search'
    """
    fmt = output_format(as_json, as_csv)
    given = [name for name, v in (("--text", text), ("--vectors", vectors_path), ("--image", image)) if v]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --text, --vectors or --image")
    if token and not text:
        raise click.UsageError("--token needs --text")
    if query_layer and not text:
        raise click.UsageError("--query-layer needs --text (with --image use --visual-layers)")
    search = parse_int_list(layers, "--layers")
    mode = "exact" if exact else mode
    from latentlens.query import Lens

    with Lens.connect(database_url) as lens:
        if image:
            _query_image(lens, model, image, visual_layers, patches, sample, seed, prompt, resolution,
                         search, k, mode, fmt)
            return
        if text:
            results = lens.query_text(
                model, text, token=token, query_layers=parse_int_list(query_layer, "--query-layer"),
                layers=search, k=k, per_layer=per_layer, mode=mode, ef_search=ef_search,
            )
        else:
            from latentlens.query import load_vectors

            results = lens.neighbors(load_vectors(vectors_path, key), model, layers=search, k=k,
                                     per_layer=per_layer, mode=mode, ef_search=ef_search)
    if fmt == "json":
        click.echo(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False))
    elif fmt == "csv":
        from latentlens.query import flat_rows

        emit(flat_rows(results), "csv", CSV_COLUMNS)
    else:
        click.echo(render(results))


def _query_image(lens, model, image, visual_layers, patches, sample, seed, prompt, resolution,
                 search, k, mode, fmt) -> None:
    from latentlens.vlm.query import query_image

    result = query_image(
        lens, model, image, visual_layers=parse_int_list(visual_layers, "--visual-layers"), layers=search,
        k=k, patches=patches, sample=sample, seed=seed, prompt=prompt, resolution=resolution,
        mode=mode,
    )
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, default=str))
    else:
        emit(result.table_rows(), fmt)


def render(results) -> str:
    """Readable blocks: one per query, neighbours with their sentence and the token marked."""
    from latentlens.cli._common import table

    out = []
    for r in results:
        who = f"token {r.query_token!r} (position {r.index})" if r.query_token is not None else f"vector {r.index}"
        at = f" at layer {r.query_layer}" if r.query_layer is not None else ""
        groups = [(None, r.neighbours)] if r.per_layer is None else sorted(r.per_layer.items())
        for searched, ns in groups:
            head = f"{who}{at}" + (f" -> searched layer {searched}" if searched is not None else "")
            rows = [{"#": i, "neighbour": n.token, "similarity": n.similarity, "layer": n.layer,
                     "sentence": _snippet(n)} for i, n in enumerate(ns, 1)]
            out.append(head + "\n" + table(rows, ["#", "neighbour", "similarity", "layer", "sentence"]))
    return "\n\n".join(out) if out else "(no results)"


def _snippet(n) -> str:
    """The sentence with the token in «», cut to SENTENCE_WIDTH around it."""
    s = n.marked_sentence("«", "»").replace("\n", " ")
    if len(s) <= SENTENCE_WIDTH:
        return s
    at = s.find("«")
    if at < 0:
        return textwrap.shorten(s, SENTENCE_WIDTH, placeholder="…")
    lo = max(0, min(at - SENTENCE_WIDTH // 3, len(s) - SENTENCE_WIDTH))
    return ("…" if lo else "") + s[lo: lo + SENTENCE_WIDTH] + ("…" if lo + SENTENCE_WIDTH < len(s) else "")
