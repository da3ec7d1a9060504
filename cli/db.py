"""`llens db`: create, inspect, reset and stop the database."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from latentlens.cli._common import (
    database_option,
    emit,
    handle_errors,
    output_format,
    output_options,
)

if TYPE_CHECKING:
    from latentlens.roles import Kind


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
        llens db grant-reader alice # on a team server: alice may query
        llens db users              # the owner, writers and readers
        llens db distribute         # on a Citus coordinator: spread the store over its workers
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

    A password in the URL is never printed: it is left out, and psql (any
    libpq client) then reads it from PGPASSWORD or ~/.pgpass. The embedded
    server and passwordless URLs print whole, so `psql "$(llens db url)"`
    just works. An embedded server started by this command keeps running
    after it exits, so psql can connect; `llens db stop` stops it.

    \b
    Examples:
        psql "$(llens db url)" -c "SELECT model, layer, count(*) FROM token_context GROUP BY 1, 2"
        PGPASSWORD=... psql "$(llens db url)"     # a team server whose URL has a password
    """
    from latentlens import admin, roles

    shown, had_password = roles.url_without_password(admin.url(database_url, keep_running=True))
    click.echo(shown)
    if had_password:
        click.echo("(password left out: psql reads it from PGPASSWORD or ~/.pgpass)", err=True)


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
@database_option
@click.option("--shards", "shard_count", type=click.IntRange(1, 64000), default=32, show_default=True,
              help="Shards of token_embedding (Citus' shard_count), e.g. 2-4 per worker core.")
@output_options
@handle_errors
def distribute(database_url: str | None, shard_count: int, as_json: bool, as_csv: bool) -> None:
    """Distribute the store over a Citus cluster (once, right after `llens db upgrade`).

    Run against the coordinator of a Citus cluster whose nodes all have the
    citus and vector extensions: token_embedding is hash-distributed by
    sentence_id, the model, vocabulary and corpus tables become reference
    tables (docs/scaling.md). Running it again does nothing; a server without
    Citus is refused with one line (exit 2).

    \b
    Examples:
        LLENS_DATABASE_URL=postgresql://me@coordinator/latentlens llens db upgrade
        LLENS_DATABASE_URL=postgresql://me@coordinator/latentlens llens db distribute --shards 32
    """
    from latentlens.store import Store

    with Store.open(database_url) as store:
        steps = store.distribute(shard_count)
    fmt = output_format(as_json, as_csv)
    if fmt == "table":
        for step in steps:
            click.echo(step)
        click.echo("Distributed." if steps else "Already distributed: nothing to do.")
    else:
        emit([{"step": s} for s in steps], fmt, ["step"])


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


# ---------------------------------------------------------------------------
# team members (a team server only; the embedded server is single-user)


def _password_options(f):
    f = click.option("--password-file", metavar="FILE", default=None,
                     help="Read the password from FILE (its first line; a trailing newline is dropped).")(f)
    f = click.option("--password-env", metavar="VAR", default=None,
                     help="Read the password from the environment variable VAR.")(f)
    return f


def _interactive() -> bool:
    return sys.stdin.isatty()


def _password(database_url: str | None, name: str, password_env: str | None, password_file: str | None
              ) -> str | None:
    """The password from --password-env, --password-file, or a prompt on a terminal; else None."""
    from latentlens import roles
    from latentlens.errors import InputError

    if password_env and password_file:
        raise click.UsageError("--password-env and --password-file are exclusive")
    if password_env:
        value = os.environ.get(password_env)
        if value is None:
            raise InputError(f"the environment variable {password_env} (--password-env) is not set")
        if value == "":
            raise InputError(f"the environment variable {password_env} (--password-env) is empty")
        return value
    if password_file:
        try:
            text = Path(password_file).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot read the password file {password_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise InputError(f"the password file {password_file} is not UTF-8 text") from None
        value = text.split("\n", 1)[0].rstrip("\r")
        if value == "":
            raise InputError(f"the password file {password_file} is empty")
        return value
    if _interactive():
        exists = roles.role_exists(database_url, name)  # refuses the embedded server before prompting
        hint = "Enter keeps the current one" if exists else "Enter for none"
        value = click.prompt(f"Password for {roles.shown(name)} ({hint})", hide_input=True,
                             confirmation_prompt=True, default="", show_default=False)
        return value or None
    return None


def _grant(database_url: str | None, name: str, kind: Kind, password_env: str | None,
           password_file: str | None) -> None:
    from latentlens import roles

    roles.check_name(name)
    password = _password(database_url, name, password_env, password_file)
    r = roles.grant(database_url, name, kind, password)
    who = roles.shown(name)
    if r["groups_created"]:
        click.echo("Created this database's team groups (reader, writer).")
    if r["created"]:
        if r["password_set"]:
            click.echo(f"Created the login role {who} with a password.")
        else:
            click.echo(f"Created the login role {who} without a password: it can connect only where the "
                       "server trusts it (give one with --password-env VAR or --password-file FILE).")
    elif r["password_set"]:
        click.echo(f"Changed the password of {who}.")
    if r["previous"] == kind:
        click.echo(f"{who} is already a {kind}.")
    elif r["previous"]:
        click.echo(f"{who} is now a {kind} (was a {r['previous']}).")
    else:
        click.echo(f"{who} is now a {kind}.")
    if not r["can_login"]:
        click.echo(f"Note: {who} cannot log in (NOLOGIN); its members get the {kind}'s rights.", err=True)
    click.echo(f"Connect as: {r['url']}")


@db.command("grant-reader")
@click.argument("name")
@_password_options
@database_option
@handle_errors
def grant_reader(name: str, password_env: str | None, password_file: str | None, database_url: str | None) -> None:
    """Let NAME run every query, the SQL functions and views, and read analyses.

    Creates the login role NAME if it does not exist; a writer granted this
    becomes a reader. Run as the database's owner (or a role with
    CREATEROLE) on a team server; the embedded server is single-user.
    The password comes from --password-env VAR, --password-file FILE, or a
    prompt on a terminal (never the command line); with none of these a new
    role has no password and an existing one keeps its own.

    \b
    Examples:
        llens db grant-reader alice                      # prompts for a password
        ALICE_PW=... llens db grant-reader alice --password-env ALICE_PW
        llens db grant-reader alice --password-file ~/alice.pw
    """
    _grant(database_url, name, "reader", password_env, password_file)


@db.command("grant-writer")
@click.argument("name")
@_password_options
@database_option
@handle_errors
def grant_writer(name: str, password_env: str | None, password_file: str | None, database_url: str | None) -> None:
    """Let NAME also ingest, import, evaluate, save analyses and delete its own.

    Creates the login role NAME if it does not exist; a reader granted this
    becomes a writer. Only the owner migrates and drops models. Run as the
    database's owner (or a role with CREATEROLE) on a team server; the
    embedded server is single-user. The password comes from --password-env
    VAR, --password-file FILE, or a prompt on a terminal (never the command
    line); with none of these a new role has no password and an existing one
    keeps its own.

    \b
    Examples:
        llens db grant-writer bob                        # prompts for a password
        BOB_PW=... llens db grant-writer bob --password-env BOB_PW
        llens db grant-writer alice                      # alice was a reader: now a writer
    """
    _grant(database_url, name, "writer", password_env, password_file)


@db.command()
@click.argument("name")
@click.option("--drop", is_flag=True,
              help="Also drop the login role (refused while it owns objects or holds privileges of its own).")
@database_option
@handle_errors
def revoke(name: str, drop: bool, database_url: str | None) -> None:
    """Take NAME out of the team: it can no longer read or write this database.

    The role itself stays (it may belong to other databases on the server)
    unless --drop is given. What NAME saved (analyses, evaluations) stays.

    \b
    Examples:
        llens db revoke alice
        llens db revoke alice --drop
    """
    from latentlens import roles

    r = roles.revoke(database_url, name, drop=drop)
    who = roles.shown(name)
    if r["revoked"]:
        click.echo(f"{who} is no longer a {' or '.join(r['revoked'])}.")
    else:
        click.echo(f"{who} was not a member of this database's team.")
    if r["dropped"]:
        click.echo(f"Dropped the role {who}.")


@db.command()
@database_option
@output_options
@handle_errors
def users(database_url: str | None, as_json: bool, as_csv: bool) -> None:
    """List the owner, the writers and the readers of this database.

    \b
    Examples:
        llens db users
        llens db users --json
    """
    from latentlens import roles

    fmt = output_format(as_json, as_csv)
    rows = roles.users(database_url)
    if fmt == "table":  # one line a role, whatever its name holds
        rows = [{**r, "name": roles.shown(r["name"], 80)} for r in rows]
    emit(rows, fmt, ["name", "kind", "can_login"])
