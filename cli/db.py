"""`llens db`: create, inspect, reset and stop the database."""

from __future__ import annotations

import click
from latentlens.cli._common import (
    database_option,
    emit,
    handle_errors,
    output_format,
    output_options,
)


@click.group()
def db() -> None:
    """Manage the latentlens database.

    With no LLENS_DATABASE_URL the database is an embedded PostgreSQL in
    your data dir (`llens db status` shows where); it starts on demand and
    stops when the last llens process using it exits.

    \b
    Examples:
        llens db upgrade            # create or migrate the schema
        llens db status --json      # where it is, schema, pgvector, sizes
        psql "$(llens db url)"      # plain SQL: SELECT * FROM llens_neighbors(...)
        llens db reset --yes        # drop everything latentlens stored
        llens db stop               # stop the embedded server
    """


@db.command()
@database_option
@handle_errors
def upgrade(database_url: str | None) -> None:
    """Create the schema or migrate it to this version (idempotent).

    \b
    Examples:
        llens db upgrade
        LLENS_DATABASE_URL=postgresql://me@team-db/latentlens llens db upgrade
    """
    from latentlens import admin

    before, after = admin.upgrade(database_url)
    if before == after:
        click.echo(f"Schema is up to date (revision {after}).")
    else:
        click.echo(f"Schema upgraded from {before or 'nothing'} to revision {after}.")


@db.command()
@database_option
@output_options
@handle_errors
def status(database_url: str | None, as_json: bool, as_csv: bool) -> None:
    """Show where the database is, its schema revision and what it holds.

    \b
    Examples:
        llens db status
        llens db status --json
    """
    from latentlens import admin

    info = admin.status(database_url)
    fmt = output_format(as_json, as_csv)
    if fmt == "table":
        width = max(len(k) for k in info)
        for key, value in info.items():
            click.echo(f"{key.ljust(width)}  {'' if value is None else value}")
    else:
        emit([info], fmt)
    if not info.get("schema_current", True):
        raise click.exceptions.Exit(4)


@db.command()
@database_option
@handle_errors
def url(database_url: str | None) -> None:
    """Print the connection URL (starts the embedded server if needed).

    An embedded server started by this command keeps running after it
    exits, so psql can connect; `llens db stop` stops it.

    \b
    Example:
        psql "$(llens db url)" -c "SELECT model, layer, count(*) FROM token_context GROUP BY 1, 2"
    """
    from latentlens import admin

    click.echo(admin.url(database_url, keep_running=True))


@db.command()
@database_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@handle_errors
def reset(database_url: str | None, yes: bool) -> None:
    """Drop every latentlens table, function and row, then recreate the schema.

    \b
    Example:
        llens db reset --yes
    """
    from latentlens import admin

    target = admin.describe_target(database_url)
    if not yes:
        click.confirm(f"Delete ALL latentlens data in {target}?", abort=True)
    admin.reset(database_url)
    click.echo(f"Reset {target}: schema recreated, no data.")


@db.command()
@handle_errors
def stop() -> None:
    """Stop the embedded server (also one left running by a killed process).

    \b
    Example:
        llens db stop
    """
    from latentlens import admin

    click.echo("Stopped the embedded server." if admin.stop_embedded() else "The embedded server was not running.")
