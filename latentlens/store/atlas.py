"""Atlases: a VLM's visual tokens over an image collection, their neighbours, found by word.

Tables of revision 0010 (sql/0010_atlas.sql). One image's rows (image,
patches, tokens of every layer, neighbours) and its run's progress commit in
one transaction, so a killed build resumes exactly: an image is either fully
stored or not at all.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from latentlens.db import first_line
from latentlens.errors import EmptyResult, InputError, UnknownAtlas
from latentlens.pgcopy import HEADER, TRAILER, decode_rows, encode_rows, normalize_rows
from latentlens.store.base import StoreBase
from latentlens.store.types import ModelInfo, check_k, unit_queries

ATLAS_TOKEN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("atlas_id", "int4"), ("layer", "int4"), ("image_id", "int8"), ("patch", "int4"), ("embedding", "halfvec"),
)


@dataclass(frozen=True)
class AtlasLayer:
    layer: int
    row_count: int
    index_kind: str | None


@dataclass(frozen=True)
class AtlasInfo:
    id: int
    name: str
    model_id: int
    model: str
    hidden_size: int
    layers: list[int]
    params: dict
    created_by: str
    created_at: dt.datetime
    images: int = 0
    layer_info: list[AtlasLayer] = field(default_factory=list)

    def layer(self, layer: int) -> AtlasLayer:
        for li in self.layer_info:
            if li.layer == layer:
                return li
        raise InputError(f"atlas '{self.name}' has no layer {layer} (it has {','.join(map(str, self.layers))})")

    def to_dict(self) -> dict:
        return {
            "atlas": self.name, "model": self.model, "layers": self.layers, "images": self.images,
            "patches": {li.layer: li.row_count for li in self.layer_info},
            "index": {li.layer: li.index_kind for li in self.layer_info},
            "params": self.params, "created_by": self.created_by, "created_at": self.created_at.isoformat(),
        }


@dataclass
class AtlasRunInfo:
    id: int
    atlas_id: int
    source: str
    shard: int
    num_shards: int
    status: str
    images_total: int | None
    images_done: int
    patches_done: int
    counters: dict
    error: str | None
    hostname: str | None
    pid: int | None
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    finished_at: dt.datetime | None

    @property
    def duration_s(self) -> float:
        end = self.finished_at or self.heartbeat_at
        return max(0.0, (end - self.started_at).total_seconds())


@dataclass
class AtlasHit:
    """One patch of one image at one layer, and why it matched."""

    image_id: int
    path: str
    patch: int
    row: int
    col: int
    box: tuple[float, float, float, float]
    layer: int
    similarity: float
    rank: int | None = None  # the matching neighbour's rank (word search)
    word: str | None = None
    content_hash: str | None = None
    image_size: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {
            "image_id": self.image_id, "path": self.path, "content_hash": self.content_hash,
            "image_size": list(self.image_size) if self.image_size else None, "patch": self.patch,
            "row": self.row, "col": self.col, "box": [round(float(x), 2) for x in self.box],
            "layer": self.layer, "similarity": round(float(self.similarity), 5), "rank": self.rank,
            "word": self.word,
        }


@dataclass
class AtlasImageRows:
    """What one image adds to an atlas: the image, its patches, tokens per layer, neighbours."""

    content_hash: str
    path: str
    size: tuple[int, int]  # (w, h)
    grid: tuple[int, int]  # (rows, cols)
    patch_row: np.ndarray  # [P]
    patch_col: np.ndarray
    boxes: np.ndarray  # [P, 4] (x0, y0, x1, y1) image pixels
    vectors: dict[int, np.ndarray]  # layer -> [P, D]
    # neighbours, one entry per (layer, patch, rank)
    nb_layer: np.ndarray
    nb_patch: np.ndarray
    nb_rank: np.ndarray
    nb_token_id: np.ndarray
    nb_token: list[str | None]
    nb_word: list[str]
    nb_similarity: np.ndarray
    nb_text_layer: np.ndarray
    nb_sentence_id: np.ndarray
    nb_position: np.ndarray


_ATLAS_SELECT = """
    SELECT a.id, a.name, a.model_id, a.model, a.hidden_size, a.layers, a.params, a.created_by, a.created_at,
           (SELECT count(*) FROM atlas_image i WHERE i.atlas_id = a.id),
           coalesce((SELECT array_agg(ARRAY[l.layer::bigint, l.row_count] ORDER BY l.layer)
                       FROM atlas_layer l WHERE l.atlas_id = a.id), '{}'),
           coalesce((SELECT array_agg(coalesce(l.index_kind, '') ORDER BY l.layer)
                       FROM atlas_layer l WHERE l.atlas_id = a.id), '{}')
      FROM atlas a
"""

_RUN_SELECT = """
    SELECT id, atlas_id, source, shard, num_shards, status, images_total, images_done, patches_done,
           counters, error, hostname, pid, started_at, heartbeat_at, finished_at FROM atlas_run
"""


def _atlas(row: tuple) -> AtlasInfo:
    layers = [AtlasLayer(int(lr[0]), int(lr[1]), kind or None) for lr, kind in zip(row[10], row[11])]
    return AtlasInfo(id=row[0], name=row[1], model_id=row[2], model=row[3], hidden_size=row[4], layers=list(row[5]),
                     params=dict(row[6]), created_by=row[7], created_at=row[8], images=int(row[9]),
                     layer_info=layers)


class AtlasMixin(StoreBase):
    """Atlases: create, write an image's rows, find by word or by vector, index, drop."""

    # ---- catalog --------------------------------------------------------

    def create_atlas(self, name: str, model: ModelInfo, layers: Sequence[int], params: Mapping[str, Any]) -> AtlasInfo:
        atlas, created = self.ensure_atlas(name, model, layers, params)
        if not created:
            raise InputError(f"an atlas named '{name}' already exists")
        return atlas

    def ensure_atlas(self, name: str, model: ModelInfo, layers: Sequence[int], params: Mapping[str, Any]
                     ) -> tuple[AtlasInfo, bool]:
        """The atlas ``name``, created with these settings if missing: (atlas, created).

        Safe when the shards of one build start at once: one creates it, the others get it.
        """
        with self.transaction() as conn:
            row = conn.execute(
                "INSERT INTO atlas (name, model_id, model, hidden_size, layers, params) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
                (name, model.id, model.name, model.hidden_size, sorted(layers), Jsonb(dict(params))),
            ).fetchone()
            if row is not None:
                for layer in sorted(layers):
                    conn.execute("SELECT llens_atlas_ensure_layer(%s, %s)", (row[0], layer))
        return self.get_atlas(name), row is not None

    def get_atlas(self, name: str) -> AtlasInfo:
        rows = self._fetch(_ATLAS_SELECT + " WHERE a.name = %s", (name,))
        if not rows:
            names = [a.name for a in self.list_atlases()]
            hint = ", ".join(f"'{n}'" for n in names[:10]) if names else "none yet; run `llens atlas build`"
            raise UnknownAtlas(f"no atlas named '{name}' (atlases: {hint})")
        return _atlas(rows[0])

    def list_atlases(self) -> list[AtlasInfo]:
        return [_atlas(r) for r in self._fetch(_ATLAS_SELECT + " ORDER BY a.name")]

    def drop_atlas(self, name: str) -> None:
        info = self.get_atlas(name)
        with self.transaction() as conn:
            conn.execute("SELECT llens_atlas_drop(%s)", (info.id,))

    def atlas_hashes(self, atlas: AtlasInfo) -> set[str]:
        """Content hashes of the images already stored (by any run): a rerun skips them."""
        return {r[0] for r in self._fetch("SELECT content_hash FROM atlas_image WHERE atlas_id = %s", (atlas.id,))}

    # ---- runs -----------------------------------------------------------

    def create_atlas_run(self, atlas: AtlasInfo, *, source: str, shard: int, num_shards: int,
                         images_total: int, hostname: str, pid: int) -> AtlasRunInfo:
        rid = self._fetch(
            "INSERT INTO atlas_run (atlas_id, source, shard, num_shards, images_total, hostname, pid) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (atlas.id, source, shard, num_shards, images_total, hostname, pid))[0][0]
        return self.get_atlas_run(rid)

    def get_atlas_run(self, run_id: int) -> AtlasRunInfo:
        rows = self._fetch(_RUN_SELECT + " WHERE id = %s", (run_id,))
        if not rows:
            raise InputError(f"no atlas run {run_id}")
        return AtlasRunInfo(*rows[0])

    def atlas_runs(self, atlas: AtlasInfo, *, shard: int | None = None, num_shards: int | None = None
                   ) -> list[AtlasRunInfo]:
        """Runs of an atlas (of one shard split, when given), newest first."""
        rows = self._fetch(
            _RUN_SELECT + " WHERE atlas_id = %(a)s AND (%(s)s::int IS NULL OR shard = %(s)s) "
            "AND (%(n)s::int IS NULL OR num_shards = %(n)s) ORDER BY id DESC",
            {"a": atlas.id, "s": shard, "n": num_shards})
        return [AtlasRunInfo(*r) for r in rows]

    def claim_atlas_run(self, run: AtlasRunInfo, *, hostname: str, pid: int, images_total: int) -> bool:
        """Take over a stopped run (compare-and-swap on status and pid); False if someone else did."""
        return bool(self._fetch(
            "UPDATE atlas_run SET status = 'running', hostname = %s, pid = %s, error = NULL, finished_at = NULL, "
            "heartbeat_at = now(), images_total = %s WHERE id = %s AND status = %s "
            "AND pid IS NOT DISTINCT FROM %s RETURNING id",
            (hostname, pid, images_total, run.id, run.status, run.pid)))

    def finish_atlas_run(self, run_id: int, status: str, error: str | None = None,
                         counters: Mapping[str, Any] | None = None) -> bool:
        """Record how a run ended; for 'done', whether every shard of its split is now done.

        The shards lock each other's rows in id order, so exactly one finisher
        sees them all done: that one builds the indexes.
        """
        with self.transaction() as conn:
            me = conn.execute("SELECT atlas_id, num_shards FROM atlas_run WHERE id = %s", (run_id,)).fetchone()
            siblings = conn.execute(
                "SELECT id, shard, status FROM atlas_run WHERE atlas_id = %s AND num_shards = %s "
                "ORDER BY id FOR UPDATE", (me[0], me[1])).fetchall() if me else []
            conn.execute(
                "UPDATE atlas_run SET status = %s, error = %s, heartbeat_at = now(), "
                "counters = coalesce(%s, counters), "
                "finished_at = CASE WHEN %s = 'done' THEN now() ELSE finished_at END WHERE id = %s",
                (status, error, Jsonb(dict(counters)) if counters is not None else None, status, run_id))
        if status != "done" or not me:
            return False
        done = {shard for rid, shard, st in siblings if st == "done" or rid == run_id}
        return len(done) == me[1]

    # ---- writing --------------------------------------------------------

    def write_atlas_image(self, atlas: AtlasInfo, run_id: int, rows: AtlasImageRows,
                          counters: Mapping[str, Any] | None = None) -> int | None:
        """Store one image with its patches, tokens and neighbours, and advance the run, atomically.

        Returns the image id, or None when the atlas already holds this
        content (another shard or run stored it first).
        """
        n = len(rows.patch_row)
        with self.transaction() as conn:
            conn.execute("SET LOCAL synchronous_commit = off")  # a lost commit is redone on resume
            got = conn.execute(
                "INSERT INTO atlas_image (atlas_id, content_hash, path, width, height, grid_rows, grid_cols, run_id) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (atlas_id, content_hash) DO NOTHING RETURNING id",
                (atlas.id, rows.content_hash, rows.path, int(rows.size[0]), int(rows.size[1]),
                 int(rows.grid[0]), int(rows.grid[1]), run_id)).fetchone()
            if got is None:
                return None
            image_id = int(got[0])
            b = np.asarray(rows.boxes, dtype=np.float64)
            conn.execute(
                "INSERT INTO atlas_patch (atlas_id, image_id, patch, row, col, x0, y0, x1, y1) "
                "SELECT %s, %s, t.* FROM unnest(%s::int[], %s::int[], %s::int[], %s::real[], %s::real[], "
                "%s::real[], %s::real[]) AS t",
                (atlas.id, image_id, list(range(n)), rows.patch_row.tolist(), rows.patch_col.tolist(),
                 b[:, 0].tolist(), b[:, 1].tolist(), b[:, 2].tolist(), b[:, 3].tolist()))
            parts = [HEADER]
            for layer in sorted(rows.vectors):
                parts.append(encode_rows(ATLAS_TOKEN_COLUMNS, {
                    "atlas_id": np.full(n, atlas.id, dtype=np.int32),
                    "layer": np.full(n, layer, dtype=np.int32),
                    "image_id": np.full(n, image_id, dtype=np.int64),
                    "patch": np.arange(n, dtype=np.int32),
                    "embedding": normalize_rows(rows.vectors[layer]),
                }))
            parts.append(TRAILER)
            cols = ", ".join(name for name, _ in ATLAS_TOKEN_COLUMNS)
            with conn.cursor().copy(f"COPY atlas_token ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(b"".join(parts))
            # text COPY built with one join: an image brings P x layers x k rows (11.5k at 576
            # patches, 2 layers, k = 10); INSERT ... unnest of Python lists took 6x as long
            with conn.cursor().copy(
                "COPY atlas_neighbour (atlas_id, layer, image_id, patch, rank, token_id, token, word, similarity, "
                "text_layer, sentence_id, position) FROM STDIN") as copy:
                copy.write(_neighbour_copy(atlas.id, image_id, rows))
            conn.execute("SELECT llens_atlas_add_rows(%s, %s, %s)",  # owner-run: writers append
                         (atlas.id, sorted(rows.vectors), n))
            conn.execute(
                "UPDATE atlas_run SET images_done = images_done + 1, patches_done = patches_done + %s, "
                "counters = coalesce(%s, counters), heartbeat_at = now() WHERE id = %s",
                (n, Jsonb(dict(counters)) if counters is not None else None, run_id))
        return image_id

    def heartbeat_atlas_run(self, run_id: int, counters: Mapping[str, Any]) -> None:
        self._fetch("UPDATE atlas_run SET counters = %s, heartbeat_at = now() WHERE id = %s RETURNING id",
                    (Jsonb(dict(counters)), run_id))

    # ---- indexes --------------------------------------------------------

    def build_atlas_index(self, atlas: AtlasInfo, layers: Sequence[int] | None = None) -> list[int]:
        todo = list(layers) if layers is not None else atlas.layers
        for layer in todo:
            with self.transaction() as conn:
                conn.execute("SELECT set_config('maintenance_work_mem', '1GB', true)")
                try:
                    conn.execute("SELECT llens_atlas_build_index(%s, %s)", (atlas.id, layer))
                except psycopg.errors.InvalidParameterValue as e:
                    raise InputError(first_line(e).removeprefix("llens: ")) from None
        return todo

    def analyze_atlas(self, atlas: AtlasInfo) -> None:
        """Planner statistics of the leaves and the neighbour table (the word index needs them)."""
        with self.transaction() as conn:
            for layer in atlas.layers:
                leaf = _one(conn.execute("SELECT llens_atlas_leaf_name(%s, %s)", (atlas.id, layer)).fetchone())
                conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(leaf)))
            conn.execute("ANALYZE atlas_neighbour")

    # ---- reading --------------------------------------------------------

    def atlas_find_word(self, atlas: AtlasInfo, word: str, *, layer: int | None = None, limit: int = 50,
                        offset: int = 0, max_rank: int | None = None) -> list[AtlasHit]:
        """Patches whose stored top-k words include ``word`` (case-insensitive), best similarity first."""
        rows = self._fetch(
            "SELECT * FROM llens_atlas_find(%s, %s, %s, %s, %s, %s)",
            (atlas.name, word, layer, int(limit), int(offset), max_rank))
        return [AtlasHit(image_id=r[0], path=r[1], content_hash=r[2], image_size=(r[3], r[4]), patch=r[5],
                         row=r[6], col=r[7], box=(r[8], r[9], r[10], r[11]), layer=r[12],
                         similarity=float(r[13]), rank=int(r[14]), word=r[15]) for r in rows]

    def atlas_words(self, atlas: AtlasInfo, *, layer: int | None = None, limit: int = 50) -> list[tuple[str, int]]:
        """The most frequent stored words (at rank 1) and how many patches have them."""
        return [(w, int(n)) for w, n in self._fetch(
            "SELECT lower(word), count(*) FROM atlas_neighbour WHERE atlas_id = %s AND rank = 1 "
            "AND (%s::int IS NULL OR layer = %s) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT %s",
            (atlas.id, layer, layer, int(limit)))]

    def atlas_knn(self, atlas: AtlasInfo, layer: int, queries: np.ndarray, k: int = 10, *,
                  exact: bool = False, ef_search: int | None = None) -> list[list[tuple[int, int, float]]]:
        """For each query, the k nearest (image_id, patch, similarity) of one atlas layer."""
        li = atlas.layer(layer)
        if li.row_count == 0:
            raise EmptyResult(f"atlas '{atlas.name}' has no visual tokens at layer {layer} yet")
        q = unit_queries(queries, atlas.hidden_size, atlas.name)
        k = check_k(k)
        out: list[list[tuple[int, int, float]]] = []
        with self.transaction() as conn:
            for v in q:
                rows = conn.execute(
                    "SELECT image_id, patch, distance FROM llens_atlas_knn(%s, %s, %s::halfvec, %s, %s, %s)",
                    (atlas.id, layer, _halfvec_text(v), k, bool(exact), ef_search)).fetchall()
                out.append([(int(i), int(p), 1.0 - float(d)) for i, p, d in rows])
        return out

    def atlas_sample(self, atlas: AtlasInfo, layer: int, rows: int = 2048) -> np.ndarray:
        """About ``rows`` stored visual tokens of a leaf (float16 [n, D]) by page sampling."""
        li = atlas.layer(layer)
        pct = min(100.0, 100.0 * 1.5 * rows / max(li.row_count, 1))
        with self.transaction() as conn:
            leaf = _one(conn.execute("SELECT llens_atlas_leaf_name(%s, %s)", (atlas.id, layer)).fetchone())
            src = sql.SQL("{} TABLESAMPLE SYSTEM ({}) REPEATABLE (0)").format(
                sql.Identifier(leaf), sql.Literal(pct)) if pct < 100 else sql.Identifier(leaf)
            payload = bytearray()
            with conn.cursor().copy(sql.SQL(
                    "COPY (SELECT embedding FROM {} LIMIT {}) TO STDOUT (FORMAT BINARY)").format(
                    src, sql.Literal(int(rows)))) as copy:
                for chunk in copy:
                    payload += chunk
        body = bytes(payload)[len(HEADER): -len(TRAILER)]
        if not body:
            return np.zeros((0, atlas.hidden_size), dtype=np.float16)
        return decode_rows((("embedding", "halfvec"),), body, atlas.hidden_size)["embedding"].astype(np.float16)

    def atlas_patch_hits(self, atlas: AtlasInfo, found: Sequence[tuple[int, int, int, float]]) -> list[AtlasHit]:
        """(layer, image_id, patch, similarity) -> AtlasHits with path and box, in the given order."""
        if not found:
            return []
        keys = sorted({(int(i), int(p)) for _, i, p, _ in found})
        rows = self._fetch(
            "SELECT i.id, i.path, i.content_hash, i.width, i.height, p.patch, p.row, p.col, p.x0, p.y0, p.x1, p.y1 "
            "FROM unnest(%s::bigint[], %s::int[]) AS k(image_id, patch) "
            "JOIN atlas_patch p ON p.atlas_id = %s AND p.image_id = k.image_id AND p.patch = k.patch "
            "JOIN atlas_image i ON i.id = k.image_id",
            ([k[0] for k in keys], [k[1] for k in keys], atlas.id))
        by = {(r[0], r[5]): r for r in rows}
        out = []
        for layer, i, p, sim in found:
            r = by.get((int(i), int(p)))
            if r is None:
                continue
            out.append(AtlasHit(image_id=r[0], path=r[1], content_hash=r[2], image_size=(r[3], r[4]), patch=r[5],
                                row=r[6], col=r[7], box=(r[8], r[9], r[10], r[11]), layer=int(layer),
                                similarity=float(sim)))
        return out

    def atlas_image(self, atlas: AtlasInfo, image_id: int) -> dict:
        """An image of an atlas: path, hash, size, grid."""
        rows = self._fetch(
            "SELECT id, path, content_hash, width, height, grid_rows, grid_cols FROM atlas_image "
            "WHERE atlas_id = %s AND id = %s", (atlas.id, int(image_id)))
        if not rows:
            raise InputError(f"atlas '{atlas.name}' has no image {image_id}")
        r = rows[0]
        return {"image_id": r[0], "path": r[1], "content_hash": r[2], "size": [r[3], r[4]], "grid": [r[5], r[6]]}

    def atlas_image_detail(self, atlas: AtlasInfo, image_id: int) -> tuple[dict, list[tuple], list[tuple]]:
        """An image's record, its patches (patch, row, col, x0, y0, x1, y1) and its stored neighbours
        (layer, patch, rank, token_id, token, word, similarity, text_layer, sentence_id, position)."""
        image = self.atlas_image(atlas, image_id)
        patches = self._fetch(
            "SELECT patch, row, col, x0, y0, x1, y1 FROM atlas_patch WHERE atlas_id = %s AND image_id = %s "
            "ORDER BY patch", (atlas.id, int(image_id)))
        neighbours = self._fetch(
            "SELECT layer, patch, rank, token_id, token, word, similarity, text_layer, sentence_id, position "
            "FROM atlas_neighbour WHERE atlas_id = %s AND image_id = %s ORDER BY layer, patch, rank",
            (atlas.id, int(image_id)))
        return image, patches, neighbours


def _one(row: tuple | None) -> Any:
    """The first column of a row a statement always returns."""
    assert row is not None
    return row[0]


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": ""})


def _copy_text(value: str | None) -> str:
    return "\\N" if value is None else value.translate(_COPY_ESCAPES)


def _neighbour_copy(atlas_id: int, image_id: int, rows: AtlasImageRows) -> bytes:
    """The neighbour rows of one image in COPY's text format."""
    head = f"{atlas_id}\t"
    mid = f"\t{image_id}\t"
    lines = [
        f"{head}{lay}{mid}{p}\t{r}\t{t}\t{_copy_text(tok)}\t{_copy_text(w)}\t{s!r}\t{tl}\t{sid}\t{pos}\n"
        for lay, p, r, t, tok, w, s, tl, sid, pos in zip(
            rows.nb_layer.tolist(), rows.nb_patch.tolist(), rows.nb_rank.tolist(), rows.nb_token_id.tolist(),
            rows.nb_token, rows.nb_word, rows.nb_similarity.tolist(), rows.nb_text_layer.tolist(),
            rows.nb_sentence_id.tolist(), rows.nb_position.tolist())
    ]
    return "".join(lines).encode("utf-8")


def _halfvec_text(v: np.ndarray) -> str:
    return "[" + ",".join(f"{float(x):.6g}" for x in v) + "]"
