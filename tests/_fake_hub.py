"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests that never reach the real one.

It speaks the four requests ``huggingface_hub.snapshot_download`` makes for a
model repository (checked against huggingface_hub 2.4):

    GET  /api/models/{repo}/revision/{rev}         repo_info: the commit sha of a branch or tag
    GET  /api/models/{repo}/tree/{sha}?recursive=  the file listing (one page)
    HEAD /{repo}/resolve/{sha}/{path}               X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{sha}/{path}               the bytes, honouring ``Range: bytes=N-``

and answers unknown repositories, revisions and files with the Hub's 404s
(``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``),
which huggingface_hub turns into its own exceptions. Repositories are
directories on disk (every file under one is a file of the repo), one per
commit; branches and tags map names to commits. Every request is recorded,
so a test can assert which files were downloaded; ``drop_after`` makes a
file's first GET end early (the connection closes mid-body) to exercise
huggingface_hub's resume.

Not modelled: Xet storage (no ``X-Xet-Hash`` header, so downloads are plain
HTTP), redirects to a CDN, pagination of the tree, authentication.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, Path]  # sha -> directory holding the files at that commit
    refs: dict[str, str]  # branch or tag -> sha


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (method, path, lower-cased headers)
    drop_after: dict[str, int] = field(default_factory=dict)  # repo path -> bytes sent before a first GET breaks
    _server: ThreadingHTTPServer | None = None

    def add(self, repo_id: str, directory: Path, *, ref: str = "main", sha: str | None = None) -> str:
        """Publish ``directory`` as a commit of ``repo_id`` and point ``ref`` at it; returns the sha."""
        sha = sha or hashlib.sha1(f"{repo_id}\0{directory}".encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo({}, {}))
        repo.commits[sha] = Path(directory)
        repo.refs[ref] = sha
        return sha

    def downloads(self) -> list[str]:
        """Repo paths fetched with GET, in order (``owner/name/path``)."""
        out = []
        for method, path, _ in self.requests:
            m = re.match(r"^/(.+?/.+?)/resolve/[0-9a-f]{40}/(.+)$", path)
            if method == "GET" and m:
                out.append(f"{m.group(1)}/{m.group(2)}")
        return out

    # ---- server ----------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- requests --------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, {k.lower(): v for k, v in h.headers.items()}))
        m = re.match(r"^/api/models/([^/]+/[^/]+)/revision/(.+)$", path)
        if m:
            repo, sha = self._resolve(h, m.group(1), m.group(2))
            if repo is not None:
                files = self._files(repo.commits[sha])
                self._json(h, {"id": m.group(1), "sha": sha, "private": False,
                               "siblings": [{"rfilename": p} for p in files]})
            return
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?$", path)
        if m:
            repo, sha = self._resolve(h, m.group(1), m.group(2))
            if repo is not None:
                files = self._files(repo.commits[sha])
                self._json(h, [{"type": "file", "path": p, "size": f.stat().st_size, "oid": _oid(f)}
                               for p, f in files.items()])
            return
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            repo, sha = self._resolve(h, m.group(1), m.group(2))
            if repo is None:
                return
            f = self._files(repo.commits[sha]).get(m.group(3))
            if f is None:
                self._error(h, 404, "EntryNotFound", sha)
                return
            self._send_file(h, f, sha, f"{m.group(1)}/{m.group(3)}", head=head)
            return
        self._error(h, 404, "RepoNotFound")

    def _resolve(self, h, repo_id: str, rev: str) -> tuple[Repo | None, str]:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound")
            return None, ""
        sha = repo.refs.get(rev, rev)
        if sha not in repo.commits:
            self._error(h, 404, "RevisionNotFound")
            return None, ""
        return repo, sha

    @staticmethod
    def _files(directory: Path) -> dict[str, Path]:
        return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}

    def _send_file(self, h, f: Path, sha: str, key: str, *, head: bool) -> None:
        data = f.read_bytes()
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", sha)
        h.send_header("ETag", f'"{_oid(f)}"')
        h.send_header("Content-Length", str(len(body)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        cut = self.drop_after.pop(key, None)
        if cut is not None and cut < len(body):
            h.wfile.write(body[:cut])  # then the connection dies mid-body
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    @staticmethod
    def _json(h, obj) -> None:
        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _error(h, status: int, code: str, sha: str | None = None) -> None:
        body = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        if sha:
            h.send_header("X-Repo-Commit", sha)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)


def _oid(f: Path) -> str:
    return hashlib.sha1(f.read_bytes()).hexdigest()
