"""The atlas: from a word to the patches a VLM reads as that word, across an image collection.

``build`` runs a VLM over a collection (a directory, or a file listing image
paths) and stores, per image (sha256 of its bytes, path, size), per patch
(box in image pixels) and per visual layer, the visual token and its top-k
LatentLens neighbours (whole word, token, similarity, stored context). Like
``llens ingest`` a build is a recorded run: each image's rows commit with the
run's progress (on a writer thread, while the model runs on the next image), so re-running the same command continues exactly where a
killed one stopped (images are keyed by content, already stored ones are
skipped); ``--shard i/n`` splits images by their hash, and the last shard
to finish builds each layer's ANN index.

``find_word`` reads the neighbour table (indexed by word); ``find_text``
takes a token's contextual embedding at an LM layer and returns the nearest
stored visual tokens of that layer, by exact scan or HNSW (``search_policy``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from latentlens.errors import InputError, LatentLensError, ModelMismatch
from latentlens.store import AtlasHit, AtlasInfo, AtlasRunInfo, ModelInfo, Store
from latentlens.store.atlas import AtlasImageRows
from latentlens.store.types import check_k, check_layer_range

if TYPE_CHECKING:
    from latentlens.query import Lens
    from latentlens.vlm.base import VisionLanguageModel

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
DEFAULT_K = 10
# best cosine (against a sample of the leaf) below which a query is out of distribution: HNSW
# misses there, so "auto" answers it exactly (as latentlens.search does for the text index)
OOD_THRESHOLD = 0.5
STALE_HEARTBEAT_S = 600
QUEUE_IMAGES = 2  # images computed ahead of the writer
Echo = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# the collection


@dataclass(frozen=True)
class ImageFile:
    path: Path
    content_hash: str  # sha256 hex of the bytes

    @property
    def shard_key(self) -> int:
        return int(self.content_hash[:16], 16)


def collect_images(spec: str | Path) -> list[Path]:
    """The images of a collection: a directory (recursively, by image extension, sorted), or a
    text file with one path a line (relative to the file's folder; blank and # lines skipped)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not found:
            raise InputError(f"no images in {p} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return found
    if not p.is_file():
        raise InputError(f"--images {p}: no such directory or list file")
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return [p]
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as e:
        raise InputError(f"cannot read the image list {p}: {e}") from None
    out: list[Path] = []
    for i, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        f = Path(s).expanduser()
        f = f if f.is_absolute() else p.parent / f
        if not f.is_file():
            raise InputError(f"{p} line {i}: image file not found: {f}")
        out.append(f)
    if not out:
        raise InputError(f"the image list {p} names no images")
    return out


def hash_images(paths: Sequence[Path]) -> list[ImageFile]:
    """sha256 of each file; a content seen before (a copy under another path) is kept once, first path."""
    seen: set[str] = set()
    out = []
    for path in paths:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise InputError(f"cannot read image {path}: {e.strerror or e}") from None
        digest = h.hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(ImageFile(path, digest))
    return out


# --------------------------------------------------------------------------
# build


@dataclass
class AtlasOptions:
    layers: Sequence[int] | None = None  # visual layers (default: the model's stored layers)
    text_layers: Sequence[int] | None = None  # stored text layers searched (default: all)
    k: int = DEFAULT_K
    prompt: str | None = None
    resolution: int | str | tuple[int, int] | None = None
    shard: tuple[int, int] = (0, 1)
    build_index: bool = True
    progress: bool = True
    dtype: str = "float32"
    device: str | None = None

    def params(self, searched: list[int], source: str) -> dict:
        """What identifies an atlas' content (a rerun must match it)."""
        from latentlens.vlm.base import DEFAULT_PROMPT

        res = self.resolution
        return {"k": self.k, "prompt": self.prompt or DEFAULT_PROMPT,
                "resolution": list(res) if isinstance(res, tuple) else res,
                "text_layers": searched, "dtype": self.dtype, "source": source}


@dataclass
class AtlasBuildResult:
    atlas: AtlasInfo
    run: AtlasRunInfo
    images: int  # in this shard of the collection
    skipped_done: int  # already in the atlas before this run
    resumed: bool = False
    notices: list[str] = field(default_factory=list)
    already_done: bool = False  # nothing to store: ``run`` is the last run that did

    def summary(self) -> dict:
        r = self.run
        return {
            "atlas": self.atlas.name, "model": self.atlas.model, "run": r.id, "status": r.status,
            "shard": f"{r.shard}/{r.num_shards}", "layers": self.atlas.layers, "k": self.atlas.params.get("k"),
            "images_in_shard": self.images, "already_stored": self.skipped_done,
            "images_done": r.images_done, "patches_done": r.patches_done, "atlas_images": self.atlas.images,
            "counters": r.counters, "duration_s": round(r.duration_s, 1), "resumed": self.resumed,
            "already_done": self.already_done, "notices": self.notices,
        }


def default_name(spec: str | Path) -> str:
    p = Path(spec).expanduser().resolve()
    return p.name if p.is_dir() else p.stem


def build(
    lens: Lens,
    model: str,
    images: str | Path,
    *,
    name: str | None = None,
    options: AtlasOptions | None = None,
    vlm: VisionLanguageModel | None = None,
    echo: Echo = _stderr,
    on_image: Callable[[int], None] | None = None,
) -> AtlasBuildResult:
    """Build (or continue) atlas ``name`` of ``images`` with the stored VLM ``model``.

    ``model`` names both the stored text index (``llens ingest`` of the VLM)
    and the VLM to load (pass ``vlm`` to reuse a loaded one). ``on_image(n)``
    is called after each stored image (tests stop a build there).
    """
    from latentlens.search import validate_layers
    from latentlens.vlm.query import load_vlm_for

    opts = options or AtlasOptions()
    store = lens.store
    k = check_k(opts.k)
    info = store.get_model(model)
    searched = validate_layers(info, opts.text_layers)
    layers = check_layer_range(opts.layers if opts.layers is not None else info.layer_numbers,
                               info.num_layers, info.name, visual=True)
    shard, nshards = opts.shard
    paths = collect_images(images)  # a bad --images fails before the model loads
    files = hash_images(paths)
    name = name or default_name(images)
    if not name.strip() or "/" in name or any(ord(c) < 32 for c in name):
        raise InputError(f"atlas name {name!r}: use a non-empty name without '/' or control characters")
    source = str((info.params or {}).get("source") or info.name)
    params = opts.params(searched, source)
    atlas = _open_atlas(store, name, info, layers, params)
    done = store.atlas_hashes(atlas)
    mine = [f for f in files if f.shard_key % nshards == shard]
    todo = [f for f in mine if f.content_hash not in done]
    previous = store.atlas_runs(atlas, shard=shard, num_shards=nshards)
    if not todo and previous and all(r.status == "done" for r in previous):
        # every image of this shard is stored and no run is unfinished: nothing to record
        return AtlasBuildResult(atlas, previous[0], len(mine), len(mine), already_done=True)
    run, resumed = _start_run(store, atlas, str(images), shard, nshards, len(mine), echo)
    counters = dict(run.counters)
    counters.setdefault("unreadable", 0)
    counters["duplicates_in_collection"] = len(paths) - len(files)
    bar = None
    writer: _Writer | None = None
    try:
        if todo:
            vlm = vlm or load_vlm_for(info, info.name, dtype=opts.dtype, device=opts.device)
            if vlm.hidden_size != info.hidden_size or vlm.num_layers != info.num_layers:
                raise ModelMismatch(
                    f"the stored '{info.name}' has hidden size {info.hidden_size} and {info.num_layers} layers, "
                    f"the loaded VLM's language model {vlm.hidden_size} and {vlm.num_layers}")
            if opts.progress:
                from tqdm import tqdm

                bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"atlas {atlas.name}", unit="img",
                           file=sys.stderr, dynamic_ncols=True)
            writer = _Writer(store.url, atlas, run.id, bar)
            writer.start()
            for n, f in enumerate(todo, 1):
                rows = _describe_image(lens, info, vlm, f, layers, searched, k, opts, echo)
                if rows is None:
                    counters["unreadable"] += 1
                writer.put(rows, dict(counters))
                if on_image is not None:
                    on_image(n)
            writer.close()
        last = store.finish_atlas_run(run.id, "done", counters=counters)
    except KeyboardInterrupt:
        if writer is not None:
            writer.close(drain=True, quiet=True)  # what was computed is stored: the run's count says so
        store.finish_atlas_run(run.id, "interrupted", "interrupted by the user", writer.counters if writer else counters)
        echo(f"Atlas run {run.id} was interrupted: run the same command again to continue.")
        raise
    except BaseException as e:
        if writer is not None:
            writer.close(drain=False, quiet=True)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:
            store.finish_atlas_run(run.id, "failed", msg, writer.counters if writer else counters)
        except Exception:  # noqa: BLE001 - the database is gone: keep the cause
            raise e from None
        raise
    finally:
        if bar is not None:
            bar.close()
    atlas = store.get_atlas(atlas.name)
    notices = []
    if last and opts.build_index and store.ann_supported():
        store.build_atlas_index(atlas)
        notices.append(f"Built ANN indexes for atlas layers {','.join(map(str, atlas.layers))}.")
    else:
        store.analyze_atlas(atlas)
        if opts.build_index and not last:
            notices.append("ANN index deferred: other shards are still running; the last one builds it.")
    for msg in notices:
        echo(msg)
    return AtlasBuildResult(store.get_atlas(atlas.name), store.get_atlas_run(run.id), len(mine),
                            len(mine) - len(todo), resumed=resumed, notices=notices)


class _Writer(threading.Thread):
    """Stores images on its own connection while the main thread runs the model on the next ones.

    A bounded queue (QUEUE_IMAGES) keeps memory flat; the first error stops it and is raised in
    the main thread at its next hand-off. Each image commits with the run's progress, in order.
    """

    def __init__(self, url: str, atlas: AtlasInfo, run_id: int, bar: Any):
        super().__init__(name="llens-atlas-writer", daemon=True)
        self.url, self.atlas, self.run_id, self.bar = url, atlas, run_id, bar
        self.queue: queue.Queue[tuple[AtlasImageRows | None, dict] | None] = queue.Queue(maxsize=QUEUE_IMAGES)
        self.error: BaseException | None = None
        self.counters: dict = {}

    def run(self) -> None:
        try:
            with Store.open(self.url, upgrade=False) as store:
                while True:
                    item = self.queue.get()
                    if item is None:
                        return
                    rows, counters = item
                    if rows is None:
                        store.heartbeat_atlas_run(self.run_id, counters)
                    else:
                        store.write_atlas_image(self.atlas, self.run_id, rows, counters)
                    self.counters = counters
                    if self.bar is not None:
                        self.bar.update(1)
        except BaseException as e:  # handed to the main thread
            self.error = e

    def put(self, rows: AtlasImageRows | None, counters: dict) -> None:
        while True:
            self._check()
            if not self.is_alive():
                raise LatentLensError("the atlas writer stopped unexpectedly")
            try:
                self.queue.put((rows, counters), timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self, *, drain: bool = True, quiet: bool = False) -> None:
        """Wait for what is queued (``drain``), or drop it; then raise the writer's error, if any."""
        if not drain:
            with contextlib.suppress(queue.Empty):
                while True:
                    self.queue.get_nowait()
        while self.is_alive():
            try:
                self.queue.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self.join()
        if not quiet:
            self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error


def _open_atlas(store: Store, name: str, info: ModelInfo, layers: list[int], params: dict) -> AtlasInfo:
    atlas, created = store.ensure_atlas(name, info, layers, params)
    if created:
        return atlas
    if atlas.model_id != info.id or atlas.layers != layers or atlas.params != params:
        differs = [what for what, a, b in (("model", atlas.model_id, info.id), ("layers", atlas.layers, layers))
                   if a != b] + [key for key in sorted(set(params) | set(atlas.params))
                                 if params.get(key) != atlas.params.get(key)]
        raise InputError(
            f"atlas '{name}' exists with another {', '.join(differs)} (model {atlas.model}, layers "
            f"{','.join(map(str, atlas.layers))}, k {atlas.params.get('k')}): choose another --name")
    return atlas


def _pid_alive(pid: int) -> bool:
    from latentlens.ingest import _pid_alive as alive

    return alive(pid)


def _start_run(store: Store, atlas: AtlasInfo, source: str, shard: int, nshards: int, total: int,
               echo: Echo) -> tuple[AtlasRunInfo, bool]:
    """A new run, or the unfinished run of the same shard taken over; never one still alive."""
    import datetime as dt

    host, pid = socket.gethostname(), os.getpid()
    for run in store.atlas_runs(atlas, shard=shard, num_shards=nshards):
        if run.status == "done":
            continue
        if run.status == "running":
            alive = (run.pid != pid and _pid_alive(run.pid)) if run.hostname == host and run.pid else (
                (dt.datetime.now(dt.timezone.utc) - run.heartbeat_at).total_seconds() < STALE_HEARTBEAT_S)
            if alive:
                raise InputError(f"atlas run {run.id} (same atlas and shard) is still running (pid {run.pid} on "
                                 f"{run.hostname}); wait for it or stop it first")
        if not store.claim_atlas_run(run, hostname=host, pid=pid, images_total=total):
            raise InputError(f"atlas run {run.id} was just taken over by another process")
        echo(f"Resuming atlas run {run.id} ({run.images_done:,} images stored so far).")
        return store.get_atlas_run(run.id), True
    return store.create_atlas_run(atlas, source=source, shard=shard, num_shards=nshards, images_total=total,
                                  hostname=host, pid=pid), False


def _describe_image(lens: Lens, info: ModelInfo, vlm: Any, f: ImageFile, layers: list[int], searched: list[int],
                    k: int, opts: AtlasOptions, echo: Echo) -> AtlasImageRows | None:
    """One image's visual tokens and their top-k neighbours; None (with a line said) if it is unreadable."""
    from latentlens.vlm.base import DEFAULT_PROMPT
    from latentlens.vlm.extract import extract_visual_tokens, load_image
    from latentlens.vlm.query import describe_patches

    try:
        img = load_image(f.path)
    except InputError as e:
        echo(f"Skipped: {e}")
        return None
    vt = extract_visual_tokens(vlm, img, layers=layers, prompt=opts.prompt or DEFAULT_PROMPT,
                               resolution=opts.resolution)
    chosen = list(range(len(vt.patches)))
    described, _prov = describe_patches(lens, info, vlm, vt, chosen, layers, searched=searched, k=k, mode="exact")
    nb: dict[str, list] = {c: [] for c in ("layer", "patch", "rank", "tid", "tok", "word", "sim", "tl", "sid", "pos")}
    for vl in described:
        for p in vl.patches:
            for rank, n in enumerate(p.neighbours, 1):
                nb["layer"].append(vl.visual_layer)
                nb["patch"].append(p.patch_idx)
                nb["rank"].append(rank)
                nb["tid"].append(n.token_id)
                nb["tok"].append(n.token)
                nb["word"].append(n.word)
                nb["sim"].append(n.similarity)
                nb["tl"].append(n.layer)
                nb["sid"].append(n.sentence_id)
                nb["pos"].append(n.position)
    return AtlasImageRows(
        content_hash=f.content_hash, path=str(f.path.resolve()), size=img.size, grid=vt.grid,
        patch_row=np.array([p.row for p in vt.patches], dtype=np.int32),
        patch_col=np.array([p.col for p in vt.patches], dtype=np.int32),
        boxes=np.array([p.box for p in vt.patches], dtype=np.float64).reshape(-1, 4),
        vectors={layer: vt.vectors[layer] for layer in layers},
        nb_layer=np.array(nb["layer"], dtype=np.int32), nb_patch=np.array(nb["patch"], dtype=np.int32),
        nb_rank=np.array(nb["rank"], dtype=np.int16), nb_token_id=np.array(nb["tid"], dtype=np.int32),
        nb_token=nb["tok"], nb_word=nb["word"], nb_similarity=np.array(nb["sim"], dtype=np.float32),
        nb_text_layer=np.array(nb["tl"], dtype=np.int32), nb_sentence_id=np.array(nb["sid"], dtype=np.int64),
        nb_position=np.array(nb["pos"], dtype=np.int32),
    )


# --------------------------------------------------------------------------
# find


def find_word(store: Store, atlas: str, word: str, *, layer: int | None = None, k: int = 50, offset: int = 0,
              max_rank: int | None = None) -> list[AtlasHit]:
    """Patches whose stored top-k words include ``word``, best similarity first (``k`` results)."""
    info = store.get_atlas(atlas)
    if not word.strip():
        raise InputError("--word is empty")
    if layer is not None:
        info.layer(layer)
    if max_rank is not None and max_rank < 1:
        raise InputError("--max-rank must be at least 1")
    return store.atlas_find_word(info, word.strip(), layer=layer, limit=check_k(k), offset=max(0, offset),
                                 max_rank=max_rank)


def search_policy(store: Store, atlas: AtlasInfo, layer: int, q: np.ndarray, mode: str) -> bool:
    """Whether to answer exactly: the text search's rules on an atlas leaf.

    ``exact`` always; ``ann`` never (where the leaf has an index); ``auto``
    exactly unless the leaf has an ANN index on a server that supports it
    AND the query is in distribution (its best cosine against a sample of
    the leaf reaches OOD_THRESHOLD): HNSW misses on far-away queries, and a
    text token is usually far from every visual token.
    """
    if mode not in ("auto", "exact", "ann"):
        raise InputError(f"unknown search mode '{mode}' (use auto, exact, ann)")
    if mode == "exact":
        return True
    li = atlas.layer(layer)
    if li.index_kind is None or not store.ann_supported():
        return True
    if mode == "ann":
        return False
    sample = store.atlas_sample(atlas, layer).astype(np.float32)
    if not len(sample):
        return True
    sample /= np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)
    v = q / max(float(np.linalg.norm(q)), 1e-12)
    return float((sample @ v).max()) < OOD_THRESHOLD


def find_text(lens: Lens, atlas: str, text: str, *, token: str | None = None, layer: int | None = None,
              k: int = 50, mode: str = "auto", lm: Any = None) -> tuple[list[AtlasHit], dict]:
    """The stored visual tokens nearest ``token``'s contextual embedding in ``text`` (default: its last
    token), at ``layer`` (default: each atlas layer, merged by similarity). Returns the hits and how
    they were found (token, position, the path per layer)."""
    from latentlens.query import select_tokens

    store = lens.store
    info = store.get_atlas(atlas)
    k = check_k(k)
    layers = [layer] if layer is not None else list(info.layers)
    for x in layers:
        info.layer(x)
    if not text.strip():
        raise InputError("--text is empty")
    lm = lm or lens.language_model(info.model)
    st = lm.hidden_states([text], layers)[0]
    positions = select_tokens(st.tokens, st.spans, text, token)
    pos = positions[0] if token is not None else positions[-1]
    found: list[tuple[int, int, int, float]] = []
    paths = {}
    for x in layers:
        q = np.asarray(st.vectors[x][pos], dtype=np.float32)
        exact = search_policy(store, info, x, q, mode)
        paths[x] = "exact" if exact else "ann"
        for image_id, patch, sim in store.atlas_knn(info, x, q[None, :], k, exact=exact)[0]:
            found.append((x, image_id, patch, sim))
    found.sort(key=lambda t: -t[3])
    how = {"token": st.tokens[pos], "position": int(pos), "layers": layers, "search": paths}
    return store.atlas_patch_hits(info, found[:k]), how


def stored_image_result(store: Store, atlas: str, image_id: int) -> tuple[Any, Any, dict]:
    """One atlas image as an ImageQueryResult rebuilt from the stored rows (no model runs), the
    image (None when its file is missing or changed) and its record: what `llens report` draws."""
    from latentlens.errors import UnknownModel
    from latentlens.query import Neighbour
    from latentlens.vlm.geometry import Patch
    from latentlens.vlm.query import ImageQueryResult, PatchResult, VisualLayerResult

    info = store.get_atlas(atlas)
    image, patches, rows = store.atlas_image_detail(info, image_id)
    try:
        model = store.get_model(info.model)
        ctx = store.contexts(model, [(r[7], r[8], r[9]) for r in rows])
    except UnknownModel:  # the text index was dropped since: words and scores remain
        ctx = {}
    grid_patches = [Patch(int(p[0]), int(p[1]), int(p[2]), (p[3], p[4], p[5], p[6])) for p in patches]
    by: dict[tuple[int, int], list] = {}
    for layer, patch, _rank, tid, token, _word, sim, tl, sid, pos in rows:
        c = ctx.get((tl, sid, pos))
        by.setdefault((layer, patch), []).append(Neighbour(
            token=token, token_id=tid, similarity=float(sim), layer=tl, sentence_id=sid,
            sentence=c.sentence if c else "", position=pos,
            char_start=c.char_start if c else None, char_end=c.char_end if c else None))
    layers = [VisualLayerResult(v, [PatchResult(p.idx, p.row, p.col, p.box, by.get((v, p.idx), []))
                                    for p in grid_patches]) for v in info.layers]
    result = ImageQueryResult(
        model=info.model, image_size=tuple(image["size"]), grid=tuple(image["grid"]), layers=layers,
        prompt=info.params.get("prompt", ""), searched_layers=list(info.params.get("text_layers") or []),
        k=int(info.params.get("k") or DEFAULT_K), patches=grid_patches)
    img, state = open_stored_image(image["path"], image["content_hash"])
    image["state"] = state
    return result, img, image


# --------------------------------------------------------------------------
# the gallery


_VERIFIED: dict[tuple[str, int, int], str] = {}


def open_stored_image(path: str, content_hash: str | None) -> tuple[Any, str]:
    """(PIL image or None, state) for an atlas image: "ok", "missing", "changed" or "unreadable".

    The file must still hold the bytes that were hashed at build time: a
    moved or edited image is not shown as if it were the one analysed, and
    the web app never serves a file a database row merely names (only the
    content that row's hash vouches for).
    """
    from latentlens.vlm.extract import load_image

    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None, "missing"
    if content_hash is not None:
        key = (str(p), st.st_mtime_ns, st.st_size)
        digest = _VERIFIED.get(key)
        if digest is None:
            try:
                digest = hash_images([p])[0].content_hash
            except InputError:
                return None, "unreadable"
            if len(_VERIFIED) > 4096:
                _VERIFIED.clear()
            _VERIFIED[key] = digest
        if digest != content_hash:
            return None, "changed"
    try:
        return load_image(p), "ok"
    except LatentLensError:
        return None, "unreadable"


def write_gallery(hits: Sequence[AtlasHit], out: str | Path, *, title: str, thumb: int = 160) -> Path:
    """One self-contained HTML file: per hit, the patch crop and the whole image with its box.

    Images are read from their stored paths (a moved file shows as missing)
    and embedded as small JPEG data URIs, so the file can be mailed or archived.
    """
    import base64
    import html
    import io

    from PIL import Image, ImageDraw

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / "atlas.html" if out.is_dir() or not out.suffix else out
    out.parent.mkdir(parents=True, exist_ok=True)

    def data_uri(img: Image.Image) -> str:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    cache: dict[str, tuple[Any, str]] = {}
    cards = []
    for h in hits:
        if h.path not in cache:
            cache[h.path] = open_stored_image(h.path, h.content_hash)
        img, state = cache[h.path]
        label = (f"{html.escape(Path(h.path).name)} · patch {h.row},{h.col} · L{h.layer} · "
                 f"{h.similarity:.3f}" + (f" · rank {h.rank}" if h.rank else ""))
        if img is None:
            why = {"missing": "image not found", "changed": "image changed since the atlas was built",
                   "unreadable": "image unreadable"}[state]
            cards.append(f'<figure class="card missing"><div>{why}:<br>{html.escape(h.path)}</div>'
                         f"<figcaption>{label}</figcaption></figure>")
            continue
        x0, y0, x1, y1 = h.box
        crop = img.crop((int(x0), int(y0), max(int(x0) + 1, int(round(x1))), max(int(y0) + 1, int(round(y1)))))
        crop = crop.resize((thumb, max(1, round(thumb * crop.height / max(crop.width, 1)))), Image.Resampling.NEAREST)
        s = thumb * 1.5 / max(img.width, img.height)  # small images are enlarged too
        whole = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.LANCZOS)
        ImageDraw.Draw(whole).rectangle((x0 * s, y0 * s, x1 * s - 1, y1 * s - 1), outline=(255, 40, 40), width=2)
        cards.append(
            f'<figure class="card" data-image="{h.image_id}" data-patch="{h.patch}" data-layer="{h.layer}">'
            f'<div class="pair"><img class="crop" alt="patch crop" src="{data_uri(crop)}">'
            f'<img class="whole" alt="{html.escape(Path(h.path).name)}" src="{data_uri(whole)}"></div>'
            f'<figcaption title="{html.escape(h.path)}">{label}</figcaption></figure>')
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
        "body{font-family:system-ui,sans-serif;margin:1rem;background:#fafafa}"
        ".grid{display:flex;flex-wrap:wrap;gap:12px}"
        ".card{margin:0;padding:8px;background:#fff;border:1px solid #ddd;border-radius:6px;width:min-content}"
        ".pair{display:flex;gap:8px;align-items:flex-start;margin-bottom:4px}"
        ".card img{display:block;image-rendering:pixelated}"
        ".card img.whole{image-rendering:auto}"
        "figcaption{font-size:12px;color:#333;white-space:nowrap}"
        ".missing div{width:160px;height:160px;color:#a00;font-size:12px;overflow-wrap:anywhere}"
        "</style></head><body><h1>" + html.escape(title) + "</h1>"
        + (f"<p>{len(hits)} patches.</p>" if hits else "<p>No patches matched.</p>")
        + "<div class='grid'>" + "".join(cards) + "</div></body></html>")
    out.write_text(page, encoding="utf-8")
    return out
