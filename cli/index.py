"""`llens index build|drop`: ANN indexes of a model's layers (latentlens.store)."""

from __future__ import annotations

import click
from latentlens.cli._common import database_option, handle_errors, open_store, parse_int_list


@click.group()
def index():
    """Build or drop the ANN (HNSW) indexes of a model's layers.

    Queries without an index use exact search. Servers whose pgvector cannot
    build indexes on their CPU (the embedded one on CPUs without AVX-512)
    refuse with a clear error.

    \b
    Examples:
        llens index build HuggingFaceTB/SmolLM2-135M
        llens index build HuggingFaceTB/SmolLM2-135M --layers 8,16 --m 32
        llens index drop HuggingFaceTB/SmolLM2-135M
    """


@index.command()
@click.argument("model")
@click.option("--layers", default=None, metavar="LIST", help="Layers (default: every stored layer).")
@click.option("--m", "m", default=16, show_default=True, type=int, help="HNSW m (links per node).")
@click.option("--ef-construction", default=64, show_default=True, type=int, help="HNSW ef_construction.")
@database_option
@handle_errors
def build(model, layers, m, ef_construction, database_url):
    """Build (or rebuild) the ANN index of each layer of MODEL.

    \b
    Example:
        llens index build HuggingFaceTB/SmolLM2-135M --layers 8,16
    """
    wanted = parse_int_list(layers, "--layers")
    with open_store(database_url) as store:
        done = store.build_index(
            model, wanted, m=m, ef_construction=ef_construction,
            progress=lambda layer: click.echo(f"indexed layer {layer}", err=True),
        )
    click.echo(f"Built ANN indexes of '{model}' layers {','.join(map(str, done))}.")


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
