"""Saved analyses (table ``analysis``) and the provenance every query result carries.

An analysis is what a query printed (its ``--json``), the input that made it
(the text, or the image / vectors bytes with their sha256), the parameters,
and the provenance: which model revision, corpora, ingest runs, index and
search path, which latentlens, who and when. Row-level security lets
everyone read every analysis and a writer delete only its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from latentlens.errors import InputError, PermissionDenied
from latentlens.store.base import StoreBase
from latentlens.store.types import ModelInfo

KINDS = ("text", "vectors", "image", "eval")


@dataclass
class AnalysisInfo:
    id: int
    kind: str
    title: str | None
    model: str
    params: dict
    input: dict
    provenance: dict
    eval_run_id: int | None
    created_by: str
    created_at: datetime
    result: Any = None  # loaded by get_analysis only
    input_data: bytes | None = None  # loaded by get_analysis(with_data=True) only

    def to_dict(self, *, result: bool = True) -> dict:
        d = {"id": self.id, "kind": self.kind, "title": self.title, "model": self.model,
             "params": self.params, "input": self.input, "provenance": self.provenance,
             "eval_run_id": self.eval_run_id, "created_by": self.created_by,
             "created_at": self.created_at.isoformat()}
        if result:
            d["result"] = self.result
        return d


# Store.provenance's one query (also sent with an answer's contexts: SearchMixin.answer_columns);
# a row with a NULL corpus where the model has no ingest run
PROVENANCE = (
    "SELECT current_user, now(), (SELECT value FROM llens_meta WHERE key = 'instance_id'), "
    "c.id, c.name, c.content_hash, c.sentence_count, c.runs, c.done "
    "FROM (SELECT 1) AS one LEFT JOIN LATERAL ("
    "  SELECT c.id, c.name, c.content_hash, c.sentence_count, array_agg(r.id ORDER BY r.id) AS runs, "
    "         bool_and(r.status = 'done') AS done "
    "    FROM ingest_run r JOIN corpus c ON c.id = r.corpus_id "
    "   WHERE r.model_id = %s GROUP BY c.id) AS c ON true ORDER BY c.id")


def provenance_of(rows: list[tuple], info: ModelInfo, layers: Sequence[int] | None = None,
                  search: Mapping[int, Sequence[str]] | None = None) -> dict:
    """The provenance dict of PROVENANCE's rows (see Store.provenance)."""
    from latentlens import __version__

    wanted = set(layers) if layers is not None else set(info.layer_numbers)
    who, when, instance = rows[0][:3]
    corpora = [r[3:] for r in rows if r[3] is not None]
    return {
        "latentlens_version": __version__,
        "database": instance,
        "by": who,
        "at": when.isoformat(),
        "model": {"name": info.name, "id": info.id, "revision": info.revision,
                  "architecture": info.architecture, "dtype": info.dtype,
                  "source": (info.params or {}).get("source")},
        "corpora": [{"id": c[0], "name": c[1], "content_hash": c[2], "sentences": c[3],
                     "ingest_runs": list(c[4]), "complete": bool(c[5])} for c in corpora],
        "layers": {str(li.layer): {"rows": li.row_count, "version": li.version, "index": li.index_kind,
                                   "index_ef_search": li.index_ef_search}
                   for li in info.layers if li.layer in wanted},
        "search": None if search is None else {str(k): sorted(set(v)) for k, v in search.items()},
    }


class AnalysesMixin(StoreBase):
    """Rows of ``analysis``, and provenance."""

    _A_COLS = "id, kind, title, model, params, input, provenance, eval_run_id, created_by, created_at"

    def provenance(self, info: ModelInfo, layers: Sequence[int] | None = None,
                   search: Mapping[int, Sequence[str]] | None = None) -> dict:
        """Where an answer comes from: model, corpora, ingest runs, indexes, search paths, who, when."""
        # one query (every search's answer carries this; it took three, each its own transaction)
        return provenance_of(self._fetch(PROVENANCE, (info.id,)), info, layers, search)

    def save_analysis(
        self, kind: str, model: str, *, result: Any, params: Mapping[str, Any] | None = None,
        input: Mapping[str, Any] | None = None, input_data: bytes | None = None, title: str | None = None,
        provenance: Mapping[str, Any] | None = None, model_id: int | None = None,
        eval_run_id: int | None = None,
    ) -> int:
        if kind not in KINDS:
            raise InputError(f"unknown analysis kind '{kind}' (one of {', '.join(KINDS)})")
        if title is not None and len(title) > 500:
            raise InputError("a title is at most 500 characters")
        return int(self._fetch(
            "INSERT INTO analysis (kind, title, model, model_id, params, input, input_data, result, provenance, "
            "eval_run_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (kind, title, model, model_id, Jsonb(dict(params or {})), Jsonb(dict(input or {})), input_data,
             Jsonb(result), Jsonb(dict(provenance or {})), eval_run_id),
        )[0][0])

    def get_analysis(self, analysis_id: int, *, with_data: bool = False) -> AnalysisInfo:
        data = ", input_data" if with_data else ""
        rows = self._fetch(f"SELECT {self._A_COLS}, result{data} FROM analysis WHERE id = %s", (int(analysis_id),))
        if not rows:
            raise InputError(f"no analysis {analysis_id} (list them with `llens analyses`)")
        r = rows[0]
        a = AnalysisInfo(*r[:11])  # the _A_COLS, then result
        if with_data:
            a.input_data = bytes(r[11]) if r[11] is not None else None
        return a

    def list_analyses(self, *, model: str | None = None, author: str | None = None, title: str | None = None,
                      kind: str | None = None, limit: int = 100) -> list[AnalysisInfo]:
        where, args = [], []
        if model:
            where.append("model = %s")
            args.append(model)
        if author:
            where.append("created_by = %s")
            args.append(author)
        if title:
            where.append("title ILIKE %s")
            args.append("%" + title.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        if kind:
            where.append("kind = %s")
            args.append(kind)
        sql = f"SELECT {self._A_COLS} FROM analysis"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT %s"
        return [AnalysisInfo(*r) for r in self._fetch(sql, (*args, int(limit)))]

    def delete_analysis(self, analysis_id: int) -> None:
        """Delete one analysis; a writer may delete only its own (row-level security)."""
        gone = self._fetch("DELETE FROM analysis WHERE id = %s RETURNING id", (int(analysis_id),))
        if gone:
            return
        rows = self._fetch("SELECT created_by FROM analysis WHERE id = %s", (int(analysis_id),))
        if not rows:
            raise InputError(f"no analysis {analysis_id}")
        raise PermissionDenied(f"analysis {analysis_id} belongs to {rows[0][0]}: you can delete only your own "
                               "(what each role may do: docs/team.md)")
