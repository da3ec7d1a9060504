"""Where an index comes from: a directory here, or a repository on the Hugging Face Hub.

The reference's pre-built indices live on the Hub in the reference layout
(``McGill-NLP/contextual_embeddings-qwen2.5-vl-7b``, ...): a hub id is fetched
with ``huggingface_hub.snapshot_download`` (only ``metadata.json`` and the
chosen layers' files, into its cache, resumable, with its token and
``HF_HUB_OFFLINE`` handling), then imported from the cached snapshot like a
directory; the import keeps the repository and resolved commit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlens.errors import InputError, LatentLensError
from latentlens.interop.reference import CACHE_FILE, LAYER_DIR, read_metadata, require

# owner/name as the Hub spells them: letters, digits, '-', '_', '.'; no '--' or '..'; <= 96 each
_HUB_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")


def locate_index(spec: str) -> tuple[str, str]:
    """("dir", path) for an existing directory; ("hub", repo id) for ``owner/name`` that is
    no path here; anything else is an InputError naming both forms."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{spec} is a file: give an index directory (metadata.json and "
                             f"layer_N/{CACHE_FILE}) or a hub repository id (owner/name)")
        return "dir", str(p)
    if HUB_ID.match(spec) and "--" not in spec and ".." not in spec:
        return "hub", spec
    raise InputError(f"{spec} is neither a directory here nor a hub repository id (owner/name, "
                     "e.g. McGill-NLP/contextual_embeddings-qwen2.5-vl-7b)")


@dataclass
class HubIndex:
    """A reference index fetched from the Hub: the local snapshot of one commit."""

    repo_id: str
    revision: str  # as asked for: a branch, tag or commit ("main" by default)
    commit: str  # what it resolved to
    path: Path  # the snapshot folder in the huggingface_hub cache
    layers: list[int]  # the layers whose files were fetched

    @property
    def uri(self) -> str:
        return f"hf://{self.repo_id}@{self.commit}"

    def provenance(self) -> dict:
        return {"imported_from": self.uri, "hub_repo": self.repo_id, "hub_revision": self.revision,
                "hub_commit": self.commit}



def hub_layer_pattern(layer: int) -> str:
    return f"layer_{layer}/{CACHE_FILE}"


def fetch_hub_index(
    repo_id: str,
    *,
    layers: Sequence[int] | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    endpoint: str | None = None,
    progress: bool = True,
) -> HubIndex:
    """Fetch ``metadata.json`` and the chosen layers' files of a reference index on the Hub.

    First ``metadata.json`` alone, which resolves ``revision`` to a commit and caches the
    repository's file list; the chosen layers (default: those metadata.json lists, else
    every layer_N file) are checked against that list before anything large is fetched,
    then downloaded at that same commit. huggingface_hub does the rest: its cache
    (``HF_HOME`` / ``HF_HUB_CACHE``, or ``cache_dir``), resuming an interrupted file, the
    token (``HF_TOKEN`` or ``hf auth login``), ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``
    (then only the cache is read). Every failure is one InputError or LatentLensError line.
    """
    require("torch", "importing an index (its layer files are PyTorch files)")  # before gigabytes arrive
    require("huggingface_hub", "importing an index from the hub")
    from huggingface_hub import snapshot_download

    kw: dict[str, Any] = {"cache_dir": str(cache_dir) if cache_dir is not None else None, "endpoint": endpoint}
    asked = revision or "main"
    wanted: list[str] = ["metadata.json"]
    first: Path | None = None
    try:
        with _hub_bars(False):
            first = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["metadata.json"],
                                           force_download=force_download, **kw))
        commit = first.name  # snapshots/<commit>
        in_repo = _hub_layer_files(repo_id, commit, cache_dir)  # None: not known (offline, no listing cached)
        listed = read_metadata(first).get("layers") if first.is_dir() else None
        have = ", ".join(map(str, sorted(in_repo))) if in_repo else "none"
        if layers is not None:
            chosen = sorted(set(layers))
            missing = [x for x in chosen if in_repo is not None and x not in in_repo]
            if missing:
                raise InputError(f"{repo_id} has no layer {missing[0]} at {asked} (its layers: {have})")
        elif listed is not None:
            chosen = listed
            missing = [x for x in chosen if in_repo is not None and x not in in_repo]
            if missing:
                raise InputError(f"{repo_id} is incomplete: its metadata.json lists layer {missing[0]} but it has no "
                                 f"{hub_layer_pattern(missing[0])} (its layers: {have}); choose --layers")
        elif in_repo:
            chosen = sorted(in_repo)
        else:
            raise InputError(f"{repo_id} has no metadata.json and no layer_N/{CACHE_FILE} files at {asked}"
                             + ("" if in_repo is not None else " in the cache: choose --layers"))
        wanted += [hub_layer_pattern(x) for x in chosen]
        with _hub_bars(progress):
            path = Path(snapshot_download(repo_id, revision=commit, allow_patterns=wanted,
                                          force_download=force_download, **kw))
    except LatentLensError:
        raise
    except Exception as e:
        raise _hub_error(e, repo_id, asked, cache_dir, wanted, first) from None
    return HubIndex(repo_id=repo_id, revision=asked, commit=commit, path=path, layers=chosen)


def _hub_layer_files(repo_id: str, commit: str, cache_dir) -> set[int] | None:
    """Layers with a layer_N/embeddings_cache.pt in the repository's cached file list, or None."""
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:  # an older huggingface_hub: no check before the download
        return None
    try:
        files = get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)
    except Exception:  # CachedRepoTreeNotFoundError: offline, never listed
        return None
    out = set()
    for f in files:
        parts = f.path.split("/")
        m = LAYER_DIR.match(parts[0])
        if m and parts[1:] == [CACHE_FILE]:
            out.add(int(m.group(1)))
    return out


class _hub_bars:
    """huggingface_hub's progress bars (bytes, files) on or off for one call."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        self.was_off = are_progress_bars_disabled()
        if not self.on:
            disable_progress_bars()

    def __exit__(self, *exc):
        from huggingface_hub.utils import enable_progress_bars

        if not self.on and not self.was_off:
            enable_progress_bars()


def _hub_error(e: Exception, repo_id: str, revision: str, cache_dir, wanted: list[str],
               snapshot: Path | None) -> LatentLensError:
    """One line for what snapshot_download raised (``snapshot``: the commit's cached folder, once known)."""
    from huggingface_hub import constants
    from huggingface_hub import errors as he

    cache = str(cache_dir or constants.HF_HUB_CACHE)
    offline = bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())
    login = "log in with `hf auth login` or set HF_TOKEN"

    from latentlens.db import first_line

    if isinstance(e, he.GatedRepoError):
        return InputError(f"{repo_id} is gated on the hub: accept its conditions on its page, then {login}")
    if isinstance(e, he.RevisionNotFoundError):
        return InputError(f"{repo_id} has no revision '{revision}' on the hub")
    if isinstance(e, he.RepositoryNotFoundError):
        return InputError(f"no repository {repo_id} on the hub, and no directory of that name here "
                          f"(a private repository needs a login: {login})")
    if isinstance(e, he.LocalEntryNotFoundError):  # offline or unreachable, and not (all) in the cache
        snap = getattr(e, "snapshot_path", None) or snapshot  # IncompleteSnapshotError knows it
        if snap is not None and Path(snap).is_dir():
            gone = [w for w in wanted if not (Path(snap) / w).exists()] or wanted
            why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
            more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
            return InputError(f"{why} and {repo_id} (revision {revision}) is only partly in the Hugging Face cache "
                              f"({cache}): {gone[0]}{more} missing; "
                              + ("unset HF_HUB_OFFLINE to download them" if offline else "try again when online"))
        if offline:
            return InputError(f"HF_HUB_OFFLINE is set and {repo_id} (revision {revision}) is not in the Hugging Face "
                              f"cache ({cache}): unset HF_HUB_OFFLINE to download it")
        cause = e.__cause__ or e.__context__
        return LatentLensError(f"cannot reach the hub to fetch {repo_id} ({first_line(cause or e)}) and it is not "
                               f"in the Hugging Face cache ({cache})")
    if isinstance(e, he.HfHubHTTPError):
        return LatentLensError(f"the hub refused {repo_id}: {first_line(e)}")
    if isinstance(e, OSError):  # disk full, a size check that failed
        return LatentLensError(f"downloading {repo_id} failed: {first_line(e)}")
    if isinstance(e, ValueError):
        return InputError(f"cannot fetch {repo_id}: {first_line(e)}")
    raise e

