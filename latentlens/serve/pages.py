"""The HTML pages: server-rendered (Jinja2), a little script for waiting on long queries.

Query forms post in the background (static/app.js) and get back an HTML
fragment (header ``X-Fragment: 1``); without script they get the whole page.
The image grid is the report's own page (latentlens.report.render_html) in
an iframe, so the web app and `llens report` show exactly the same thing.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from latentlens import __version__
from latentlens.errors import InputError
from latentlens.lenses import METHODS
from latentlens.report import METHOD_NAMES
from latentlens.serve import work
from latentlens.serve.deps import Session, session
from latentlens.serve.work import is_vlm

router = APIRouter(include_in_schema=False)


def _globals(request: Request) -> dict:
    state = request.app.state.llens
    return {"llens": state, "version": __version__, "path": request.url.path}


def spans(n: dict) -> tuple[str, str, str]:
    """A sentence split around its marked token: (before, token, after); the template escapes each."""
    s, a, b = n.get("sentence") or "", n.get("char_start"), n.get("char_end")
    if a is None or b is None or not 0 <= a < b <= len(s):
        return s, "", ""
    return s[:a], s[a:b], s[b:]


TEMPLATES = Jinja2Templates(directory=str(files("latentlens.serve").joinpath("templates")),
                            context_processors=[_globals])
TEMPLATES.env.filters["spans"] = spans
TEMPLATES.env.globals["METHOD_NAMES"] = METHOD_NAMES
TEMPLATES.env.globals["METHODS"] = METHODS


def page(request: Request, name: str, s: Session | None, status_code: int = 200, **ctx: Any) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, name, {"user": s.user if s else None, **ctx},
                                      status_code=status_code)


def fragment(request: Request) -> bool:
    return bool(request.headers.get("x-fragment"))


def _models(s: Session, chosen: str | None = None) -> list[dict]:
    """The stored models for a form's menu; ``chosen`` (from the URL) must be one of them."""
    models = [{"name": m.name, "layers": m.layer_numbers, "rows": m.row_count, "vlm": is_vlm(m.architecture)}
              for m in s.store.list_models()]
    if chosen and chosen not in {m["name"] for m in models}:
        s.store.get_model(chosen)  # UnknownModel: one line naming it and the stored models
    return models


def _other_vlms(s: Session, model: str) -> list[str]:
    """The VLMs an image result of ``model`` can be compared with: the image form's, less ``model``."""
    return [m["name"] for m in _models(s) if m["vlm"] and m["name"] != model]


def _default_vlm(models: list[dict], chosen: str | None) -> str | None:
    """The image form's model: the one asked for, else the first vision-language model."""
    return chosen or next((m["name"] for m in models if m["vlm"]), None)


def shown_contexts(r: dict) -> list[dict]:
    """A result dict's distinct contexts (computed from its raw list when saved before they were kept)."""
    if r.get("contexts") is not None:
        return list(r["contexts"])
    from latentlens.query import Neighbour, distinct_contexts

    ns = [Neighbour(**{k: v for k, v in n.items() if k != "word"}) for n in r.get("neighbours") or []]
    return [n.to_dict() for n in distinct_contexts(ns)]


def text_grid(results: list[dict]) -> dict:
    """Text results as tokens (rows) x query layers (columns); each cell's ``shown``: its distinct contexts."""
    layers = sorted({r["query_layer"] for r in results if r.get("query_layer") is not None})
    rows: dict[int, dict] = {}
    for r in results:
        row = rows.setdefault(r["index"], {"index": r["index"], "token": r.get("query_token"), "cells": {}})
        row["cells"][r.get("query_layer")] = {**r, "shown": shown_contexts(r)}
    return {"layers": layers or [None], "rows": [rows[i] for i in sorted(rows)]}


# ---------------------------------------------------------------------------


@router.get("/")
def home() -> Response:
    return RedirectResponse("/models", status_code=303)


@router.get("/models")
def models_page(request: Request, s: Session = Depends(session)) -> Response:
    return page(request, "models.html", s, models=work.models_overview(s.state, s.store))


@router.get("/search")
def search_page(request: Request, model: str | None = None, q: str | None = None, layer: int | None = None,
                s: Session = Depends(session)) -> Response:
    models = _models(s, model)
    found = work.context_search(s.store, model, q, layer=layer) if model and q and q.strip() else None
    return page(request, "search.html", s, models=models, model=model, q=q or "", found=found)


@router.get("/text")
def text_page(request: Request, model: str | None = None, s: Session = Depends(session)) -> Response:
    return page(request, "text.html", s, models=_models(s, model), form={"model": model, "k": 5,
                                                                         "methods": ["latentlens"]})


@router.post("/text")
def text_run(
    request: Request, model: str = Form(), text: str = Form(), token: str = Form(""),
    query_layers: str = Form(""), layers: str = Form(""), k: int = Form(5), methods: list[str] = Form(None),
    mode: str = Form("auto"), s: Session = Depends(session),
) -> Response:
    results, draft = work.text_query(s.state, s.store, user=s.user, model=model, text=text, token=token,
                                     query_layers=query_layers, layers=layers, k=k, methods=methods, mode=mode)
    ctx: dict[str, Any] = {"grid": text_grid([r.to_dict() for r in results]), "draft": draft, "model": model,
                           "text": text}
    if fragment(request):
        return page(request, "_text_results.html", s, **ctx)
    form = {"model": model, "text": text, "token": token, "query_layers": query_layers, "layers": layers,
            "k": k, "methods": methods or ["latentlens"]}
    return page(request, "text.html", s, models=_models(s), form=form, **ctx)


@router.get("/image")
def image_page(request: Request, model: str | None = None, s: Session = Depends(session)) -> Response:
    models = _models(s, model)
    return page(request, "image.html", s, models=models, form={"model": _default_vlm(models, model), "k": 5,
                                                               "patches": "all", "methods": ["latentlens"]})


@router.post("/image")
def image_run(
    request: Request, image: UploadFile = File(), model: str = Form(), visual_layers: str = Form(""),
    layers: str = Form(""), k: int = Form(5), patches: str = Form("all"), methods: list[str] = Form(None),
    prompt: str = Form(""), resolution: str = Form(""), s: Session = Depends(session),
) -> Response:
    data = image.file.read(s.state.max_upload_bytes + 1)
    result, _img, draft = work.image_query(
        s.state, s.store, user=s.user, model=model, image_bytes=data, image_name=image.filename,
        visual_layers=visual_layers, layers=layers, k=k, patches=patches, methods=methods, prompt=prompt,
        resolution=resolution,
    )
    ctx = {"result": result, "draft": draft, "image_name": image.filename,
           "compare_models": _other_vlms(s, result.model)}
    if fragment(request):
        return page(request, "_image_result.html", s, **ctx)
    form = {"model": model, "visual_layers": visual_layers, "layers": layers, "k": k, "patches": patches,
            "methods": methods or ["latentlens"], "prompt": prompt, "resolution": resolution}
    return page(request, "image.html", s, models=_models(s), form=form, **ctx)


@router.get("/drafts/{draft}/report")
def draft_report(draft: str, s: Session = Depends(session)) -> Response:
    from latentlens.report import render_html

    d = s.state.get_draft(draft, s.user)
    if d.kind != "image":
        raise work.NotFound("that result has no image grid")
    img = work.read_image(d.image_bytes or b"", len(d.image_bytes or b"") + 1, s.state.max_image_pixels)
    return HTMLResponse(render_html(d.results, img, title=f"{d.model}: {d.image_name} (not saved)"))


def _view(spec: str, what: str) -> tuple[int, str]:
    """"8:latentlens" -> (8, "latentlens"): one side of a comparison."""
    layer, _, method = (spec or "").partition(":")
    try:
        return int(layer), (method or "latentlens").strip().lower()
    except ValueError:
        raise InputError(f"{what}: expected LAYER:METHOD such as 8:latentlens, got {spec!r}") from None


def compare_html(result: Any, img: Any, a: str, b: str, title: str) -> HTMLResponse:
    from latentlens.compare import Side, compare, render_compare_html

    (la, ma), (lb, mb) = _view(a, "a"), _view(b, "b")
    cmp = compare(Side(result, la, ma), Side(result, lb, mb))
    return HTMLResponse(render_compare_html(cmp, img, title=title))


@router.get("/drafts/{draft}/compare")
def draft_compare(draft: str, a: str, b: str, s: Session = Depends(session)) -> Response:
    """Two views (visual layer:method) of a draft image result side by side."""
    d = s.state.get_draft(draft, s.user)
    if d.kind != "image":
        raise work.NotFound("that result has no image grid")
    img = work.read_image(d.image_bytes or b"", len(d.image_bytes or b"") + 1, s.state.max_image_pixels)
    return compare_html(d.results, img, a, b, f"{d.model}: {d.image_name}, {a} vs {b}")


def compare_models_html(s: Session, result: Any, img: Any, image_bytes: bytes, image_name: str | None,
                        params: dict, model_b: str, a: str, layer_b: str) -> HTMLResponse:
    from latentlens.compare import render_compare_html

    cmp = work.compare_models(s.state, s.store, user=s.user, result=result, image_bytes=image_bytes,
                              image_name=image_name, params=params or {}, model_b=model_b, view=_view(a, "a"),
                              layer_b=work.optional_layer(layer_b, "B's layer"))
    title = f"{image_name or 'image'}: {cmp.left.result.model} vs {cmp.right.result.model}"
    return HTMLResponse(render_compare_html(cmp, img, title=title))


@router.post("/drafts/{draft}/compare-model")
def draft_compare_model(draft: str, model_b: str = Form(""), a: str = Form(""), layer_b: str = Form(""),
                        s: Session = Depends(session)) -> Response:
    """View A of a draft image result against the same image through another VLM (it runs that model:
    a POST, so the perimeter's same-origin check applies)."""
    d = s.state.get_draft(draft, s.user)
    if d.kind != "image":
        raise work.NotFound("that result has no image grid")
    img = work.read_image(d.image_bytes or b"", len(d.image_bytes or b"") + 1, s.state.max_image_pixels)
    return compare_models_html(s, d.results, img, d.image_bytes or b"", d.image_name, d.params, model_b, a, layer_b)


# ---------------------------------------------------------------------------
# saved analyses


@router.post("/analyses")
def save_page(draft: str = Form(), title: str = Form(""), s: Session = Depends(session)) -> Response:
    analysis_id = work.save_draft(s.state, s.store, draft, user=s.user, title=title)
    return RedirectResponse(f"/analyses/{analysis_id}", status_code=303)


@router.get("/analyses")
def analyses_page(request: Request, model: str = "", author: str = "", title: str = "", kind: str = "",
                  s: Session = Depends(session)) -> Response:
    found = s.store.list_analyses(model=model or None, author=author or None, title=title or None,
                                  kind=kind or None, limit=200)
    return page(request, "analyses.html", s, analyses=found, me=s.store.current_user(),
                filters={"model": model, "author": author, "title": title, "kind": kind})


@router.get("/analyses/{analysis_id}")
def analysis_page(request: Request, analysis_id: int, s: Session = Depends(session)) -> Response:
    a = work.get_analysis(s.store, analysis_id)
    grid = text_grid(a.result) if a.kind in ("text", "vectors") and isinstance(a.result, list) else None
    result = None
    if a.kind == "image" and isinstance(a.result, dict) and a.result.get("layers"):
        from latentlens.vlm.query import ImageQueryResult

        result = ImageQueryResult.from_dict(a.result)  # its views, for the comparison form
    others = _other_vlms(s, result.model) if result is not None else []
    return page(request, "analysis.html", s, a=a, grid=grid, result=result, compare_models=others,
                me=s.store.current_user())


@router.get("/analyses/{analysis_id}/report")
def analysis_report(analysis_id: int, s: Session = Depends(session)) -> Response:
    from latentlens.report import render_html

    result, img, a = work.image_analysis(s.store, analysis_id)
    return HTMLResponse(render_html(result, img, title=a.title or f"Analysis {a.id}: {a.model}"))


@router.get("/analyses/{analysis_id}/compare")
def analysis_compare(analysis_id: int, a: str, b: str, s: Session = Depends(session)) -> Response:
    result, img, an = work.image_analysis(s.store, analysis_id)
    return compare_html(result, img, a, b, f"{an.title or f'Analysis {an.id}'}: {a} vs {b}")


@router.post("/analyses/{analysis_id}/compare-model")
def analysis_compare_model(analysis_id: int, model_b: str = Form(""), a: str = Form(""), layer_b: str = Form(""),
                           s: Session = Depends(session)) -> Response:
    """View A of a saved image analysis against its image through another VLM."""
    result, img, an = work.image_analysis(s.store, analysis_id)
    return compare_models_html(s, result, img, an.input_data or b"", (an.input or {}).get("image"), an.params or {},
                               model_b, a, layer_b)


@router.post("/analyses/{analysis_id}/delete")
def delete_page(analysis_id: int, s: Session = Depends(session)) -> Response:
    work.delete_analysis(s.state, s.store, analysis_id)
    return RedirectResponse("/analyses", status_code=303)


# ---------------------------------------------------------------------------
# evaluations, and the API reference


@router.get("/evals")
def evals_page(request: Request, s: Session = Depends(session)) -> Response:
    return page(request, "evals.html", s, runs=s.store.list_eval_runs())


@router.get("/evals/{run}")
def eval_page(request: Request, run: str, s: Session = Depends(session)) -> Response:
    info, rows = work.eval_summary(s.store, run)
    return page(request, "eval.html", s, run=info, rows=rows)


@router.get("/docs")
def swagger_moved() -> Response:
    """Swagger UI needs script from a CDN (a blank page offline): the offline reference instead."""
    return RedirectResponse("/api-docs", status_code=308)


@router.get("/api-docs")
def api_docs(request: Request) -> Response:
    """The API's endpoints from its OpenAPI schema, without Swagger UI's CDN assets."""
    spec = request.app.openapi()
    ops = []
    for path, item in spec.get("paths", {}).items():
        for method, op in item.items():
            params = [p.get("name") for p in op.get("parameters", []) if p.get("in") in ("query", "path")]
            body = op.get("requestBody", {}).get("content", {})
            ops.append({"method": method.upper(), "path": path, "summary": op.get("summary", ""),
                        "params": params, "body": next(iter(body), None)})
    return page(request, "api.html", None, ops=ops)
