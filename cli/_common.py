"""What every command shares: the database option, error handling, output.

Library exceptions (LatentLensError) become one line on stderr and the
error's exit code; nothing a user can cause prints a traceback.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import click

from latentlens.config import ENV_DATABASE_URL
from latentlens.errors import MODELS_EXTRA, LatentLensError, missing_model_package


class CommandError(click.ClickException):
    """A click error with the library error's exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        # click types exit_code as a class variable; each CommandError carries its error's code
        self.exit_code = exit_code  # type: ignore[misc]


def database_option(f: Callable) -> Callable:
    return click.option(
        "--database-url",
        envvar=ENV_DATABASE_URL,
        default=None,
        metavar="URL",
        help=f"PostgreSQL URL (env {ENV_DATABASE_URL}); default: the embedded server in your data dir.",
    )(f)


def handle_errors(f: Callable) -> Callable:
    """Turn library errors and Ctrl-C into clean exits."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except LatentLensError as e:
            raise CommandError(str(e), e.exit_code) from e
        except ModuleNotFoundError as e:
            if not missing_model_package(e):
                raise
            raise CommandError(f"this command runs models and needs '{e.name}': {MODELS_EXTRA} (see the README)",
                               2) from e
        except Exception as e:  # the database said no: one line, never a psycopg traceback
            import psycopg

            if not isinstance(e, psycopg.Error):
                raise
            raise CommandError(*database_error(e)) from e
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


def database_error(e: Exception) -> tuple[str, int]:
    """(one line, exit code) for an error the database raised outside the library's own mapping."""
    import psycopg

    diag = getattr(e, "diag", None)
    first = ((diag.message_primary if diag else None) or str(e) or type(e).__name__).strip().splitlines()
    msg = first[0] if first else type(e).__name__
    if isinstance(e, psycopg.errors.InsufficientPrivilege):
        return f"permission denied: {msg} (what each role may do: docs/team.md)", 5
    if isinstance(e, psycopg.errors.QueryCanceled):
        return (f"the database cancelled the statement: {msg} (a statement_timeout? "
                "rerun the same command to resume)"), 1
    if isinstance(e, psycopg.errors.DiskFull) or "could not extend file" in msg or "No space left" in msg:
        return f"the database server is out of disk: {msg} (free space, then rerun to resume)", 1
    if isinstance(e, psycopg.OperationalError):
        return f"lost the database: {msg} (rerun the same command to resume)", 3
    return f"database error: {msg}", 1


def open_store(database_url: str | None):
    from latentlens.store import Store

    return Store.open(database_url)


def output_options(f: Callable) -> Callable:
    """--json / --csv flags; the default is a readable table."""
    f = click.option("--csv", "as_csv", is_flag=True, help="Output CSV.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Output JSON.")(f)
    return f


def output_format(as_json: bool, as_csv: bool) -> str:
    if as_json and as_csv:
        raise click.UsageError("--json and --csv are exclusive")
    return "json" if as_json else "csv" if as_csv else "table"


def emit(rows: Sequence[Mapping[str, Any]], fmt: str, columns: Sequence[str] | None = None) -> None:
    """Print rows as a table, JSON (a list of objects) or CSV."""
    columns = list(columns or (rows[0].keys() if rows else []))
    if fmt == "json":
        click.echo(json.dumps(list(rows), indent=2, default=str, ensure_ascii=False))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _csv_value(r.get(c)) for c in columns})
        click.echo(buf.getvalue(), nl=False)
    else:
        click.echo(table(rows, columns))


def _csv_value(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    rows = list(rows)
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(out)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def parse_int_list(value: str | None, name: str) -> list[int] | None:
    """'0,3,7' -> [0, 3, 7]; None/'' -> None."""
    if value is None or value.strip() == "":
        return None
    try:
        return [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=name) from None
