"""`llens query`: nearest contextual neighbours of a text, raw vectors or an image."""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING

import click
from latentlens.cli._common import (
    database_option,
    emit,
    handle_errors,
    output_format,
    output_options,
    parse_int_list,
)

if TYPE_CHECKING:
    from latentlens.search import Mode

CSV_COLUMNS = [
    "method", "query_index", "query_token", "query_layer", "searched_layer", "rank", "token", "word",
    "token_id", "similarity", "layer", "sentence_id", "position", "char_start", "char_end", "sentence",
]
SENTENCE_WIDTH = 90


@click.command()
@click.argument("model")
@click.option("--text", help="Run MODEL on this text and query each of its tokens.")
@click.option("--token", help="With --text: query only this token (e.g. dog).")
@click.option("--query-layer", "query_layer", metavar="L[,L...]",
              help="With --text: which hidden state(s) of the text to query (default: every stored layer). "
                   "With --vectors: the one layer the vectors come from (LogitLens needs it).")
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
@click.option("--method", "method", default="latentlens", show_default=True, metavar="M[,M...]",
              help="latentlens (contextual neighbours from the store), logitlens (final norm + LM head: "
                   "top tokens with probability), embeddinglens (cosine with the input embeddings), "
                   "or all. The baselines need only the model, not the database.")
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--mode", type=click.Choice(["auto", "exact", "ann"]), default="auto", show_default=True,
              help="auto: per layer, the cheaper of the exact scan and HNSW, HNSW only for in-distribution "
                   "queries; exact: always exact; ann: HNSW wherever an index exists (approximate).")
@click.option("--exact", is_flag=True, help="Same as --mode exact.")
@click.option("--ef-search", type=click.IntRange(min=1, max=1000), help="HNSW ef_search where HNSW answers (default: what the index measured at build time).")
@click.option("--device", default="auto", show_default=True,
              help="Where the exact scan runs: auto (cuda when present), cpu or cuda[:N]; on a GPU each "
                   "searched layer is kept in its memory (float16) for the process's later queries.")
@click.option("--save", is_flag=True, help="Save the result as an analysis the team can list and reopen.")
@click.option("--title", help="With --save: a title for the analysis.")
@output_options
@database_option
@handle_errors
def query(model: str, text: str | None, token: str | None, query_layer: str | None,
          vectors_path: str | None, key: str | None, image: str | None, visual_layers: str | None,
          patches: str, sample: int | None, seed: int, prompt: str | None, resolution: str | None,
          layers: str | None, per_layer: bool, method: str, k: int, mode: Mode, exact: bool,
          ef_search: int | None, device: str, save: bool, title: str | None, as_json: bool, as_csv: bool,
          database_url: str | None) -> None:
    """Nearest contextual neighbours of a text's tokens, raw vectors, or an image's patches.

    Each query vector is searched in every chosen stored layer and the hits
    are merged by cosine (each neighbour shows its layer), as the reference
    LatentLens does. By default each layer's batch goes to the cheaper of an
    exact scan (a local fp16 copy of the layer, made once) and the layer's
    HNSW index, and only queries near the stored rows may use HNSW: visual
    tokens are always answered exactly. --json says which path answered
    each result ("search"); see docs/query.md.

    --method adds the baselines LatentLens is compared with: LogitLens and
    EmbeddingLens read each hidden state through the model's own
    vocabulary. Without latentlens, MODEL may be any loadable model (a
    local dir, a .gguf, a hub id) and no database is needed.

    \b
    Examples:
        llens query SmolLM2 --text "a brown dog on the grass"
        llens query SmolLM2 --text "a brown dog on the grass" --token dog --query-layer 8 -k 10
        llens query SmolLM2 --vectors patches.npy --layers 8,16 --per-layer --json
        llens query llava-1.5-7b --image dog.jpg --visual-layers 0,8,16 --patches center
        llens query SmolLM2 --vectors q.safetensors --key hidden --csv > hits.csv
        llens query SmolLM2 --vectors q.npy --mode exact --json | jq '.[0].search'
        llens query SmolLM2 --vectors patches.npy --mode exact --device cuda
        llens query SmolLM2 --text "a brown dog" --token dog --query-layer 8 --method all
        llens query ./tiny-llava --image dog.jpg --visual-layers 2 --method logitlens,embeddinglens
        llens query llava-1.5-7b --image dog.jpg --save --title "dog, centre patches"
    """
    fmt = output_format(as_json, as_csv)
    given = [name for name, v in (("--text", text), ("--vectors", vectors_path), ("--image", image)) if v]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --text, --vectors or --image")
    if token and not text:
        raise click.UsageError("--token needs --text")
    if title and not save:
        raise click.UsageError("--title needs --save")
    if query_layer and image:
        raise click.UsageError("--query-layer is for --text and --vectors (with --image use --visual-layers)")
    from latentlens.lenses import parse_methods

    methods = parse_methods(method)
    search = parse_int_list(layers, "--layers")
    query_layers = parse_int_list(query_layer, "--query-layer")
    if vectors_path and query_layers and len(query_layers) != 1:
        raise click.UsageError("with --vectors, --query-layer is the one layer the vectors come from")
    mode = "exact" if exact else mode
    vectors = None
    if vectors_path:
        from latentlens.query import load_vectors

        vectors = load_vectors(vectors_path, key)
    if "latentlens" not in methods:
        results = _baselines_only(model, text, token, query_layers, vectors, image, visual_layers,
                                  patches, sample, seed, prompt, resolution, k, methods, database_url)
    else:
        from latentlens.query import Lens

        if device != "auto":  # (auto needs no torch: a SQL-only install scans in PostgreSQL)
            from latentlens.scan import scan_device

            scan_device(device)  # a bad --device fails before any work (exit 2)
        with Lens.connect(database_url, scan_device=device) as lens:
            if image:
                results = _query_image(lens, model, image, visual_layers, patches, sample, seed, prompt,
                                       resolution, search, k, mode, methods)
            elif text:
                results = lens.query_text(
                    model, text, token=token, query_layers=query_layers, layers=search, k=k,
                    per_layer=per_layer, mode=mode, ef_search=ef_search, methods=methods,
                )
            else:
                results = lens.query_vectors(
                    vectors, model, methods=methods,
                    query_layer=query_layers[0] if query_layers else None, layers=search, k=k,
                    per_layer=per_layer, mode=mode, ef_search=ef_search,
                )
    if image:
        _emit_image(results, fmt)
    elif fmt == "json":
        click.echo(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False))
    elif fmt == "csv":
        from latentlens.query import flat_rows

        emit(flat_rows(results), "csv", CSV_COLUMNS)
    else:
        click.echo(render(results))
    if save:
        params = {"methods": methods, "k": k, "layers": search, "query_layers": query_layers,
                  "token": token, "mode": mode, "per_layer": per_layer, "visual_layers": visual_layers,
                  "patches": patches, "sample": sample, "seed": seed, "prompt": prompt,
                  "resolution": resolution}
        analysis_id = _save(database_url, model, text, vectors, vectors_path, image, results,
                            {k_: v for k_, v in params.items() if v is not None}, title)
        click.echo(f"saved as analysis {analysis_id} (llens analyses show {analysis_id})", err=True)


def _save(database_url, model, text, vectors, vectors_path, image, results, params, title) -> int:
    from pathlib import Path as _Path

    from latentlens.cli._common import open_store

    from latentlens import analyses

    with open_store(database_url) as store:
        if image:
            data = _Path(image).read_bytes()
            return analyses.save_image(store, results, data, params=params, image_name=_Path(image).name,
                                       title=title)
        if text:
            return analyses.save_text(store, model, text, results, params=params, title=title)
        return analyses.save_vectors(store, model, vectors, results, params=params, source=vectors_path,
                                     title=title)


def _baselines_only(model, text, token, query_layers, vectors, image, visual_layers, patches,
                    sample, seed, prompt, resolution, k, methods, database_url):
    """LogitLens / EmbeddingLens: the model only. The store is asked (if it answers) for
    the source `llens ingest` recorded under MODEL; a path or an unknown name loads as given."""
    from latentlens.query import (
        baseline_language_model,
        baseline_vlm_source,
        text_lenses,
        vector_lenses,
    )

    if image:
        from latentlens.vlm.query import query_image

        source, vls = baseline_vlm_source(model, parse_int_list(visual_layers, "--visual-layers"), database_url)
        return query_image(None, source, image, visual_layers=vls, k=k, patches=patches, sample=sample,
                           seed=seed, prompt=prompt, resolution=resolution, methods=methods)
    lm, stored = baseline_language_model(model, database_url)
    if text:
        if query_layers is None:
            if stored is None or not stored.layer_numbers:
                raise click.UsageError("choose --query-layer (MODEL has no stored layers to default to)")
            query_layers = stored.layer_numbers
        return text_lenses(lm, text, query_layers=query_layers, token=token, k=k, methods=methods)
    return vector_lenses(lm, vectors, k=k, methods=methods,
                         query_layer=query_layers[0] if query_layers else None)


def _query_image(lens, model, image, visual_layers, patches, sample, seed, prompt, resolution,
                 search, k, mode, methods):
    from latentlens.vlm.query import query_image

    return query_image(
        lens, model, image, visual_layers=parse_int_list(visual_layers, "--visual-layers"), layers=search,
        k=k, patches=patches, sample=sample, seed=seed, prompt=prompt, resolution=resolution,
        mode=mode, methods=methods,
    )


def _emit_image(result, fmt) -> None:
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, default=str))
    elif fmt == "csv":
        emit(result.table_rows(), fmt)
    else:
        click.echo(render_image(result))


def render_image(result) -> str:
    """Like the text table: one block per (visual layer, patch), distinct contexts, « » and short sentences."""
    out = []
    for vl in result.layers:
        for p in vl.patches:
            head = f"visual layer {vl.visual_layer}, patch {p.patch_idx} (row {p.row}, col {p.col})"
            if p.neighbours or p.contexts:
                out.append(head + "\n" + _neighbour_table(p.distinct()))
            for method, hits in (p.lenses or {}).items():
                out.append(f"{head} -- {method}\n" + _lens_table(method, hits))
    return "\n\n".join(out) if out else "(no results)"


def _layers(n) -> str:
    """The layers a distinct context was found in ("1,2"), or its one layer."""
    return ",".join(str(x) for x in (n.found_in or [n.layer]))


def render(results) -> str:
    """Readable blocks: one per query, neighbours with their sentence and the token marked."""
    out = []
    for r in results:
        who = f"token {r.query_token!r} (position {r.index})" if r.query_token is not None else f"vector {r.index}"
        at = f" at layer {r.query_layer}" if r.query_layer is not None else ""
        # merged lists show each context once (with every layer it was found in); --per-layer is raw
        groups = [(None, r.distinct())] if r.per_layer is None else sorted(r.per_layer.items())
        for searched, ns in groups if (r.neighbours or r.per_layer or not r.lenses) else []:
            head = f"{who}{at}" + (f" -> searched layer {searched}" if searched is not None else "")
            out.append(head + "\n" + _neighbour_table(ns))
        for method, hits in (r.lenses or {}).items():
            out.append(f"{who}{at} -- {method}\n" + _lens_table(method, hits))
    return "\n\n".join(out) if out else "(no results)"


def _neighbour_table(ns) -> str:
    from latentlens.cli._common import table

    rows = [{"#": i, "neighbour": n.token, "word": n.word, "similarity": n.similarity,
             "layers": _layers(n), "sentence": _snippet(n)} for i, n in enumerate(ns, 1)]
    return table(rows, ["#", "neighbour", "word", "similarity", "layers", "sentence"])


def _lens_table(method: str, hits) -> str:
    from latentlens.cli._common import table

    from latentlens.lenses import SCORES

    score = SCORES[method]
    rows = [{"#": i, "token": h.token, "token_id": h.token_id, score: h.score} for i, h in enumerate(hits, 1)]
    return table(rows, ["#", "token", "token_id", score])


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
