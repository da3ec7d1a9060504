"""Read a torch file weights-only, never unpickling: one clear line for every way it can fail.

Used wherever latentlens reads a ``.pt`` it did not write (query vectors, the reference's
index layer files): ``torch.load(weights_only=True)`` refuses arbitrary classes, and each
of its failures (a class it would have to unpickle, a truncated or foreign file) becomes
an InputError naming the file.
"""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path
from typing import Any

from latentlens.errors import InputError

PLAIN = "only tensors, dicts, lists, strings and numbers are read"


def load_weights_only(path: str | Path, *, mmap: bool = False, hint: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (memory-mapped where ``mmap`` and the
    format allow); ``hint`` says how to re-save a file that needs unpickling."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or ("mmap" not in str(e).lower() and "zipfile" not in str(e).lower()):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if m is None:  # not a pickle torch can read at all: damaged or foreign
            why = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
            raise InputError(f"{path} is truncated or not a torch file (weights-only load: "
                             f"{why.group(1).strip() if why else 'unreadable pickle'})") from None
        raise InputError(
            f"refusing to load {path}: it needs arbitrary unpickling ({m.group(1)}), which can run code; "
            f"{PLAIN} weights-only: {hint or 're-save it with plain types'}") from None
    except (EOFError, struct.error):
        raise InputError(f"{path} is truncated or not a torch file (weights-only load: the file ends early)") \
            from None
    except (OSError, RuntimeError, KeyError, IndexError, ValueError) as e:
        raise InputError(f"{path} is truncated or not a torch file (weights-only load: {error_line(e)})") from None


def error_line(e: BaseException) -> str:
    """The first line of a reader's error, without zip/miniz's internal advice."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". This is an internal miniz error")[0].rstrip(".")
