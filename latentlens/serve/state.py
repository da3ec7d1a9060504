"""What one `llens serve` process shares between its requests, and how a request opens the store.

Shared (the point of a server next to the database and the GPU): loaded
language models and VLMs (each loaded once, under a lock), the search cost
model, and the exact-scan leaf cache on disk (``$LLENS_CACHE_DIR/scan``,
shared by every Lens of this process, and of any other process on the
machine). Per request: one database connection, opened as the signed-in
team member on a team server, and a Lens over it.

Also here: what the server is busy with right now (``/api/status``), and
drafts, the recent query results a page may still save.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from latentlens.config import Settings
from latentlens.errors import ConfigError, InputError

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
MAX_JOBS = 2  # model runs at once (a GPU's memory, a small machine's cores)
DRAFTS_MAX = 64
DRAFTS_MAX_BYTES = 256 * 1024 * 1024
DRAFT_TTL_S = 6 * 3600


@dataclass
class Activity:
    id: int
    what: str
    started: float

    def to_dict(self) -> dict:
        return {"id": self.id, "what": self.what, "seconds": round(time.monotonic() - self.started, 1)}


@dataclass
class Draft:
    """A query result a page shows and may save (``latentlens.analyses``) until it expires."""

    kind: str  # "text" | "image"
    user: str | None
    model: str
    params: dict
    results: Any  # list[QueryResult] (text) or ImageQueryResult (image)
    text: str | None = None
    image_bytes: bytes | None = None
    image_name: str | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return len(self.image_bytes or b"") + len(self.text or "")


class ServeState:
    """Per process: settings, loaded models, activities and drafts (thread-safe)."""

    def __init__(
        self, database_url: str | None = None, *, read_only: bool = False, auth: bool | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD, device: str | None = None, dtype: str = "float32",
        cache_dir: Any = None, max_image_pixels: int | None = -1,
    ):
        settings = Settings.resolve(database_url)
        self.database_url = settings.database_url  # None: the embedded server
        self.embedded = settings.embedded
        self.auth = (not self.embedded) if auth is None else bool(auth)
        if self.auth and self.embedded:
            raise ConfigError("the embedded database is single-user: it has no team members to sign in")
        self.read_only = read_only
        if max_upload_bytes < 1:
            raise InputError("the upload limit must be positive")
        self.max_upload_bytes = int(max_upload_bytes)
        if max_image_pixels == -1:
            from latentlens.config import max_image_pixels as configured

            max_image_pixels = configured()
        self.max_image_pixels = max_image_pixels or None  # width x height, checked from the header
        self.token: str | None = None  # the no-sign-in mode's access token (latentlens.serve.perimeter)
        self.device = device
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.models: dict[str, Any] = {}  # LanguageModel by stored name (Lens._models)
        self.vlms: dict[str, Any] = {}  # VisionLanguageModel by stored name
        self._costs: Any = None
        self._load_lock = threading.Lock()
        self._jobs = threading.BoundedSemaphore(MAX_JOBS)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._activities: dict[int, Activity] = {}
        self._drafts: OrderedDict[str, Draft] = OrderedDict()
        self.plot_lock = threading.Lock()  # matplotlib's pyplot is not thread-safe

    # ---- the database, per request ---------------------------------------------

    def url_for(self, user: str | None, password: str | None) -> str | None:
        """The URL a request connects with: the configured one, as ``user`` when signed in."""
        if not self.auth or user is None:
            return self.database_url
        return with_credentials(self.database_url or "", user, password or "")

    def open_store(self, user: str | None = None, password: str | None = None):
        from latentlens.store import Store

        return Store.open(self.url_for(user, password))

    def lens(self, store: Any):
        """A Lens over this request's store that shares the process' models and cost model."""
        from latentlens.query import Lens

        lens = Lens(store, cache_dir=self.cache_dir)
        with self._lock:
            self._costs = lens.share(self.models, self._costs)
        return lens

    # ---- models, loaded once --------------------------------------------------

    def language_model(self, info: Any) -> Any:
        """Loaded once per server, with its LM head: any text query may ask for the baselines
        (without it, Lens.language_model would load the model a second time for them)."""
        if info.name not in self.models:
            with self._load_lock:
                if info.name not in self.models:
                    with self.activity(f"loading {info.name} (its first text query on this server)"):
                        from latentlens.models import load_from_store

                        self.models[info.name] = load_from_store(info, device=self.device, lens_heads=True)
        return self.models[info.name]

    def vlm(self, info: Any) -> Any:
        vlm = self.vlms.get(info.name)
        if vlm is None:
            with self._load_lock:
                vlm = self.vlms.get(info.name)
                if vlm is None:
                    from latentlens.vlm.query import load_vlm_for

                    with self.activity(f"loading the vision-language model {info.name} (first image on this server)"):
                        vlm = self.vlms[info.name] = load_vlm_for(info, info.name, dtype=self.dtype,
                                                                  device=self.device)
        return vlm

    def loaded(self) -> dict:
        return {"language_models": sorted(self.models), "vlms": sorted(self.vlms)}

    # ---- what the server is doing ------------------------------------------------

    @contextlib.contextmanager
    def activity(self, what: str) -> Iterator[None]:
        a = Activity(next(self._ids), what, time.monotonic())
        with self._lock:
            self._activities[a.id] = a
        try:
            yield
        finally:
            with self._lock:
                self._activities.pop(a.id, None)

    @contextlib.contextmanager
    def job(self, what: str) -> Iterator[None]:
        """One model run (at most MAX_JOBS at once); waiting shows as an activity."""
        if not self._jobs.acquire(blocking=False):
            with self.activity(f"waiting for a free worker ({what})"):
                self._jobs.acquire()
        try:
            with self.activity(what):
                yield
        finally:
            self._jobs.release()

    def activities(self) -> list[dict]:
        with self._lock:
            return [a.to_dict() for a in self._activities.values()]

    # ---- drafts ---------------------------------------------------------------------

    def put_draft(self, draft: Draft) -> str:
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._drafts[token] = draft
            self._expire_drafts()
        return token

    def get_draft(self, token: str, user: str | None) -> Draft:
        with self._lock:
            self._expire_drafts()
            d = self._drafts.get(token)
        if d is None or (self.auth and d.user != user):
            raise DraftMissing(
                "that result is no longer held by the server (drafts live a few hours): run the query again"
            )
        return d

    def _expire_drafts(self) -> None:
        now = time.monotonic()
        for token in [t for t, d in self._drafts.items() if now - d.created > DRAFT_TTL_S]:
            del self._drafts[token]
        while len(self._drafts) > DRAFTS_MAX or (
            len(self._drafts) > 1 and sum(d.size for d in self._drafts.values()) > DRAFTS_MAX_BYTES
        ):
            self._drafts.popitem(last=False)


class DraftMissing(InputError):
    """A draft token the server does not hold (expired, or another member's)."""


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with its user and password replaced (URL-quoted; any in the query string dropped)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if k not in ("user", "password")])
    return urlunsplit(parts._replace(netloc=netloc, query=query))
