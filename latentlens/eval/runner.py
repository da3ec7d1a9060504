"""`llens eval`: sample patches, take each method's words, ask a judge, record every verdict.

One run is identified by its name and a fingerprint of everything that
decides its verdicts (model and the VLM's revision, weights and processor
files (``identity``), methods, layers, judge and its settings, the chosen
images, patches per image, seed, words per method, prompt, resolution).
Running the same command again resumes the run: items already in the store
are skipped, after checking that the patches drawn now are the ones judged
then (same image file, patch index and box); an image whose items are all
judged is not run through the VLM again. Each item is recorded with all of
its verdicts in one transaction, so Ctrl-C, kill -9 or a failing judge lose
at most the item in flight, and a rerun redoes exactly that one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from latentlens.errors import InputError, LatentLensError, UnknownModel
from latentlens.eval.identity import model_identity, vlm_source
from latentlens.eval.interrupts import Interrupts, deferred_in_psycopg
from latentlens.eval.judges import Judge, JudgeTask
from latentlens.eval.sampling import choose_images, choose_patches, file_sha256, list_images
from latentlens.lenses import METHODS, parse_methods
from latentlens.store import EvalItem, EvalRunInfo, EvalVerdict
from latentlens.store.types import check_k

Echo = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass
class EvalOptions:
    images: str
    num_images: int | None = None
    patches_per_image: int = 4
    visual_layers: list[int] | None = None  # default: the model's stored layers
    layers: list[int] | None = None  # stored layers LatentLens searches (default: all)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seed: int = 0
    words: int = 5  # top-k words per method shown to the judge
    prompt: str | None = None
    resolution: str | None = None
    mode: str = "auto"
    dtype: str = "float32"
    device: str | None = None
    progress: bool = True


@dataclass
class EvalResult:
    run: EvalRunInfo
    judged: int  # items judged by this call
    skipped: int  # items found already judged
    already_done: bool = False

    def to_dict(self) -> dict:
        return {"run": self.run.to_dict(), "judged": self.judged, "skipped": self.skipped,
                "already_done": self.already_done}


def region_around(box: Sequence[float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The patch and its eight neighbours (one patch width/height each side), clipped to the image."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return (max(0.0, x0 - w), max(0.0, y0 - h), min(float(size[0]), x1 + w), min(float(size[1]), y1 + h))


def distinct(words: Sequence[str]) -> list[str]:
    """Words in rank order, each once (case-insensitive): a judge reads a list of different words."""
    seen: set[str] = set()
    out = []
    for w in words:
        key = w.strip().casefold()
        if key and key not in seen:
            seen.add(key)
            out.append(w.strip())
    return out


def run_eval(
    model: str, judge: Judge, options: EvalOptions, *, database_url: str | None = None,
    run_name: str | None = None, echo: Echo = _stderr, lens: Any = None, vlm: Any = None,
) -> EvalResult:
    """Run (or resume) an evaluation; returns the run as recorded.

    Ctrl-C raises KeyboardInterrupt, whatever the process was doing when it came (a database
    error that follows an interrupt is the interrupt's doing), and leaves the run resumable.
    """
    with deferred_in_psycopg() as interrupts:
        try:
            return _run_eval(model, judge, options, database_url, run_name, echo, lens, vlm, interrupts)
        except Exception as e:
            if interrupts.interrupted:
                raise KeyboardInterrupt from e
            raise


def _run_eval(model: str, judge: Judge, options: EvalOptions, database_url: str | None, run_name: str | None,
              echo: Echo, lens: Any, vlm: Any, interrupts: Interrupts) -> EvalResult:
    from latentlens.query import Lens

    methods = parse_methods(options.methods)
    words_k = check_k(options.words)
    if options.patches_per_image < 1:
        raise InputError("--patches-per-image must be at least 1")
    refs = choose_images(list_images(options.images), options.num_images, options.seed)
    own = lens is None
    lens = lens or Lens.connect(database_url)
    try:
        store = lens.store
        try:
            info = store.get_model(model)
        except UnknownModel:
            if "latentlens" in methods:
                raise
            info = None
        searched: list[int] = []
        if "latentlens" in methods:
            from latentlens.search import validate_layers

            searched = validate_layers(info, options.layers)
        visual_layers = options.visual_layers
        if visual_layers is None:
            if info is None:
                raise InputError(f"'{model}' is not in the store: choose --visual-layers")
            visual_layers = info.layer_numbers
        if not visual_layers:
            raise InputError("no visual layers chosen")
        if info is not None:
            info.check_layer_range(visual_layers)
        for warning in judge.prepare([r.name for r in refs]):
            echo(f"warning: {warning}")
        settings = {
            "images": str(Path(options.images).expanduser().resolve()), "chosen_images": [r.name for r in refs],
            "num_images": options.num_images, "patches_per_image": options.patches_per_image,
            "seed": options.seed, "words": words_k, "prompt": options.prompt,
            "resolution": options.resolution, "searched_layers": searched, "mode": options.mode,
            "dtype": options.dtype,
            # the index LatentLens reads: more rows ingested later make a new run, never a mixed one
            "index_versions": {str(li.layer): li.version for li in info.layers if li.layer in searched}
            if info is not None and searched else None,
            # the VLM itself (revision, weights, processor): another model makes a new run, never a mixed one
            "vlm": model_identity(*vlm_source(info, model, vlm)),
        }
        judge_settings = judge.settings()
        key = {"model": info.name if info else model, "methods": methods, "visual_layers": list(visual_layers),
               "judge": judge.name, "judge_settings": judge_settings, **settings}
        fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        name = run_name or f"eval-{fingerprint[:12]}"
        planned = len(refs) * options.patches_per_image
        run = store.create_eval_run(
            name, model=info.name if info else model, model_id=info.id if info else None, methods=methods,
            visual_layers=visual_layers, judge=judge.name, judge_settings=judge_settings,
            settings=settings, fingerprint=fingerprint, items_planned=planned,
            hostname=socket.gethostname(), pid=os.getpid(),
        )
        interrupts.check()
        if run.status == "done":
            return EvalResult(run, 0, run.items_done, already_done=True)
        if not store.lock_eval_run(run):
            raise InputError(f"eval run '{run.name}' is being judged by {store.eval_holder(run)}: "
                             "wait for it, or stop that process first")
        try:
            return _run_locked(store, lens, info, model, vlm, judge, refs, run, methods, visual_layers,
                               searched, words_k, planned, options, echo, interrupts)
        finally:
            _quietly(store.unlock_eval_run, run)
    finally:
        if own:
            lens.close()


def _quietly(call: Callable[..., Any], *args: Any, **kw: Any) -> None:
    """A bookkeeping statement that must not replace the error being raised (the connection may be the
    reason for it); a live server releases the run's lock with the session anyway."""
    with contextlib.suppress(psycopg.Error, LatentLensError):
        call(*args, **kw)


def _run_locked(store, lens, info, model, vlm, judge, refs, run, methods, visual_layers, searched, words_k,
                planned, options, echo, interrupts) -> EvalResult:
    """The judging itself, under the run's lock: each outcome is recorded on the run."""
    stored = store.eval_items(run)
    if stored:
        echo(f"resuming eval run '{run.name}': {len(stored)} of about {planned} items already judged")
    store.set_eval_status(run, "running", hostname=socket.gethostname(), pid=os.getpid())
    try:
        interrupts.check()
        judged = _judge_images(lens, info, model, vlm, judge, refs, stored, run, methods, visual_layers,
                               searched, words_k, options, interrupts)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or interrupts.interrupted:
            _quietly(store.set_eval_status, run, "interrupted", "interrupted by the user")
        else:
            reason = str(e).splitlines()[0][:500] if str(e).strip() else type(e).__name__
            _quietly(store.set_eval_status, run, "failed", reason)
        raise
    store.set_eval_status(run, "done")
    return EvalResult(store.get_eval_run(run.id), judged, len(stored))


def _judge_images(lens, info, model, vlm, judge, refs, stored, run, methods, visual_layers, searched,
                  words_k, options, interrupts: Interrupts) -> int:
    """Judge what is left; ``interrupts.check()`` after each database call raises a Ctrl-C that
    arrived inside one."""
    from tqdm.auto import tqdm

    from latentlens.vlm.base import DEFAULT_PROMPT
    from latentlens.vlm.extract import extract_visual_tokens, load_image
    from latentlens.vlm.geometry import as_box, parse_resolution
    from latentlens.vlm.query import describe_patches, load_vlm_for

    per = options.patches_per_image
    done = set(stored)
    todo = [i for i in range(len(refs)) if not all(i * per + j in done for j in range(per))]
    if not todo:
        return 0  # nothing left to record, so nothing can mix
    resolution = parse_resolution(options.resolution)
    if vlm is None:
        vlm = load_vlm_for(info, model, dtype=options.dtype, device=options.device)
    # every judged item must be the patch drawn now: checked before anything new is recorded
    for i, ref in enumerate(refs):
        judged = {j: stored[i * per + j] for j in range(per) if i * per + j in stored}
        if judged:
            interrupts.check()
            _check_judged(run, ref, judged, vlm, resolution, options, i)
    judged_now = 0
    bar = tqdm(total=len(refs) * per, initial=len(done), unit="patch", desc=f"eval {run.name}",
               disable=not options.progress, dynamic_ncols=True)
    try:
        for i in todo:
            interrupts.check()
            ref = refs[i]
            base = i * per
            img = load_image(ref.path)
            prepared = vlm.prepare_image(img, resolution)
            chosen = choose_patches(prepared.patches, per, options.seed, i)
            pending = [(j, p) for j, p in enumerate(chosen) if base + j not in done]
            bar.total -= per - len(chosen)  # an image with fewer real patches than asked
            if not pending:
                continue
            vt = extract_visual_tokens(vlm, img, layers=visual_layers,
                                       prompt=options.prompt or DEFAULT_PROMPT, resolution=resolution)
            position = {p.idx: n for n, p in enumerate(vt.patches)}
            described, _provenance = describe_patches(
                lens, info, vlm, vt, [position[p.idx] for _, p in pending], visual_layers,
                searched=searched, k=words_k, mode=options.mode, methods=methods,
            )
            interrupts.check()
            sha = file_sha256(ref.path)
            for n, (j, p) in enumerate(pending):
                region = region_around(p.box, img.size)
                verdicts = []
                for vl in described:
                    pr = vl.patches[n]
                    for method in methods:
                        words = distinct(pr.words(method))[:words_k]
                        interrupts.check()
                        verdicts.append(_verdict(judge, img, ref.name, p.box, region, words, method,
                                                 vl.visual_layer))
                item = EvalItem(base + j, ref.name, sha, img.size, p.idx, p.row, p.col, as_box(p.box))
                if lens.store.record_eval_item(run, item, verdicts):
                    judged_now += 1
                bar.update(1)
                interrupts.check()
    finally:
        bar.close()
    return judged_now


def _check_judged(run, ref, judged: dict[int, EvalItem], vlm, resolution, options, i: int) -> None:
    """Refuse a resume whose draw no longer gives the patches this run judged: the same image file, the
    same patch index and box (another processor, resolution or latentlens would shift them)."""
    from latentlens.vlm.extract import load_image

    sha = file_sha256(ref.path)
    for item in judged.values():
        if item.image != ref.name or item.image_sha256 != sha:
            what = (f"image {ref.name} changed since this run judged it" if item.image == ref.name else
                    f"item {item.item} was image {item.image}, the draw now gives {ref.name}")
            raise InputError(f"{what}: restore it, or start a new run (--run NAME)")
    img = load_image(ref.path)
    chosen = choose_patches(vlm.prepare_image(img, resolution).patches, options.patches_per_image,
                            options.seed, i)
    for j, item in sorted(judged.items()):
        now = chosen[j] if j < len(chosen) else None
        if now is None or now.idx != item.patch_idx or not _same_box(now.box, item.box):
            drawn = f"patch {now.idx} {_box(now.box)}" if now is not None else "no patch"
            raise InputError(
                f"item {item.item} of eval run '{run.name}' is patch {item.patch_idx} {_box(item.box)} of "
                f"{ref.name}, the draw now gives {drawn}: the model's image processing changed; "
                "restore it, or start a new run (--run NAME)")


def _same_box(a: Sequence[float], b: Sequence[float]) -> bool:
    # stored as real[]: float32 rounding
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-3 * max(1.0, abs(float(y))) for x, y in zip(a, b))


def _box(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


def _verdict(judge: Judge, img, image_name, box, region, words, method, layer) -> EvalVerdict:
    if not words:
        return EvalVerdict(method, layer, [], False, None, {"words": []}, {"skipped": "no words"})
    task = JudgeTask(image=img, image_name=image_name, box=tuple(box), region=region, words=list(words))
    j = judge.judge(task)
    shown = {"words": list(words), "box": [round(float(v), 2) for v in box], **j.shown}
    return EvalVerdict(method, layer, list(words), bool(j.interpretable), j.category, shown, j.answer)
