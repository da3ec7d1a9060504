"""Which VLM an eval run judges, read without loading it: part of the run's fingerprint.

A run's verdicts depend on the model's revision, its weights and how its
image processor cuts images into patches. All three are in the fingerprint,
so a resume with a changed model is refused instead of mixing verdicts of
two models (``EvalsMixin.create_eval_run`` says which part changed).

* A hub id: the commit its revision resolves to. A hub commit names every
  file's content (the weights by their sha256), so it covers all three.
  Resolved through huggingface_hub, as loading does: its cache, offline mode
  and token apply.
* A local dir: sha256 of each small file that configures the model
  (``processor``: the image processor's files; ``config``: config.json,
  tokenizer files, chat templates, custom code), and a sampled content
  fingerprint of its ``weights``: per file its size, its first and last MiB
  and 64 blocks spread over it, and for safetensors the header (every
  tensor's name, dtype, shape and offsets) plus 4 KiB from the middle of
  every tensor. That reads a few MB per file whatever its size (a full hash
  of a 15 GB model costs ~30 s per run); unlike sizes and mtimes it does not
  change when the dir is copied, moved or touched, and a fine-tune, a
  re-quantisation or another checkpoint changes nearly every sampled block.
  An edit confined to bytes no sample reads (a few weights of one tensor)
  goes unseen: a fingerprint, not a proof.

The local path itself is left out: a model dir moved elsewhere is the same model.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from latentlens.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".npz")
CONFIG_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".py", ".tiktoken")
EDGE = 1 << 20  # bytes read at each end of a weights file
BLOCKS = 64  # blocks spread over a weights file
BLOCK = 16 << 10
TENSOR_BLOCK = 4 << 10  # read from the middle of every safetensors tensor
MAX_CONFIG_BYTES = 64 << 20  # a bigger "config" file is data, not configuration: sampled like weights
COMMIT = re.compile(r"[0-9a-f]{40}")
IGNORED = ("generation_config.json",)  # sampling settings for generate(): no bearing on hidden states


def vlm_source(info: Any, model: str, vlm: Any = None) -> tuple[str, str | None]:
    """(source, revision) of the VLM an eval loads: the one given, the one ``llens ingest``
    recorded for ``info`` (as ``latentlens.vlm.query.load_vlm_for`` loads it), or ``model``."""
    if vlm is not None:
        return str(vlm.name), vlm.revision
    if info is None:
        return model, None
    return info.checkpoint()


def model_identity(source: str, revision: str | None = None) -> dict[str, Any]:
    """What decides the model's outputs, as a small JSON-able dict (see the module doc)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return {"kind": "dir", "revision": revision, **_dir_fingerprint(path)}
    return {"kind": "hub", "repo": source, "revision": revision, "commit": _hub_commit(source, revision)}


def _hub_commit(repo: str, revision: str | None) -> str:
    if revision and COMMIT.fullmatch(revision):
        return revision
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise InputError(f"'{repo}' is no local dir, and resolving a hub id needs huggingface_hub "
                         "(the 'models' extra)") from e
    try:
        # config.json is the first file a load fetches: its snapshot folder is named by the commit
        path = Path(hf_hub_download(repo, "config.json", revision=revision))
    except Exception as e:  # noqa: BLE001 - offline and not cached, no such repo, no access...
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise InputError(f"cannot resolve model '{repo}'{f' at {revision}' if revision else ''} to a "
                         f"commit (the eval run's fingerprint needs it): {reason}") from None
    commit = path.parent.name
    if not COMMIT.fullmatch(commit):
        raise InputError(f"cannot tell the commit of model '{repo}' from its cache path {path}")
    return commit


def _dir_fingerprint(root: Path) -> dict[str, str]:
    parts = {"weights": hashlib.sha256(), "processor": hashlib.sha256(), "config": hashlib.sha256()}
    weights = 0
    files = sorted(f for f in root.rglob("*") if f.is_file()
                   and not any(p.startswith(".") for p in f.relative_to(root).parts))
    for f in files:
        rel = f.relative_to(root).as_posix()
        name = f.name.lower()
        if name in IGNORED:
            continue
        if name.endswith(WEIGHT_SUFFIXES) or (name.endswith(CONFIG_SUFFIXES)
                                              and f.stat().st_size > MAX_CONFIG_BYTES):
            part, digest = "weights", _sampled(f)
            weights += 1
        elif name.endswith(CONFIG_SUFFIXES):
            part = "processor" if "processor" in name else "config"
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
        else:
            continue  # README, images, licences: they do not change what the model computes
        parts[part].update(f"{rel}\0{digest}\n".encode())
    if not weights:
        raise InputError(f"model dir {root} has no weights files ({', '.join(WEIGHT_SUFFIXES)})")
    return {k: h.hexdigest()[:32] for k, h in parts.items()}


def _sampled(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        spans = [(0, EDGE), (max(0, size - EDGE), EDGE)]
        spans += [(size * k // (BLOCKS + 1), BLOCK) for k in range(1, BLOCKS + 1)]
        for offset, n in spans:
            f.seek(offset)
            h.update(f.read(n))
        if path.suffix.lower() == ".safetensors":
            _sample_tensors(f, size, h)
    return h.hexdigest()


def _sample_tensors(f: Any, size: int, h: Any) -> None:
    """The safetensors header and a block from the middle of every tensor (a malformed header: skipped,
    the spread blocks still cover the file)."""
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    if not 0 < n <= min(size - 8, 100 << 20):
        return
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        return
    h.update(raw)
    if not isinstance(header, dict):
        return
    for name in sorted(header):
        meta = header[name]
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            continue
        start, end = 8 + n + offsets[0], 8 + n + offsets[1]
        take = min(TENSOR_BLOCK, max(0, end - start))
        f.seek(start + (end - start - take) // 2)
        h.update(f.read(take))
