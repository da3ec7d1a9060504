"""Corpus readers: txt, csv, tsv, jsonl, stdin; blanks and duplicates counted; clear errors."""

from __future__ import annotations

import io

import pytest

from latentlens.corpus import read_corpus
from latentlens.errors import InputError

SENTENCES = ["The dog runs.", "A cat sleeps.", "The dog runs.", "Birds sing at dawn."]


def test_txt_strips_and_counts_blanks_and_duplicates(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("  The dog runs.  \n\n\r\nA cat sleeps.\nThe dog runs.\nBirds sing at dawn.\n", encoding="utf-8")
    c = read_corpus(str(p))
    assert c.texts == ["The dog runs.", "A cat sleeps.", "Birds sing at dawn."]
    assert (c.lines, c.blank, c.duplicates) == (6, 2, 1)
    assert c.name == "c.txt" and c.source == str(p.resolve()) and c.format == "txt"


def test_csv_tsv_jsonl_stdin_give_the_same_content_hash(tmp_path):
    csv_p = tmp_path / "c.csv"
    csv_p.write_text("id,caption\n1,The dog runs.\n2,\"A cat sleeps.\"\n3,The dog runs.\n4,Birds sing at dawn.\n")
    tsv_p = tmp_path / "c.tsv"
    tsv_p.write_text("sentence\tn\nThe dog runs.\t1\nA cat sleeps.\t2\n\t3\nBirds sing at dawn.\t4\n")
    jsonl_p = tmp_path / "c.jsonl"
    jsonl_p.write_text('{"t": "The dog runs."}\n{"t": "A cat sleeps."}\n\n{"t": "Birds sing at dawn."}\n')
    a = read_corpus(str(csv_p))  # picks the 'caption' column by name
    b = read_corpus(str(tsv_p), column="sentence")
    c = read_corpus(str(jsonl_p), field_name="t")
    d = read_corpus("-", stdin=io.StringIO("\n".join(SENTENCES) + "\n"))
    assert a.texts == b.texts == c.texts == d.texts == ["The dog runs.", "A cat sleeps.", "Birds sing at dawn."]
    assert len({x.content_hash for x in (a, b, c, d)}) == 1
    assert a.duplicates == 1 and b.blank == 1 and c.blank == 1 and d.duplicates == 1 and d.name == "stdin"
    assert read_corpus(str(csv_p), column="1").texts == a.texts  # by index


def test_column_by_index_and_other_columns(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("a,b\nx1,The dog runs.\nx2,A cat.\n")
    assert read_corpus(str(p), column="b").texts == ["The dog runs.", "A cat."]
    with pytest.raises(InputError, match="--column"):
        read_corpus(str(p))  # two columns, none named like text
    with pytest.raises(InputError, match="no column 'zz'.*columns: a, b"):
        read_corpus(str(p), column="zz")


@pytest.mark.parametrize("content, kw, needle", [
    ("", {}, "no sentences"),
    ("\n \n\t\n", {}, "no sentences"),
])
def test_empty_corpus(tmp_path, content, kw, needle):
    p = tmp_path / "e.txt"
    p.write_text(content)
    with pytest.raises(InputError, match=needle):
        read_corpus(str(p), **kw)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="corpus file not found"):
        read_corpus(str(tmp_path / "missing.txt"))
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        read_corpus(str(j))
    j.write_text('{"body": "ok"}\n')
    with pytest.raises(InputError, match="no field 'text' \\(has: body\\)"):
        read_corpus(str(j))
    b = tmp_path / "latin1.txt"
    b.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_corpus(str(b))
