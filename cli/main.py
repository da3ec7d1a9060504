"""The `llens` click group.

Commands are registered by dotted path and imported lazily (click's
documented LazyGroup pattern): `llens db status` never imports torch or
transformers, and a broken optional dependency only breaks its own command.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute", relative to latentlens.cli
COMMANDS: dict[str, str] = {
    "db": "db:db",
    "ingest": "ingest:ingest",
    "runs": "ingest:runs",
    "index": "index:index",
    "models": "models:models",
    "query": "query:query",
    "import-index": "interop:import_index",
    "export-index": "interop:export_index",
    "report": "report:report",
    "eval": "eval:eval_",
    "analyses": "analyses:analyses",
    "serve": "serve:serve",
    "atlas": "atlas:atlas",
}

HELP_SUMMARIES: dict[str, str] = {
    "db": "Manage the database: upgrade, status, url, reset, stop; team roles (grant-reader, ...).",
    "ingest": "Run a language model over a corpus and store its token embeddings.",
    "runs": "List ingest runs with status, counts and errors.",
    "index": "Build or drop the ANN indexes of a model's layers.",
    "models": "List models, their layers, row counts and corpora.",
    "query": "Nearest contextual neighbours of a text, vectors or an image.",
    "import-index": "Load a pre-built index (a hub repository or a directory in the reference layout).",
    "export-index": "Write a model's index in the reference library's layout.",
    "report": "Write an HTML + PNG report of what each image patch means.",
    "eval": "Measure how interpretable visual tokens are, per method and layer.",
    "analyses": "List, show and delete saved analyses (queries, reports, evaluations).",
    "atlas": "Build an atlas of an image collection; find the patches that mean a word.",
    "serve": "Start the team's web app (models, queries, images, analyses, evaluations).",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(f"latentlens.cli.{module_name}")
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Summaries come from a table so `llens --help` imports nothing heavy.
        rows = [(name, HELP_SUMMARIES.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="latentlens-db", prog_name="llens")
def cli() -> None:
    """latentlens: what do a model's hidden states mean, in words?

    Stores contextual token embeddings of a language model in PostgreSQL +
    pgvector and describes any hidden state (a text token, a raw vector, an
    image patch of a vision-language model) by its nearest neighbours among
    them, each shown in the sentence it came from.

    With no settings an embedded PostgreSQL runs in your data dir; set
    LLENS_DATABASE_URL (or --database-url) to use a team server.

    \b
    Quick start:
        llens db upgrade
        llens ingest HuggingFaceTB/SmolLM2-135M corpus.txt
        llens query HuggingFaceTB/SmolLM2-135M --text "a brown dog"
    """
