"""The work behind the pages and the JSON API, calling the library as the CLI does.

Every function takes the process' ServeState and this request's Store; user
mistakes raise LatentLensError subclasses (one line, shown in the page or as
``{"error": ...}``), the few web-only ones defined here.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

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
            "id": r.id, "kind": r.kind, "corpus": r.corpus, "status": r.status, "layers": r.layers, "shard": r.shard,
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


def read_image(data: bytes, limit: int, max_pixels: int | None) -> Any:
    """An upload as an upright RGB image: its size checked, then ``load_image`` (the one image
    reader of every path: header-checked pixel budget, EXIF orientation)."""
    from latentlens.images import load_image

    if not data:
        raise InputError("no image was uploaded")
    if len(data) > limit:
        raise UploadTooLarge(f"the image is {_mb(len(data))} MB; this server accepts at most {_mb(limit)} MB")
    return load_image(data, max_pixels=max_pixels)


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
    from latentlens.search import Mode, validate_layers
    from latentlens.store.types import check_layer_range
    from latentlens.vlm.query import parse_patches, query_image

    img = read_image(image_bytes, state.max_upload_bytes, state.max_image_pixels)
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
                                 mode=cast(Mode, mode), vlm=vlm, methods=methods)  # the search checks it
    name = Path(image_name or "image").name[:200] or "image"
    params = {"visual_layers": result.visual_layers, "layers": searched, "k": k, "patches": patches,
              "methods": methods, "prompt": result.prompt, "resolution": resolution or None, "mode": mode}
    draft = state.put_draft(Draft("image", user, info.name, params, result, image_bytes=image_bytes,
                                  image_name=name))
    return result, img, draft


def optional_layer(value: str | None, what: str = "layer") -> int | None:
    """A form's layer field: None when empty, else its number (a one-line 400 when it is not one)."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{what}: expected a layer number, got {value!r}") from None


_VLM_MARKS = ("ForConditionalGeneration", "VL", "Vision", "Llava", "Molmo", "Idefics", "PaliGemma")


def is_vlm(architecture: str | None) -> bool:
    """Whether a stored model's architecture is a vision-language model's (its image side can run)."""
    return bool(architecture) and any(m in (architecture or "") for m in _VLM_MARKS)


def compare_models(
    state: ServeState, store: Any, *, user: str | None, result: Any, image_bytes: bytes, image_name: str | None,
    params: dict, model_b: str, view: tuple[int, str], layer_b: int | None = None,
) -> Any:
    """An image result's view A against the same image through another stored VLM, as
    `llens report --compare MODEL_B` does: MODEL_B runs through ``image_query`` (the image form's
    path) with the result's prompt, resolution, k and visual layers (those MODEL_B has), and B's
    layer is paired with A's by ``latentlens.compare.paired_layer`` unless ``layer_b`` is given."""
    from latentlens.compare import Side, compare, paired_layer

    name = (model_b or "").strip()
    if not name:
        raise InputError("pick a second model to compare with")
    info = store.get_model(name)  # UnknownModel: one line naming the stored models
    if info.name == result.model:
        raise InputError(f"'{info.name}' is this result's own model: pick another model to compare with "
                         "(two layers or methods of one model: the other Compare form)")
    if not is_vlm(info.architecture):
        raise InputError(f"'{info.name}' is a text-only model ({info.architecture or 'no architecture recorded'}): "
                         "compare with a vision-language model")
    left = Side(result, view[0], view[1]).check()
    vls = sorted({v for v in result.visual_layers if v <= info.num_layers} | ({layer_b} if layer_b is not None else set()))
    patches = str(params.get("patches") or "all").strip()
    # another grid puts explicit cells elsewhere: B is read everywhere and matched by patch centre
    patches = patches if patches in ("all", "center") and not params.get("sample") else "all"
    result_b, _img, _draft = image_query(
        state, store, user=user, model=info.name, image_bytes=image_bytes, image_name=image_name,
        visual_layers=vls or None, k=result.k, patches=patches, methods=[left.method], prompt=result.prompt or None,
        resolution=params.get("resolution") or None, mode=str(params.get("mode") or "auto"),
    )
    right_layer = layer_b if layer_b is not None else paired_layer(left.visual_layer, result_b)
    return compare(left, Side(result_b, right_layer, left.method))


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


def eval_plot(state: ServeState, store: Any, info: Any, rows: Sequence[Any]) -> bytes:
    from latentlens.eval.summary import figure_text, write_plot

    if not rows:
        raise NotFound(f"eval run '{info.name}' has no verdicts yet")
    n_images, n_patches = store.eval_extent(info)
    title, caption = figure_text(info.model, info.judge, info.judge_settings, n_images, n_patches, info.name)
    with tempfile.TemporaryDirectory(prefix="llens-plot-") as tmp, state.plot_lock:
        path = write_plot(rows, Path(tmp) / "plot.png", title=title, caption=caption)
        return path.read_bytes()


# ---------------------------------------------------------------------------
# context search: a word or phrase -> its stored occurrences, from llens_contexts (token_context)


def context_search(store: Any, model: str, query: str, *, layer: int | None = None, limit: int = 50) -> dict:
    """Where a word or phrase occurs among a model's stored contexts (whole words, any case).

    Sentences containing it are found by ILIKE (ranked by BM25 where the
    server has pg_textsearch and a bm25 index on sentence.text), then its
    stored tokens at one layer come from ``llens_contexts``: each
    occurrence with the tokens that cover it.
    """
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
    ranking = "bm25" if store.has_bm25() else "sentence order"
    rows, ranking = store.phrase_tokens(info, q, layer=layer, candidates=min(limit * 4, 2000), ranking=ranking)
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
