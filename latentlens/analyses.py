"""Save a query's result as an analysis the team can list, reopen and render, and read it back.

One place builds what is stored for each kind (text, vectors, image), so
the CLI (`--save`) and the web app save the same thing. The store keeps the
input (text; image or vectors bytes with their sha256), the parameters, the
result exactly as ``--json`` prints it, and the provenance the result carries.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from latentlens.errors import InputError

if TYPE_CHECKING:
    from latentlens.query import QueryResult
    from latentlens.store import AnalysisInfo, Store
    from latentlens.vlm.query import ImageQueryResult


def _model_id(store: Store, model: str) -> int | None:
    from latentlens.errors import UnknownModel

    try:
        return store.get_model(model).id
    except UnknownModel:
        return None


def save_text(store: Store, model: str, text: str, results: Sequence[QueryResult], *,
              params: Mapping[str, Any], title: str | None = None) -> int:
    prov = results[0].provenance if results else None
    return store.save_analysis(
        "text", model, result=[r.to_dict() for r in results], params=params, input={"text": text},
        title=title, provenance=prov, model_id=_model_id(store, model),
    )


def save_vectors(store: Store, model: str, vectors: np.ndarray, results: Sequence[QueryResult], *,
                 params: Mapping[str, Any], source: str | None = None, title: str | None = None) -> int:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vectors, dtype=np.float32), allow_pickle=False)
    data = buf.getvalue()
    prov = results[0].provenance if results else None
    return store.save_analysis(
        "vectors", model, result=[r.to_dict() for r in results], params=params,
        input={"file": source, "shape": list(np.shape(vectors)), "sha256": hashlib.sha256(data).hexdigest(),
               "format": "npy"},
        input_data=data, title=title, provenance=prov, model_id=_model_id(store, model),
    )


def save_image(store: Store, result: ImageQueryResult, image_bytes: bytes, *, params: Mapping[str, Any],
               image_name: str | None = None, title: str | None = None) -> int:
    return store.save_analysis(
        "image", result.model, result=result.to_dict(), params=params,
        input={"image": image_name, "sha256": hashlib.sha256(image_bytes).hexdigest(),
               "bytes": len(image_bytes), "size": list(result.image_size)},
        input_data=image_bytes, title=title, provenance=result.provenance,
        model_id=_model_id(store, result.model),
    )


def load_image_analysis(store: Store, analysis_id: int) -> tuple[ImageQueryResult, Any, AnalysisInfo]:
    """A saved image analysis as (result, PIL image, record): renders without the model.

    The image is read by ``load_image`` like the query read it (EXIF orientation
    applied), so the stored grid is drawn on the pixels it was computed on.
    """
    from latentlens.images import load_image
    from latentlens.vlm.query import ImageQueryResult

    a = store.get_analysis(analysis_id, with_data=True)
    if a.kind != "image":
        hint = " (an evaluation: `llens eval --summary`)" if a.kind == "eval" else ""
        raise InputError(f"analysis {analysis_id} is a {a.kind} analysis, not an image one{hint}")
    if not a.input_data:
        raise InputError(f"analysis {analysis_id} has no stored image")
    if hashlib.sha256(a.input_data).hexdigest() != a.input.get("sha256"):
        raise InputError(f"analysis {analysis_id}: the stored image does not match its sha256")
    img = load_image(a.input_data, name=f"of analysis {analysis_id}")
    return ImageQueryResult.from_dict(a.result), img, a
