"""The JSON API: /api/... (OpenAPI at /openapi.json, Swagger UI at /docs).

Query responses are exactly `llens query --json`'s output (a list of results
for a text, one object for an image). What the server adds goes in headers:
``X-Llens-Draft`` (a token: ``POST /api/analyses {"draft": ...}`` saves that
result for a few hours) and, with ``save``, ``X-Llens-Analysis`` and
``Location`` (the saved analysis).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from latentlens import __version__
from latentlens.serve import work
from latentlens.serve.deps import Session, get_state, session

router = APIRouter(prefix="/api")


class Json(JSONResponse):
    """JSON as the CLI prints it (non-ASCII kept; anything odd as a string)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, default=str, separators=(",", ":")).encode("utf-8")


def _saved(response: Response, analysis_id: int) -> None:
    response.headers["X-Llens-Analysis"] = str(analysis_id)
    response.headers["Location"] = f"/api/analyses/{analysis_id}"


@router.get("/status", summary="What the server is doing now (polled by the pages while they wait)")
def status(request: Request) -> dict:
    state = get_state(request)
    return {"busy": state.activities(), "loaded": state.loaded(), "read_only": state.read_only,
            "sign_in": state.auth, "database": "embedded" if state.embedded else "server",
            "max_upload_bytes": state.max_upload_bytes, "version": __version__}


@router.get("/models", summary="Models, their layers (rows, index), rows and corpora: `llens models --json`")
def models(s: Session = Depends(session)) -> Response:
    return Json(s.state.lens(s.store).models())


@router.post("/query/text", summary="Neighbours of a text's tokens: `llens query MODEL --text ... --json`")
def query_text(
    model: str = Body(description="A stored model (`llens models`)."),
    text: str = Body(description="The text to run the model on."),
    token: str | None = Body(None, description="Only this token of the text (e.g. dog)."),
    query_layers: list[int] | str | None = Body(None, description="Hidden states of the text to query "
                                                "(default: every stored layer)."),
    layers: list[int] | str | None = Body(None, description="Stored layers searched (default: all)."),
    k: int = Body(5, ge=1, le=work.MAX_QUERY_K),
    methods: list[str] | str = Body("latentlens", description="latentlens, logitlens, embeddinglens or all."),
    mode: Literal["auto", "exact", "ann"] = Body("auto"),
    per_layer: bool = Body(False),
    save: bool = Body(False, description="Also save it as an analysis (needs a writer)."),
    title: str | None = Body(None, max_length=500),
    s: Session = Depends(session),
) -> Response:
    if save:
        work.forbid_writes(s.state)
    results, draft = work.text_query(
        s.state, s.store, user=s.user, model=model, text=text, token=token, query_layers=query_layers,
        layers=layers, k=k, methods=methods, mode=mode, per_layer=per_layer,
    )
    response = Json([r.to_dict() for r in results])
    response.headers["X-Llens-Draft"] = draft
    if save:
        _saved(response, work.save_draft(s.state, s.store, draft, user=s.user, title=title))
    return response


@router.post("/query/image", summary="Neighbours of an image's visual tokens: `llens query MODEL --image ... --json`")
def query_image(
    image: UploadFile = File(description="The image (any format Pillow reads; size-limited)."),
    model: str = Form(description="A stored vision-language model."),
    visual_layers: str | None = Form(None, description="e.g. 0,8,16 (default: the stored layers)."),
    layers: str | None = Form(None, description="Stored layers searched (default: all)."),
    k: int = Form(5, ge=1, le=work.MAX_QUERY_K),
    patches: str = Form("all", description='all, center, or "r,c;r,c".'),
    methods: str = Form("latentlens", description="latentlens, logitlens, embeddinglens or all (comma-separated)."),
    prompt: str | None = Form(None),
    resolution: str | None = Form(None, description="e.g. 448 or 448x336."),
    mode: Literal["auto", "exact", "ann"] = Form("auto"),
    save: bool = Form(False),
    title: str | None = Form(None, max_length=500),
    s: Session = Depends(session),
) -> Response:
    if save:
        work.forbid_writes(s.state)
    data = image.file.read(s.state.max_upload_bytes + 1)
    result, _img, draft = work.image_query(
        s.state, s.store, user=s.user, model=model, image_bytes=data, image_name=image.filename,
        visual_layers=visual_layers, layers=layers, k=k, patches=patches, methods=methods, prompt=prompt,
        resolution=resolution, mode=mode,
    )
    response = Json(result.to_dict())
    response.headers["X-Llens-Draft"] = draft
    if save:
        _saved(response, work.save_draft(s.state, s.store, draft, user=s.user, title=title))
    return response


@router.get("/search", summary="Where a word or phrase occurs among a model's stored contexts")
def search(model: str, q: str, layer: int | None = None, limit: int = Query(50, ge=1, le=500),
           s: Session = Depends(session)) -> Response:
    return Json(work.context_search(s.store, model, q, layer=layer, limit=limit))


@router.get("/analyses", summary="Saved analyses, newest first (without their results)")
def list_analyses(model: str | None = None, author: str | None = None, title: str | None = None,
                  kind: Literal["text", "vectors", "image", "eval"] | None = None,
                  limit: int = Query(100, ge=1, le=1000), s: Session = Depends(session)) -> Response:
    found = s.store.list_analyses(model=model, author=author, title=title, kind=kind, limit=limit)
    return Json([a.to_dict(result=False) for a in found])


@router.post("/analyses", status_code=201, summary="Save a query's result (its draft) as an analysis")
def save_analysis(
    draft: str = Body(description="The X-Llens-Draft header of a query response."),
    title: str | None = Body(None, max_length=500),
    s: Session = Depends(session),
) -> Response:
    analysis_id = work.save_draft(s.state, s.store, draft, user=s.user, title=title)
    response = Json({"id": analysis_id, "url": f"/analyses/{analysis_id}"}, status_code=201)
    _saved(response, analysis_id)
    return response


@router.get("/analyses/{analysis_id}", summary="One saved analysis with its result and provenance")
def get_analysis(analysis_id: int, s: Session = Depends(session)) -> Response:
    return Json(work.get_analysis(s.store, analysis_id).to_dict())


@router.delete("/analyses/{analysis_id}", status_code=204, summary="Delete one of your analyses")
def delete_analysis(analysis_id: int, s: Session = Depends(session)) -> Response:
    work.delete_analysis(s.state, s.store, analysis_id)
    return Response(status_code=204)


@router.get("/evals", summary="Evaluation runs (`llens eval --list`)")
def list_evals(s: Session = Depends(session)) -> Response:
    return Json([r.to_dict() for r in s.store.list_eval_runs()])


@router.get("/evals/{run}", summary="An evaluation's % interpretable with 95% intervals, per method and layer")
def eval_summary(run: str, s: Session = Depends(session)) -> Response:
    info, rows = work.eval_summary(s.store, run)
    return Json({"run": info.to_dict(), "summary": [r.to_dict() for r in rows]})


@router.get("/evals/{run}/plot.png", summary="The evaluation's plot", response_class=Response)
def eval_plot(run: str, s: Session = Depends(session)) -> Response:
    info, rows = work.eval_summary(s.store, run)
    return Response(work.eval_plot(s.state, s.store, info, rows), media_type="image/png",
                    headers={"Cache-Control": "no-store"})
