"""Load a language model from a transformers id, a local dir or a GGUF file.

GGUF files are dequantized by transformers on every load (and their
tokenizer converted), which takes tens of seconds even for a small model;
the first load therefore saves the dequantized weights as safetensors and
the tokenizer under ``config.cache_dir()/gguf/<key>``, keyed by the file's
path, size and mtime and the dtype, so later loads take a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from latentlens import config as llens_config
from latentlens.architectures import Adapter, family_for
from latentlens.errors import InputError, LatentLensError
from latentlens.models.base import LanguageModel, TextSide

DTYPES = ("float32", "bfloat16", "float16")
#: the residual stream, the norms and the first block in float32, the matmuls of every later
#: block in bfloat16 (torch.autocast, their Linear weights cast once at load): what `auto`
#: picks on a CPU with bfloat16 units
BF16_MIXED = "bf16-mixed"
#: what ``dtype="auto"`` means: see auto_dtype
AUTO = "auto"
#: what "auto" resolves to where set (float32 or bfloat16), whatever the CPU
ENV_AUTO_DTYPE = "LLENS_INGEST_DTYPE"

#: transformers' from_pretrained switches process-wide state while it builds a model
#: (weight-init and device contexts); two threads loading at once can leave it switched
#: for every later load (an LM head left on the meta device). One load at a time.
LOAD_LOCK = threading.RLock()


@contextmanager
def loading_weights() -> Iterator[None]:
    """Around every from_pretrained of a model: one at a time (LOAD_LOCK), and transformers'
    own progress bars off (one bar per command: ours)."""
    from transformers.utils import logging as hf_logging

    with LOAD_LOCK:
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()


def _torch_dtype(dtype: str):
    import torch

    if dtype == BF16_MIXED:
        return torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    return getattr(torch, dtype)


def cpu_bf16_units(flags: set[str] | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16).

    Without them torch emulates bfloat16 matmuls, slower than float32.
    ``flags``: the CPU's feature flags (default: read from /proc/cpuinfo; none
    elsewhere, so False off Linux)."""
    return bool((llens_config.cpu_flags() if flags is None else flags) & {"avx512_bf16", "amx_bf16"})


def auto_dtype(device: str | None = None, *, bf16_units: bool | None = None) -> str:
    """The forward dtype ``dtype="auto"`` picks: BF16_MIXED on a CPU with bfloat16 units,
    float32 everywhere else (AVX2-only CPUs, where bfloat16 is emulated and slower; GPUs).

    Why mixed and not plain bfloat16: a bfloat16 residual stream moves ~8% of layer 1's
    exact top-10 neighbours (overlap 0.918 with float32); with the first block and the
    residual stream in float32 every layer keeps >= 0.96, at ~2-3x the float32 speed
    (SmolLM2: docs/ingest.md). $LLENS_INGEST_DTYPE, where set, is the answer instead
    (the test suite pins it, so it runs alike on every CPU)."""
    env = os.environ.get(ENV_AUTO_DTYPE, "").strip().lower()
    if env and env != AUTO:
        if env not in (*DTYPES, BF16_MIXED):
            raise InputError(f"{ENV_AUTO_DTYPE} must be one of {', '.join(DTYPES)}, {BF16_MIXED} or auto, "
                             f"got {env!r}")
        return env
    if _device(device).type != "cpu":
        return "float32"
    return BF16_MIXED if (cpu_bf16_units() if bf16_units is None else bf16_units) else "float32"


def _device(device: str | None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise InputError(f"unknown device '{device}': {e}") from None


def _split_source(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """'dir/x.gguf' -> ('dir', 'x.gguf'); a dir or id with --gguf-file stays as given."""
    if gguf_file is None and source.lower().endswith(".gguf"):
        p = Path(source).expanduser()
        if not p.is_file():
            raise InputError(f"GGUF file not found: {source}")
        return str(p.resolve().parent), p.name
    p = Path(source).expanduser()
    if p.exists():
        source = str(p.resolve())
    elif source.startswith(("/", "./", "../", "~")) or source.count("/") > 1:
        raise InputError(f"model not found: {source} (give a local model dir, a .gguf file or a hub id)")
    if gguf_file is not None:
        g = Path(gguf_file).expanduser()
        if g.is_absolute() or g.exists():
            if not g.is_file():
                raise InputError(f"GGUF file not found: {gguf_file}")
            return str(g.resolve().parent), g.name
        if p.is_dir() and not (p / gguf_file).is_file():
            raise InputError(f"GGUF file not found: {p / gguf_file}")
    return source, gguf_file


GGUF_MAGIC = b"GGUF"


def check_gguf_header(path: Path) -> None:
    """InputError unless ``path`` starts like a GGUF file (cheap: reads 4 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InputError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    if not head:
        raise InputError(f"{path} is empty (0 bytes), not a GGUF file")
    if head != GGUF_MAGIC:
        raise InputError(f"{path} is not a GGUF file (it starts with {head!r}, not the GGUF magic bytes b'GGUF')")


def gguf_problem(path: Path) -> str | None:
    """Why a GGUF file that starts right cannot be read (truncated or corrupt), or None.

    Parses the header, metadata and tensor table with the ``gguf`` reader (a
    memory map: seconds for a large file), so it is only asked after a load failed.
    """
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 (a bad file fails in many ways: struct, index, reshape)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: {detail})"
    return None


def default_name(source: str, gguf_file: str | None) -> str:
    """The store name: the GGUF file's stem, a local dir's name, or the hub id as given."""
    if gguf_file:
        return Path(gguf_file).stem
    p = Path(source)
    if p.is_dir():
        return p.resolve().name
    return source


def store_name(source: str, gguf_file: str | None = None, name: str | None = None) -> str:
    """The name load_language_model(source, gguf_file=..., name=...) stores its model under."""
    return name or default_name(*_split_source(source, gguf_file))


def _gguf_cache_dir(source: str, gguf_file: str, dtype: str = "float32") -> Path:
    path = Path(source) / gguf_file
    try:
        st = path.stat()
        # v2: the cache holds the LM head too (earlier caches kept only the decoder stack)
        key_src = f"v2|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}"
    except OSError:  # a hub id: key by name only
        key_src = f"v2|{source}|{gguf_file}|{dtype}"
    key = hashlib.blake2b(key_src.encode(), digest_size=10).hexdigest()
    return llens_config.cache_dir() / "gguf" / f"{Path(gguf_file).stem}-{key}"


def _save_gguf_cache(target: Path, model, tokenizer) -> None:
    """Write dequantized weights + config + tokenizer atomically (rename of a temp dir)."""
    import safetensors.torch

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def load_language_model(
    source: str,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    revision: str | None = None,
    name: str | None = None,
    lens_heads: bool = True,
) -> LanguageModel:
    """Load the language model (decoder stack + tokenizer) of ``source``.

    ``dtype``: one of DTYPES, BF16_MIXED, or "auto" (auto_dtype: BF16_MIXED on a
    CPU with bfloat16 units, else float32); the chosen one is in ``lm.store_params()``.
    A GGUF file is dequantized once, to float32 (cached), and cast from there.

    ``source`` is a transformers id, a local model dir, or a ``.gguf`` file
    (or a dir/id plus ``gguf_file``). For a supported VLM only its language
    model is kept, with its LM head and final norm (``lm.heads``, for
    LogitLens) unless ``lens_heads=False`` (ingest: an untied head can be a
    large matrix nothing there reads). Raises InputError for anything that
    cannot be loaded.
    """
    if dtype == AUTO:
        dtype = auto_dtype(device)
    torch_dtype = _torch_dtype(dtype)
    dev = _device(device)
    source, gguf_file = _split_source(source, gguf_file)
    params: dict[str, Any] = {"source": source, "gguf_file": gguf_file, "revision": revision, "dtype": dtype}
    load_from = source
    kw: dict[str, Any] = {}
    if revision:
        kw["revision"] = revision
    cache = None
    shown = source
    gguf_path = None
    if gguf_file:
        cache = _gguf_cache_dir(source, gguf_file)
        if Path(source, gguf_file).is_file():
            gguf_path = Path(source, gguf_file)
            shown = str(gguf_path)
        if (cache / "config.json").is_file():
            load_from = str(cache)
        else:
            kw["gguf_file"] = gguf_file
            if gguf_path is not None:
                check_gguf_header(gguf_path)  # a text file named .gguf: one clear line, not a JSON error
    try:
        with warnings.catch_warnings(), loading_weights():
            warnings.simplefilter("ignore")
            cfg = Adapter._load_config(load_from, **kw)
            family = family_for(cfg)
            tokenizer = family._load_tokenizer(load_from, **kw)
            # a GGUF file is dequantized in float32, the dtype of its cache
            full = family._load(load_from, cfg, dtype=_torch_dtype("float32") if "gguf_file" in kw else torch_dtype,
                                **kw)
    except LatentLensError:
        raise
    except Exception as e:
        if gguf_path is not None and load_from != str(cache):
            problem = gguf_problem(gguf_path)  # truncated or corrupt: say so, not the parser's symptom
            if problem:
                raise InputError(problem) from None
        if not isinstance(e, (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError)):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load model '{shown}': {msg}") from None
    if cache is not None and load_from != str(cache):
        try:
            _save_gguf_cache(cache, full, tokenizer)
        except OSError as e:  # a cache is an optimisation: never fail the load for it
            warnings.warn(f"could not cache dequantized GGUF weights in {cache}: {e}", stacklevel=2)
    if "gguf_file" in kw and torch_dtype != _torch_dtype("float32"):  # cast once it is cached in float32
        full = full.to(torch_dtype)
    heads = family.heads_of(full) if lens_heads else None
    lm = family.language_model_of(full)
    lm = lm.to(dev)
    if heads is not None and heads.unembedding.is_meta:
        raise InputError(f"cannot load model '{source}': its LM head was not loaded (no weights for it)")
    if heads is not None and heads.unembedding.device != dev:
        # an untied LM head is not part of the decoder stack moved above
        heads.unembedding = heads.unembedding.detach().to(dev)
    text_cfg = family.text_config_of(cfg)
    arch = (getattr(cfg, "architectures", None) or [type(full).__name__])[0]
    del full
    lm_out = LanguageModel(
        name=name or default_name(source, gguf_file),
        model=lm,
        tokenizer=tokenizer,
        config=text_cfg,
        architecture=arch,
        params=params,
        device=dev,
        dtype=torch_dtype,
        adapter=family,
        heads=heads,
    )
    if dtype == BF16_MIXED:
        lm_out.mix_bf16()
    return lm_out


def load_from_store(info: Any, **kw: Any) -> LanguageModel:
    """Load the model recorded by ``llens ingest`` (a store ModelInfo) from its params.

    Keyword arguments (``dtype``, ``device``) override what was recorded.
    """
    if hasattr(info, "require_source"):
        info.require_source()
    p = dict(info.params or {})
    source = p.get("source")
    if not source:
        raise InputError(
            f"model '{info.name}' was stored without a loadable source "
            "(e.g. imported from an index dir): load it with load_language_model instead"
        )
    args: dict[str, Any] = {
        "gguf_file": p.get("gguf_file"),
        "dtype": p.get("dtype") or "float32",
        "revision": p.get("revision"),
        "device": None,
    }
    args.update(kw)
    return load_language_model(source, name=info.name, **args)


def load_text_side(source: str, *, gguf_file: str | None = None, revision: str | None = None) -> TextSide:
    """The tokenizer of ``source`` (and what ingest records of its config), without its weights.

    Loaded the way :func:`load_language_model` loads it (the same adapter hook, the
    dequantized GGUF cache if there is one), so an import re-tokenizes captions
    exactly as ingest would.
    """
    source, gguf_file = _split_source(source, gguf_file)
    load_from = source
    kw: dict[str, Any] = {}
    if revision:
        kw["revision"] = revision
    if gguf_file:
        caches = [_gguf_cache_dir(source, gguf_file, d) for d in DTYPES]  # any dtype's (older caches) holds it
        cached = next((c for c in caches if (c / "config.json").is_file()), None)
        if cached is not None:
            load_from = str(cached)
        else:
            kw["gguf_file"] = gguf_file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = Adapter._load_config(load_from, **kw)
            family = family_for(cfg)
            tokenizer = family._load_tokenizer(load_from, **kw)
    except LatentLensError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load the tokenizer of '{source}': {msg}") from None
    text_cfg = family.text_config_of(cfg)
    limit = int(getattr(text_cfg, "max_position_embeddings", 0) or 0) or None
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    if arch is None:  # a GGUF config names none: the class load_language_model would build
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(cfg, "model_type", ""))
    return TextSide(tokenizer=tokenizer, max_positions=limit, architecture=arch)
