"""Read a text corpus: .txt (a sentence a line), .csv/.tsv (a column), .jsonl (a field) or stdin.

Sentences are stripped; blank ones and exact duplicates are skipped and
counted. The content hash (sha256 of the kept sentences, in order) is what
identifies a corpus in the store, so the same sentences read from another
file, or the same file under another name, are registered once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from latentlens.errors import InputError

FORMATS = ("txt", "csv", "tsv", "jsonl")
TEXT_COLUMNS = ("text", "sentence", "caption")


@dataclass
class Corpus:
    """Kept sentences in file order, and what was skipped."""

    texts: list[str]
    name: str
    source: str | None
    format: str
    lines: int = 0
    blank: int = 0
    duplicates: int = 0
    params: dict = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.texts)


def detect_format(path: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("csv", "tsv", "jsonl"):
        return suffix
    if suffix == "ndjson":
        return "jsonl"
    return "txt"


def read_corpus(
    path: str,
    *,
    column: str | None = None,
    field_name: str | None = None,
    fmt: str | None = None,
    name: str | None = None,
    stdin: TextIO | None = None,
) -> Corpus:
    """Read and clean a corpus file (``-`` = stdin). Raises InputError on bad input."""
    fmt = fmt or ("txt" if path == "-" else detect_format(path))
    if fmt not in FORMATS:
        raise InputError(f"unknown corpus format '{fmt}' (choose from {', '.join(FORMATS)})")
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin
        return _read(stream, fmt, column, field_name, name or "stdin", None, path)
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"corpus file not found: {path}")
    try:
        with open(p, encoding="utf-8", newline="") as f:
            return _read(f, fmt, column, field_name, name or p.name, str(p.resolve()), path)
    except UnicodeDecodeError as e:
        raise InputError(f"corpus file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read(stream: TextIO, fmt: str, column: str | None, field_name: str | None,
          name: str, source: str | None, shown: str) -> Corpus:
    if fmt == "txt":
        raw: Iterable[str] = (line.rstrip("\r\n") for line in stream)
        params: dict = {}
    elif fmt in ("csv", "tsv"):
        raw, col = _csv_rows(stream, "\t" if fmt == "tsv" else ",", column, shown)
        params = {"column": col}
    else:
        fld = field_name or "text"
        raw = _jsonl_rows(stream, fld, shown)
        params = {"field": fld}
    corpus = Corpus(texts=[], name=name, source=source, format=fmt, params=params)
    seen: set[str] = set()
    for text in raw:
        corpus.lines += 1
        t = text.strip()
        if not t:
            corpus.blank += 1
        elif t in seen:
            corpus.duplicates += 1
        else:
            seen.add(t)
            corpus.texts.append(t)
    if not corpus.texts:
        raise InputError(
            f"corpus {shown} has no sentences ({corpus.lines} lines, {corpus.blank} blank)"
        )
    return corpus


def _csv_rows(stream: TextIO, delimiter: str, column: str | None, shown: str) -> tuple[Iterator[str], str]:
    try:
        text = stream.read()
    except UnicodeDecodeError as e:
        raise InputError(f"corpus file {shown} is not UTF-8 text ({e.reason})") from None
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise InputError(f"corpus {shown} is empty")
    names = [h.strip() for h in header]
    if column is None:
        lowered = [n.lower() for n in names]
        hit = next((c for c in TEXT_COLUMNS if c in lowered), None)
        if hit is None and len(names) > 1:
            raise InputError(
                f"corpus {shown}: say which column holds the text with --column "
                f"(columns: {', '.join(names)})"
            )
        idx = lowered.index(hit) if hit else 0
    elif column in names:
        idx = names.index(column)
    elif column.isdigit() and int(column) < len(names):
        idx = int(column)
    else:
        raise InputError(f"corpus {shown} has no column '{column}' (columns: {', '.join(names)})")

    def rows() -> Iterator[str]:
        for row in reader:
            yield row[idx] if idx < len(row) else ""

    return rows(), names[idx]


def _jsonl_rows(stream: TextIO, fld: str, shown: str) -> Iterator[str]:
    for n, line in enumerate(stream, 1):
        if not line.strip():
            yield ""
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"corpus {shown} line {n} is not JSON: {e.msg}") from None
        if not isinstance(obj, dict) or fld not in obj:
            keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
            raise InputError(f"corpus {shown} line {n} has no field '{fld}' (has: {keys}); use --field")
        value = obj[fld]
        yield value if isinstance(value, str) else ("" if value is None else str(value))
