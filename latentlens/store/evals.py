"""Evaluation runs: sampled patches and the judge's verdicts (tables eval_run, eval_item, eval_verdict).

An item and all of its verdicts are written in one transaction, and an item
already present is never written again (``ON CONFLICT DO NOTHING`` on its
key), so a killed or concurrent ``llens eval`` can neither half-record an
item nor record it twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from latentlens.errors import InputError
from latentlens.store.base import StoreBase


@dataclass
class EvalRunInfo:
    id: int
    name: str
    model: str
    methods: list[str]
    visual_layers: list[int]
    judge: str
    judge_settings: dict
    settings: dict
    fingerprint: str
    status: str
    items_planned: int | None
    items_done: int
    error: str | None
    created_by: str
    started_at: datetime
    finished_at: datetime | None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["started_at"] = self.started_at.isoformat()
        d["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        return d


@dataclass
class EvalItem:
    """One sampled patch of one image."""

    item: int
    image: str
    image_sha256: str
    image_size: tuple[int, int]
    patch_idx: int
    row: int
    col: int
    box: tuple[float, float, float, float]


@dataclass
class EvalVerdict:
    method: str
    visual_layer: int
    words: list[str]
    interpretable: bool
    category: str | None = None
    shown: dict = field(default_factory=dict)
    answer: dict = field(default_factory=dict)


def _model_change(old: Any, new: Any) -> str | None:
    """What differs between two model identities (latentlens.eval.identity), or None."""
    if old == new:
        return None
    if not isinstance(old, dict):
        return "the run was recorded before latentlens fingerprinted models, so its model cannot be checked"
    parts = [k for k in ("kind", "repo", "revision", "commit", "weights", "processor", "config")
             if old.get(k) != (new or {}).get(k)]
    return f"its {', '.join(parts) or 'identity'} changed since"


class EvalsMixin(StoreBase):
    """Rows of eval_run / eval_item / eval_verdict."""

    _EVAL_SELECT = """
        SELECT id, name, model, methods, visual_layers, judge, judge_settings, settings, fingerprint,
               status, items_planned, items_done, error, created_by, started_at, finished_at
          FROM eval_run
    """

    def create_eval_run(
        self, name: str, *, model: str, model_id: int | None, methods: Sequence[str],
        visual_layers: Sequence[int], judge: str, judge_settings: Mapping[str, Any],
        settings: Mapping[str, Any], fingerprint: str, items_planned: int | None,
        hostname: str | None = None, pid: int | None = None,
    ) -> EvalRunInfo:
        """A new run, or the existing one of that name if its fingerprint matches (to resume)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO eval_run (name, model, model_id, methods, visual_layers, judge, judge_settings, "
                "settings, fingerprint, items_planned, hostname, pid) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
                (name, model, model_id, list(methods), [int(v) for v in visual_layers], judge,
                 Jsonb(dict(judge_settings)), Jsonb(dict(settings)), fingerprint, items_planned, hostname, pid),
            )
            # an evaluation is an analysis too: listed by `llens analyses`, shared like one
            conn.execute(
                "INSERT INTO analysis (kind, title, model, model_id, params, eval_run_id) "
                "SELECT 'eval', 'eval run ' || name, model, model_id, settings || jsonb_build_object("
                "'methods', methods, 'visual_layers', visual_layers, 'judge', judge, 'run', name), id "
                "FROM eval_run WHERE name = %s AND created_by = current_user "
                "ON CONFLICT (eval_run_id) DO NOTHING",
                (name,),
            )
        run = self.get_eval_run(name)
        if run.fingerprint != fingerprint:
            changed = _model_change(run.settings.get("vlm"), settings.get("vlm"))
            if changed:
                raise InputError(f"eval run '{name}' was judged with another {run.model}: {changed}; "
                                 "restore that model, or choose another --run name")
            raise InputError(
                f"eval run '{name}' exists with other settings (model {run.model}, judge {run.judge}, "
                f"methods {','.join(run.methods)}): choose another --run name"
            )
        return run

    def get_eval_run(self, run: str | int) -> EvalRunInfo:
        """By name, or by id when given an int (or a string of digits that names no run)."""
        rows = self._fetch(self._EVAL_SELECT + " WHERE name = %s", (str(run),))
        if not rows and str(run).isdigit():
            rows = self._fetch(self._EVAL_SELECT + " WHERE id = %s", (int(run),))
        if not rows:
            raise InputError(f"no eval run '{run}' (list them with `llens eval --list`)")
        return EvalRunInfo(*rows[0])

    def list_eval_runs(self) -> list[EvalRunInfo]:
        """Every run; one recorded as running that nobody holds the lock of (its process died:
        kill -9, a crash) is shown as ``stopped``, a rerun resumes it.

        Who holds a lock is read from ``pg_locks``: taking and releasing each lock to test it
        made an eval starting in that moment fail as "being judged"."""
        runs = [EvalRunInfo(*r) for r in self._fetch(self._EVAL_SELECT + " ORDER BY id")]
        if any(r.status == "running" for r in runs):
            held = self.held_eval_locks()
            for r in runs:
                if r.status == "running" and r.id not in held:
                    r.status = "stopped"
        return runs

    def held_eval_locks(self) -> set[int]:
        """Ids of the runs whose lock (``lock_eval_run``) some session of this database holds."""
        return {int(r[0]) for r in self._fetch(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
            "AND classid = hashtext('llens_eval')::oid "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")}

    def set_eval_status(self, run: EvalRunInfo, status: str, error: str | None = None,
                        *, hostname: str | None = None, pid: int | None = None) -> None:
        finished = "now()" if status in ("done", "failed", "interrupted") else "NULL"
        self._fetch(
            f"UPDATE eval_run SET status = %s, error = %s, finished_at = {finished}, heartbeat_at = now(), "
            "hostname = coalesce(%s, hostname), pid = coalesce(%s, pid) WHERE id = %s RETURNING id",
            (status, error, hostname, pid, run.id),
        )

    def lock_eval_run(self, run: EvalRunInfo) -> bool:
        """Take the run's session lock (released on unlock or when the process dies); False if taken."""
        return bool(self._fetch("SELECT pg_try_advisory_lock(hashtext('llens_eval'), %s)", (run.id,))[0][0])

    def unlock_eval_run(self, run: EvalRunInfo) -> None:
        self._fetch("SELECT pg_advisory_unlock(hashtext('llens_eval'), %s)", (run.id,))

    def eval_holder(self, run: EvalRunInfo) -> str:
        """Who last worked on the run: host, pid, and how long ago."""
        host, pid, age = self._fetch(
            "SELECT hostname, pid, round(extract(epoch FROM now() - heartbeat_at)) FROM eval_run WHERE id = %s",
            (run.id,))[0]
        return f"{host or '?'} pid {pid or '?'} (last seen {int(age or 0)} s ago)"

    def eval_items(self, run: EvalRunInfo) -> dict[int, EvalItem]:
        """The run's judged items by number: what a resume compares with the patches it draws."""
        return {r[0]: EvalItem(r[0], r[1], r[2], (r[3][0], r[3][1]), r[4], r[5], r[6],
                               (r[7][0], r[7][1], r[7][2], r[7][3]))
                for r in self._fetch("SELECT item, image, image_sha256, image_size, patch_idx, patch_row, "
                                     "patch_col, box FROM eval_item WHERE run_id = %s", (run.id,))}

    def record_eval_item(self, run: EvalRunInfo, item: EvalItem, verdicts: Sequence[EvalVerdict]) -> bool:
        """Write one item and all its verdicts atomically; False if the item was already recorded."""
        with self.transaction() as conn:
            row = conn.execute(
                "INSERT INTO eval_item (run_id, item, image, image_sha256, image_size, patch_idx, patch_row, "
                "patch_col, box) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (run_id, item) DO NOTHING RETURNING item",
                (run.id, item.item, item.image, item.image_sha256, list(item.image_size), item.patch_idx,
                 item.row, item.col, [float(x) for x in item.box]),
            ).fetchone()
            if row is None:
                return False
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO eval_verdict (run_id, item, method, visual_layer, words, interpretable, "
                    "category, shown, answer) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [(run.id, item.item, v.method, int(v.visual_layer), list(v.words), bool(v.interpretable),
                      v.category, Jsonb(v.shown), Jsonb(v.answer)) for v in verdicts],
                )
            conn.execute(
                "UPDATE eval_run SET items_done = items_done + 1, heartbeat_at = now() WHERE id = %s",
                (run.id,),
            )
        return True

    def eval_verdicts(self, run: EvalRunInfo) -> list[dict]:
        """Every verdict of the run with its item, in (item, method, layer) order: the export form."""
        rows = self._fetch(
            "SELECT i.item, i.image, i.image_sha256, i.image_size, i.patch_idx, i.patch_row, i.patch_col, "
            "i.box, v.method, v.visual_layer, v.words, v.interpretable, v.category, v.shown, v.answer, "
            "i.judged_at FROM eval_item i JOIN eval_verdict v USING (run_id, item) WHERE i.run_id = %s "
            "ORDER BY i.item, v.method, v.visual_layer",
            (run.id,),
        )
        keys = ("item", "image", "image_sha256", "image_size", "patch_idx", "row", "col", "box", "method",
                "visual_layer", "words", "interpretable", "category", "shown", "answer", "judged_at")
        out = []
        for r in rows:
            d = dict(zip(keys, r))
            d["judged_at"] = d["judged_at"].isoformat()
            d["run"] = run.name
            out.append(d)
        return out

    def eval_extent(self, run: EvalRunInfo) -> tuple[int, int]:
        """(images, patches) judged so far: what a figure's caption says n is."""
        images, patches = self._fetch(
            "SELECT count(DISTINCT image), count(*) FROM eval_item WHERE run_id = %s", (run.id,))[0]
        return int(images), int(patches)

    def eval_counts(self, run: EvalRunInfo) -> list[tuple[str, int, int, int]]:
        """(method, visual_layer, judged, interpretable) from the eval_summary view."""
        return [(m, int(v), int(n), int(k)) for m, v, n, k in self._fetch(
            "SELECT method, visual_layer, judged, interpretable FROM eval_summary WHERE run_id = %s "
            "ORDER BY method, visual_layer", (run.id,))]
