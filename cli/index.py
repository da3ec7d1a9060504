"""`llens index build|drop`: ANN indexes of a model's layers (latentlens.store)."""

from __future__ import annotations

import click
from latentlens.cli._common import database_option, handle_errors, open_store, parse_int_list


@click.group()
def index():
    """Build or drop the ANN (HNSW) indexes of a model's layers.

    Queries without an index use exact search. `llens ingest` builds them at
    the end of a run; a server whose pgvector failed latentlens' ANN probe
    (llens.ann_index = off) refuses with a clear error.

    \b
    Examples:
        llens index build HuggingFaceTB/SmolLM2-135M
        llens index build HuggingFaceTB/SmolLM2-135M --layers 8,16 --m 32
        llens index calibrate HuggingFaceTB/SmolLM2-135M
        llens index drop HuggingFaceTB/SmolLM2-135M
    """


@index.command()
@click.argument("model")
@click.option("--layers", default=None, metavar="LIST", help="Layers (default: every stored layer).")
@click.option("--m", "m", type=click.IntRange(2, 100), help="HNSW m (links per node)  [default: 16]")
@click.option("--ef-construction", type=click.IntRange(4, 1000), help="HNSW ef_construction  [default: 64]")
@click.option("--kind", type=click.Choice(["hnsw_halfvec", "hnsw_binary", "diskann"]), default=None,
              help="Index kind  [default: hnsw_halfvec up to 4000 dimensions; above, hnsw_binary, "
                   "or diskann (pgvectorscale) where hnsw_binary falls short of its recall target]")
@click.option("--maintenance-work-mem", default="1GB", show_default=True, metavar="SIZE",
              help="PostgreSQL memory for the build (set for the building transaction only; "
                   "each of --jobs builds gets this much).")
@click.option("--jobs", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Layers built at once, each on its own connection (a single build leaves cores idle "
                   "in its serial phases).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@database_option
@handle_errors
def build(model, layers, m, ef_construction, kind, maintenance_work_mem, jobs, no_progress, database_url):
    """Build (or rebuild) the ANN index of each layer of MODEL.

    Queries keep answering during a rebuild: the new index is built beside
    the old one and swapped in at the end. Writes to the layer being
    indexed wait until its build is done.

    Layers wider than 4000 dimensions (pgvector's HNSW limit for halfvec)
    get HNSW over the binary quantization, replaced by pgvectorscale's
    StreamingDiskANN (where the server has it) when its measured recall
    falls short: better recall, 16x slower to build. Both re-rank their
    candidates by exact cosine.

    \b
    Examples:
        llens index build HuggingFaceTB/SmolLM2-135M --layers 8,16
        llens index build HuggingFaceTB/SmolLM2-135M --jobs 4
        llens index build meta-llama/Llama-3.1-8B --kind diskann
    """
    from latentlens.ingest import IndexBuildProgress, build_leaves

    wanted = parse_int_list(layers, "--layers")
    with open_store(database_url) as store:
        info = store.get_model(model)
        todo = wanted or info.layer_numbers
        bar = IndexBuildProgress(enabled=not no_progress, layers=todo, jobs=jobs)
        try:
            done = build_leaves(store, info, todo, bar, jobs, m=m, ef_construction=ef_construction, kind=kind,
                                maintenance_work_mem=maintenance_work_mem)
        finally:
            bar.close()
        calibrated = store.may_calibrate()
    click.echo(f"Built ANN indexes of '{model}' layers {','.join(map(str, done))}.")
    if not calibrated:
        click.echo(f"Their recall is not measured: only the database's owner records it (`llens index calibrate "
                   f"{model}` as the owner).")


@index.command()
@click.argument("model")
@click.option("--layers", default=None, metavar="LIST", help="Layers (default: every indexed layer).")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
@database_option
@handle_errors
def calibrate(model, layers, as_json, database_url):
    """Measure each index's recall@10 against exact search and record the ef_search it needs.

    `llens index build` (and ingest) do this after every build; run it for
    indexes built by an older latentlens. Queries are stored rows moved by
    noise (in-distribution: where HNSW is meant to be used); the smallest
    ef_search reaching recall 0.97 is stored with the index and used by every
    client. An index that cannot reach it is never used by the default search.

    \b
    Example:
        llens index calibrate HuggingFaceTB/SmolLM2-135M --json
    """
    import json

    wanted = parse_int_list(layers, "--layers")
    with open_store(database_url) as store:
        info = store.get_model(model)
        todo = wanted or [li.layer for li in info.layers if li.index_kind]
        out = {}
        for layer in todo:
            if not info.layer(layer).index_kind:
                raise click.UsageError(f"layer {layer} of '{model}' has no ANN index: build it first")
            out[layer] = store.calibrate_index(info, layer)
    if as_json:
        click.echo(json.dumps({str(k): v for k, v in out.items()}, indent=2))
    else:
        for layer, r in out.items():
            ok = "ok" if r.get("recall_ok") else "below target: the default search will not use it"
            click.echo(f"layer {layer}: recall@10 {r.get('recall_at_10')} at ef_search {r.get('ef_search')} ({ok})")


@index.command()
@click.argument("model")
@click.option("--layers", default=None, metavar="LIST", help="Layers (default: every stored layer).")
@database_option
@handle_errors
def drop(model, layers, database_url):
    """Drop the ANN index of each layer of MODEL (queries fall back to exact search).

    \b
    Example:
        llens index drop HuggingFaceTB/SmolLM2-135M --layers 8
    """
    wanted = parse_int_list(layers, "--layers")
    with open_store(database_url) as store:
        done = store.drop_index(model, wanted)
    click.echo(f"Dropped ANN indexes of '{model}' layers {','.join(map(str, done))}.")
