"""The work behind the pages and the JSON API, calling the library as the CLI does.

Every function takes the process' ServeState and this request's Store; user
mistakes raise LatentLensError subclasses (one line, shown in the page or as
``{"error": ...}``), the few web-only ones defined here.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from latentlens.errors import EmptyResult, InputError, LatentLensError
from latentlens.serve.state import Draft, ServeState

MAX_QUERY_K = 100
MAX_TEXT_CHARS = 4000
MAX_SEARCH_CHARS = 200


class Forbidden(LatentLensError):
    """Not allowed here (a read-only server, another member's analysis)."""

    exit_code = 2


class NotFound(InputError):
    """No such analysis, evaluation or page."""


class UploadTooLarge(InputError):
    """An upload over the server's limit."""


def parse_layers(value: Any, name: str) -> list[int] | None:
    """'0,3,7', [0, 3, 7] -> [0, 3, 7]; None / '' / [] -> None (the default)."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    else:
        parts = list(value)
    if not parts:
        return None
    try:
        return [int(p) for p in parts]
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected comma-separated layer numbers, got {value!r}") from None


def check_k(k: int) -> int:
    if not 1 <= int(k) <= MAX_QUERY_K:
        raise InputError(f"k must be between 1 and {MAX_QUERY_K}")
    return int(k)


def current_user(store: Any) -> str:
    with store.transaction() as conn:
        return conn.execute("SELECT current_user").fetchone()[0]


def forbid_writes(state: ServeState) -> None:
    if state.read_only:
        raise Forbidden("this server is read-only (llens serve --read-only): nothing can be saved or deleted")


# ---------------------------------------------------------------------------
# models


def models_overview(state: ServeState, store: Any) -> list[dict]:
    """`llens models --json` plus each model's ingest runs and what this server has loaded."""
    models = state.lens(store).models()
    runs: dict[str, list[dict]] = {}
    for r in store.list_runs():
        runs.setdefault(r.model, []).append({
            "id": r.id, "corpus": r.corpus, "status": r.status, "layers": r.layers, "shard": r.shard,
            "num_shards": r.num_shards, "sentences_done": r.sentences_done, "sentences_total": r.sentences_total,
            "rows_written": r.rows_written, "error": r.error,
            "finished_at": r.finished_at.isoformat() if r.finished_at else None,
        })
    for m in models:
        m["runs"] = runs.get(m["model"], [])
        m["loaded"] = {"language_model": m["model"] in state.models, "vlm": m["model"] in state.vlms}
    return models


# ---------------------------------------------------------------------------
# queries


@contextlib.contextmanager
def _cold_cache(state: ServeState, lens: Any, info: Any, layers: Sequence[int] | None) -> Iterator[None]:
    """Say so while the first exact search copies leaves into the scan cache."""
    cold: list[int] = []
    if lens.searcher.has_torch:
        stored = set(info.layer_numbers)
        for layer in (layers if layers is not None else info.layer_numbers):
            if layer in stored:
                li = info.layer(layer)
                if li.row_count and lens.scan.cache.cached(info, layer, (li.row_count, li.version)) is None:
                    cold.append(layer)
    if not cold:
        yield
        return
    rows = sum(info.layer(x).row_count for x in cold)
    with state.activity(f"{len(cold)} layer(s) of {info.name} ({rows:,} rows) are not in the scan cache yet: "
                        "an exact search copies them first (once after each change)"):
        yield


def text_query(
    state: ServeState, store: Any, *, user: str | None, model: str, text: str, token: str | None = None,
    query_layers: Any = None, layers: Any = None, k: int = 5, methods: Any = "latentlens",
    mode: str = "auto", per_layer: bool = False,
) -> tuple[list[Any], str]:
    """``Lens.query_text`` (as `llens query --text`); returns the results and a draft token to save them."""
    from latentlens.lenses import parse_methods

    if not text or not text.strip():
        raise InputError("give a text to query")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"the text is longer than {MAX_TEXT_CHARS} characters")
    methods = parse_methods(methods)
    qls, searched = parse_layers(query_layers, "query layers"), parse_layers(layers, "searched layers")
    k = check_k(k)
    token = (token or "").strip() or None
    lens = state.lens(store)
    info = store.get_model(model)
    with state.job(f"text query on {info.name}"):
        state.language_model(info)
        with _cold_cache(state, lens, info, searched) if "latentlens" in methods else contextlib.nullcontext():
            results = lens.query_text(info.name, text, token=token, query_layers=qls, layers=searched, k=k,
                                      per_layer=per_layer, mode=mode, methods=methods)
    params = {"token": token, "query_layers": qls, "layers": searched, "k": k, "methods": methods,
              "mode": mode, "per_layer": per_layer}
    draft = state.put_draft(Draft("text", user, info.name, params, results, text=text))
    return results, draft


def read_image(data: bytes, limit: int) -> Any:
    """Check an upload's size and that Pillow reads it; the RGB image (EXIF rotation applied)."""
    from PIL import Image, UnidentifiedImageError

    from latentlens.vlm.extract import load_image

    if not data:
        raise InputError("no image was uploaded")
    if len(data) > limit:
        raise UploadTooLarge(f"the image is {_mb(len(data))} MB; this server accepts at most {_mb(limit)} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except UnidentifiedImageError:
        raise InputError("the upload is not an image (any format Pillow reads: PNG, JPEG, WebP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError("the image has too many pixels to process") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"the image could not be decoded: {msg}") from None
    return load_image(img)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f}".rstrip("0").rstrip(".")


def image_query(
    state: ServeState, store: Any, *, user: str | None, model: str, image_bytes: bytes,
    image_name: str | None = None, visual_layers: Any = None, layers: Any = None, k: int = 5,
    patches: str = "all", methods: Any = "latentlens", prompt: str | None = None,
    resolution: str | None = None, mode: str = "auto",
) -> tuple[Any, Any, str]:
    """``query_image`` (as `llens query --image`) with the server's VLM; (result, image, draft token)."""
    from latentlens.lenses import parse_methods
    from latentlens.search import validate_layers
    from latentlens.store.types import check_layer_range
    from latentlens.vlm.query import parse_patches, query_image

    img = read_image(image_bytes, state.max_upload_bytes)
    methods = parse_methods(methods)
    vls, searched = parse_layers(visual_layers, "visual layers"), parse_layers(layers, "searched layers")
    k = check_k(k)
    patches = (patches or "all").strip()
    lens = state.lens(store)
    info = store.get_model(model)
    # what query_image checks before it loads a VLM, checked before this server loads one
    if "latentlens" in methods:
        validate_layers(info, searched)
    if vls is not None:
        check_layer_range(vls, info.num_layers, info.name, visual=True)
    parse_patches(patches)
    with state.job(f"image query on {info.name}"):
        vlm = state.vlm(info)
        with _cold_cache(state, lens, info, searched) if "latentlens" in methods else contextlib.nullcontext():
            result = query_image(lens, info.name, img, visual_layers=vls, layers=searched, k=k, patches=patches,
                                 prompt=(prompt or "").strip() or None, resolution=(resolution or "").strip() or None,
                                 mode=mode, vlm=vlm, methods=methods)
    name = Path(image_name or "image").name[:200] or "image"
    params = {"visual_layers": result.visual_layers, "layers": searched, "k": k, "patches": patches,
              "methods": methods, "prompt": result.prompt, "resolution": resolution or None, "mode": mode}
    draft = state.put_draft(Draft("image", user, info.name, params, result, image_bytes=image_bytes,
                                  image_name=name))
    return result, img, draft


# ---------------------------------------------------------------------------
# saved analyses


def save_draft(state: ServeState, store: Any, draft: str, *, user: str | None, title: str | None = None) -> int:
    """Save a page's result (a draft) as an analysis, with latentlens.analyses like `--save`."""
    from latentlens.analyses import save_image, save_text

    forbid_writes(state)
    d = state.get_draft(draft, user)
    title = (title or "").strip() or None
    if d.kind == "text":
        return save_text(store, d.model, d.text or "", d.results, params=d.params, title=title)
    return save_image(store, d.results, d.image_bytes or b"", params=d.params, image_name=d.image_name,
                      title=title)


def get_analysis(store: Any, analysis_id: int, *, with_data: bool = False) -> Any:
    try:
        return store.get_analysis(analysis_id, with_data=with_data)
    except InputError as e:
        raise NotFound(str(e)) from None


def delete_analysis(state: ServeState, store: Any, analysis_id: int) -> None:
    forbid_writes(state)
    get_analysis(store, analysis_id)
    try:
        store.delete_analysis(analysis_id)
    except InputError as e:  # RLS: another member's
        raise Forbidden(str(e)) from None


def image_analysis(store: Any, analysis_id: int) -> tuple[Any, Any, Any]:
    """A saved image analysis as (result, image, record), without loading any model."""
    from latentlens.analyses import load_image_analysis

    get_analysis(store, analysis_id)
    return load_image_analysis(store, analysis_id)


# ---------------------------------------------------------------------------
# evaluations


def eval_summary(store: Any, run: str) -> tuple[Any, list[Any]]:
    from latentlens.eval.summary import summarize

    try:
        info = store.get_eval_run(run)
    except InputError as e:
        raise NotFound(str(e)) from None
    return info, summarize(store.eval_counts(info), info.methods)


def eval_plot(state: ServeState, info: Any, rows: Sequence[Any]) -> bytes:
    from latentlens.eval.summary import write_plot

    if not rows:
        raise NotFound(f"eval run '{info.name}' has no verdicts yet")
    with tempfile.TemporaryDirectory(prefix="llens-plot-") as tmp, state.plot_lock:
        path = write_plot(rows, Path(tmp) / "plot.png", title=f"{info.name}: {info.model}, judge {info.judge}")
        return path.read_bytes()


# ---------------------------------------------------------------------------
# context search: a word or phrase -> its stored occurrences, from llens_contexts (token_context)


def _has_bm25(store: Any) -> bool:
    """pg_textsearch installed, with a bm25 index on sentence(text) to rank by."""
    with store.transaction() as conn:
        return bool(conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_textsearch') AND EXISTS ("
            "SELECT 1 FROM pg_indexes WHERE tablename = 'sentence' AND indexdef ILIKE '%%using bm25%%')"
        ).fetchone()[0])


# On Citus llens_contexts is PL/pgSQL (it cannot be inlined there) and would read every
# layer of the model: the view, filtered by the model's id, is sent to the shards instead.
_CONTEXTS = "llens_contexts(%(model)s)"
_CONTEXTS_CITUS = "(SELECT * FROM token_context WHERE model_id = %(mid)s)"

_SEARCH_SQL = """
WITH s AS (
    SELECT s.id, row_number() OVER (ORDER BY {order}) AS rank
      FROM sentence s
     WHERE s.text ILIKE %(pat)s
       AND s.corpus_id IN (SELECT corpus_id FROM ingest_run WHERE model_id = %(mid)s)
     ORDER BY {order}
     LIMIT %(cand)s
)
SELECT c.sentence_id, c.sentence, c.position, c.token, c.char_start, c.char_end
  FROM s JOIN {contexts} c ON c.sentence_id = s.id AND c.layer = %(layer)s
 ORDER BY s.rank, c.position
"""


def context_search(store: Any, model: str, query: str, *, layer: int | None = None, limit: int = 50) -> dict:
    """Where a word or phrase occurs among a model's stored contexts (whole words, any case).

    Sentences containing it are found by ILIKE (ranked by BM25 where the
    server has pg_textsearch and a bm25 index on sentence.text), then its
    stored tokens at one layer come from ``llens_contexts``: each
    occurrence with the tokens that cover it.
    """
    import psycopg

    q = " ".join((query or "").split())
    if not q:
        raise InputError("type a word or phrase to search for")
    if len(q) > MAX_SEARCH_CHARS:
        raise InputError(f"search for at most {MAX_SEARCH_CHARS} characters")
    limit = max(1, min(int(limit), 500))
    info = store.get_model(model)
    stored = info.layer_numbers
    if not stored:
        raise EmptyResult(f"model '{info.name}' has no stored layers yet: run `llens ingest`")
    layer = info.layer(stored[0] if layer is None else int(layer)).layer
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    args = {"pat": f"%{escaped}%", "mid": info.id, "cand": min(limit * 4, 2000), "model": info.name,
            "layer": layer, "q": q}
    ranking = "bm25" if _has_bm25(store) else "sentence order"
    contexts = _CONTEXTS_CITUS if store.citus() else _CONTEXTS
    rows = None
    if ranking == "bm25":
        try:
            with store.transaction() as conn:
                rows = conn.execute(_SEARCH_SQL.format(order="s.text <@> %(q)s", contexts=contexts), args).fetchall()
        except psycopg.Error:
            ranking = "sentence order"
    if rows is None:
        with store.transaction() as conn:
            rows = conn.execute(_SEARCH_SQL.format(order="s.id", contexts=contexts), args).fetchall()
    word = re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in q.split()) + r"(?!\w)", re.IGNORECASE)
    by_sentence: dict[int, tuple[str, list[tuple]]] = {}
    for sid, sentence, pos, tok, cs, ce in rows:
        by_sentence.setdefault(sid, (sentence, []))[1].append((pos, tok, cs, ce))
    found = []
    for sid, (sentence, tokens) in by_sentence.items():
        for m in word.finditer(sentence):
            a, b = m.span()
            covering = [{"position": p, "token": t, "char_start": cs, "char_end": ce}
                        for p, t, cs, ce in tokens if cs is not None and ce is not None and cs < b and ce > a]
            if not covering:
                continue  # not stored at this position (e.g. --skip-positions)
            found.append({"sentence_id": sid, "sentence": sentence, "char_start": a, "char_end": b,
                          "tokens": covering})
            if len(found) >= limit:
                break
        if len(found) >= limit:
            break
    return {"model": info.name, "query": q, "layer": layer, "layers": stored, "ranking": ranking,
            "occurrences": found}
