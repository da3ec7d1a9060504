"""The Atlas page: search an atlas by word (or a token in a text), a gallery of matching patches,
click through to the image's full analysis at that layer (the report's grid, from the stored rows).

URLs are stable and shareable (``/atlas?atlas=photos&word=dog&layer=16&page=2``); the same
search as JSON is ``/api/atlas/{name}/find``. Image bytes are served only while the file still
holds the content hashed at build time (latentlens.atlas.open_stored_image): a database row
naming a path is not enough to have the server read and send that file.
"""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response

from latentlens.serve import work
from latentlens.serve.deps import Session, session
from latentlens.serve.pages import TEMPLATES

router = APIRouter(include_in_schema=False)
TEMPLATES.env.filters["pathq"] = lambda v: quote(str(v), safe="")
api = APIRouter(prefix="/api/atlas")
PER_PAGE = 24
THUMB = 240
MAX_PAGE = 400


def _search(s: Session, name: str, *, word: str | None, text: str | None, token: str | None, layer: int | None,
            page: int, per_page: int) -> dict:
    """One page of hits (dicts) and whether another follows: the page and the API share it."""
    from latentlens import atlas as atl

    page = max(1, min(int(page), MAX_PAGE))
    per_page = max(1, min(int(per_page), 200))
    word = (word or "").strip() or None
    text = (text or "").strip() or None
    how: dict = {}
    if word and text:
        raise work.InputError("search by a word or by a text, not both")
    if word:
        hits = atl.find_word(s.store, name, word, layer=layer, k=per_page + 1, offset=(page - 1) * per_page)
    elif text:
        if len(text) > work.MAX_TEXT_CHARS:
            raise work.InputError(f"the text is longer than {work.MAX_TEXT_CHARS} characters")
        info = s.store.get_atlas(name)
        lm = s.state.language_model(s.store.get_model(info.model))
        with s.state.job(f"atlas text search on {name}"):
            hits, how = atl.find_text(s.state.lens(s.store), name, text, token=(token or "").strip() or None,
                                      layer=layer, k=page * per_page + 1, lm=lm)
        hits = hits[(page - 1) * per_page:]
    else:
        hits = []
    return {"atlas": name, "word": word, "text": text, "layer": layer, "page": page, "per_page": per_page,
            "more": len(hits) > per_page, "hits": [h.to_dict() for h in hits[:per_page]], **how}


@router.get("/atlas")
def atlas_page(request: Request, atlas: str | None = None, word: str | None = None, text: str | None = None,
               query_token: str | None = None, layer: str | None = None, page: int = 1,
               per_page: int = PER_PAGE, s: Session = Depends(session)) -> Response:
    from latentlens.serve.pages import page as render

    atlases = [a.to_dict() for a in s.store.list_atlases()]
    found = None
    lay = work.optional_layer(layer)
    if atlas and ((word and word.strip()) or (text and text.strip())):
        # the text's token travels as query_token: ?token= is the server's access token
        found = _search(s, atlas, word=word, text=text, token=query_token, layer=lay, page=page, per_page=per_page)
        args = {k: v for k, v in (("word", word), ("text", text), ("query_token", query_token), ("layer", lay), ("page", page),
                                  ("per_page", found["per_page"])) if v not in (None, "")}
        found["json"] = f"/api/atlas/{quote(atlas, safe='')}/find?{urlencode(args)}"
    form = {"atlas": atlas or (atlases[0]["atlas"] if atlases else ""), "word": word or "", "text": text or "",
            "query_token": query_token or "", "layer": "" if lay is None else lay}
    return render(request, "atlas.html", s, atlases=atlases, form=form, found=found)


@router.get("/atlas/{name}/images/{image_id}")
def atlas_image_page(request: Request, name: str, image_id: int, layer: int | None = None,
                     patch: int | None = None, s: Session = Depends(session)) -> Response:
    from latentlens.serve.pages import page as render

    info = s.store.get_atlas(name)
    image = s.store.atlas_image(info, image_id)
    frag = "&".join(f"{k}={v}" for k, v in (("patch", patch), ("layer", layer)) if v is not None)
    return render(request, "atlas_image.html", s, atlas=info.to_dict(), image=image, layer=layer, patch=patch,
                  fragment=frag)


@router.get("/atlas/{name}/images/{image_id}/report")
def atlas_image_report(name: str, image_id: int, s: Session = Depends(session)) -> Response:
    from PIL import Image

    from latentlens import atlas as atl
    from latentlens.report import render_html

    result, img, image = atl.stored_image_result(s.store, name, image_id)
    title = f"{name}: {image['path'].rsplit('/', 1)[-1]}"
    if img is None:  # the grid and words still show, on a blank canvas of the image's size
        img = Image.new("RGB", tuple(image["size"]), (235, 235, 235))
        title += f" (image file {image['state']})"
    return HTMLResponse(render_html(result, img, title=title))


@router.get("/atlas/{name}/images/{image_id}/thumb.jpg")
def atlas_thumb(name: str, image_id: int, s: Session = Depends(session)) -> Response:
    img = _image(s, name, image_id)
    img.thumbnail((THUMB, THUMB))
    return _jpeg(img)


@router.get("/atlas/{name}/images/{image_id}/patches/{patch}.jpg")
def atlas_crop(name: str, image_id: int, patch: int, s: Session = Depends(session)) -> Response:
    info = s.store.get_atlas(name)
    rows = [p for p in s.store.atlas_image_detail(info, image_id)[1] if p[0] == patch]
    if not rows:
        raise work.NotFound(f"image {image_id} of atlas '{name}' has no patch {patch}")
    x0, y0, x1, y1 = rows[0][3:7]
    img = _image(s, name, image_id)
    crop = img.crop((int(x0), int(y0), max(int(x0) + 1, round(x1)), max(int(y0) + 1, round(y1))))
    side = 128
    crop = crop.resize((side, max(1, round(side * crop.height / max(crop.width, 1)))), resample=0)
    return _jpeg(crop)


@api.get("", summary="Atlases: model, layers, images, patches per layer")
def api_atlases(s: Session = Depends(session)) -> list[dict]:
    return [a.to_dict() for a in s.store.list_atlases()]


@api.get("/{name}/find", summary="Patches of an atlas that mean a word (as `llens atlas find --json`)")
def api_find(name: str, word: str | None = None, text: str | None = None,
             query_token: str | None = Query(None, description="the token of `text` to search by (e.g. dog); "
                                              "not `token`, which is the server's access token"),
             layer: int | None = None, page: int = Query(1, ge=1), per_page: int = Query(PER_PAGE, ge=1, le=200),
             s: Session = Depends(session)) -> dict:
    if not (word or text):
        raise work.InputError("give word or text")
    return _search(s, name, word=word, text=text, token=query_token, layer=layer, page=page, per_page=per_page)


def _image(s: Session, name: str, image_id: int) -> Any:
    from latentlens import atlas as atl

    image = s.store.atlas_image(s.store.get_atlas(name), image_id)
    img, state = atl.open_stored_image(image["path"], image["content_hash"])
    if img is None:
        raise work.NotFound(f"image {image_id} of atlas '{name}': file {state}")
    return img


def _jpeg(img: Any) -> Response:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})
