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
    """Read and clean a corpus file (``-`` = stdin). Raises InputError on bad input.

    The file must be UTF-8 (a leading byte-order mark is dropped); a byte
    that isn't is reported with its line, and a NUL character (which
    PostgreSQL text cannot hold) or, in JSONL, an unpaired surrogate escape
    is refused with its line, before anything is stored.
    """
    fmt = fmt or ("txt" if path == "-" else detect_format(path))
    if fmt not in FORMATS:
        raise InputError(f"unknown corpus format '{fmt}' (choose from {', '.join(FORMATS)})")
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin
        try:
            return _read(stream, fmt, column, field_name, name or "stdin", None, "stdin")
        except UnicodeDecodeError as e:
            raise InputError(f"corpus on stdin is not UTF-8 text ({e.reason}): convert it, "
                             "e.g. with iconv -f latin1 -t utf-8") from None
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"corpus file not found: {path}")
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            return _read(f, fmt, column, field_name, name or p.name, str(p.resolve()), path)
    except UnicodeDecodeError:
        raise InputError(_not_utf8(p, path)) from None


def _not_utf8(p: Path, shown: str) -> str:
    """Where a file that failed to decode first stops being UTF-8 (line and byte), as one line."""
    with open(p, "rb") as f:
        head = f.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return (f"corpus file {shown} is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8: "
                    f"convert it, e.g. iconv -f UTF-16 -t UTF-8 {shown} > corpus.txt")
        f.seek(0)
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"corpus file {shown} is not UTF-8 text: line {n}, byte {e.start + 1} "
                        f"(0x{line[e.start]:02x}: {e.reason}); convert it to UTF-8, e.g. "
                        f"iconv -f latin1 -t utf-8 {shown} > corpus.txt if it is Latin-1")
    return f"corpus file {shown} is not UTF-8 text"


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
    where = "row" if fmt in ("csv", "tsv") else "line"
    for text in raw:
        corpus.lines += 1
        if "\x00" in text:
            at = corpus.lines + (1 if where == "row" else 0)  # csv: the header is row 1
            fix = ("remove the \\u0000 escapes" if fmt == "jsonl"
                   else f"remove them, e.g. tr -d '\\000' < {shown} > clean.{fmt}")
            raise InputError(f"corpus {shown} {where} {at} contains a NUL character (\\x00), which "
                             f"PostgreSQL text cannot store: {fix}")
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
    text = stream.read()  # a UnicodeDecodeError is reported by read_corpus, with its line
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise InputError(f"corpus {shown} row 1 is not valid CSV: {e}") from None
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
        try:
            for row in reader:
                yield row[idx] if idx < len(row) else ""
        except csv.Error as e:  # e.g. a field over csv's size limit, or NUL on Python 3.10
            raise InputError(f"corpus {shown} near line {reader.line_num} is not valid CSV: {e}") from None

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
        value = value if isinstance(value, str) else ("" if value is None else str(value))
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone "\\ud800" escape: not a character PostgreSQL can store
            raise InputError(f"corpus {shown} line {n} has an unpaired surrogate "
                             f"(\\u{ord(value[e.start]):04x}), which is not valid Unicode text") from None
        yield value
