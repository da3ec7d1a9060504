"""`llens serve`'s perimeter probed from outside: a real `llens serve` subprocess on 127.0.0.1 and
a real HTTP client (httpx, and raw sockets for a chunked upload), as a rebinding page, another
local user or a careless script would reach it. The server's own counters (/proc/PID/io,
/proc/PID/status) say what it read, wrote and held."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx2")  # httpx 2 (FastAPI's test client), a real HTTP client

MB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A `llens serve` subprocess: its port, pid, token (from the URL it printed) and stderr."""

    def __init__(self, args: list[str], env: dict[str, str], tmp: Path):
        self.port = _free_port()
        self.log = tmp / f"serve-{self.port}.log"
        spool = tmp / f"spool-{self.port}"
        spool.mkdir()
        env = {**env, "TMPDIR": str(spool), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "latentlens.cli", "serve", "--port", str(self.port), *args],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while "Uvicorn running" not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "llens serve did not start:\n" + self.output()
            time.sleep(0.1)
        m = re.search(r"http://127\.0\.0\.1:\d+/\?token=([\w-]+)", self.output())
        self.token = m.group(1) if m else None
        self.base = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def io(self) -> dict[str, int]:
        """The server's I/O counters: ``wchar`` counts what it wrote to files (a spooled upload)."""
        lines = Path(f"/proc/{self.proc.pid}/io").read_text().splitlines()
        return {k: int(v) for k, v in (line.split(": ") for line in lines)}

    def peak_rss(self) -> int:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{self.proc.pid}/status").read_text())
        assert m
        return int(m.group(1)) * 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LLENS_DATABASE_URL"}
    return {**env, **extra}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded default (no sign-in): the token guards it."""
    s = Served(["--max-upload-mb", "2", "--allow-host", "llens.proxy.example"], _env(),
               tmp_path_factory.mktemp("embedded"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def team(db_url, tmp_path_factory):
    """A team server (members sign in with their database password)."""
    s = Served(["--max-upload-mb", "2"], _env(LLENS_DATABASE_URL=db_url), tmp_path_factory.mktemp("team"))
    yield s
    s.stop()


def _analysis(title: str) -> int:
    """An analysis saved straight into the embedded default database."""
    from latentlens.config import Settings
    from latentlens.db import resolve_url
    from latentlens.store import Store

    url = resolve_url(Settings(None, Settings.resolve().data_dir))
    with Store.open(url) as store:
        return store.save_analysis("text", "probe-model", result=[], input={"text": "a dog"}, title=title)


# ---------------------------------------------------------------------------
# DNS rebinding: another site's page, once its name resolves to 127.0.0.1


def test_forged_host_is_refused_for_reads_and_writes(embedded):
    assert embedded.token, embedded.output()
    auth = {"Authorization": f"token {embedded.token}"}  # even with the token (a rebinding page lacks it)
    aid = _analysis("rebinding target")
    evil = f"evil.example:{embedded.port}"
    forged = {**auth, "Host": evil, "Origin": f"http://{evil}", "Sec-Fetch-Site": "same-origin"}
    with httpx.Client(base_url=embedded.base, timeout=30) as c:
        reads = c.get("/api/analyses", headers=forged)
        assert reads.status_code == 400, reads.text
        assert "does not answer to the host name 'evil.example" in reads.json()["error"]
        assert "rebinding target" not in reads.text
        page = c.get("/analyses", headers=forged)
        assert page.status_code == 400 and "rebinding target" not in page.text
        save = c.post("/api/query/text", headers=forged,
                      json={"model": "probe-model", "text": "a dog", "save": True, "title": "planted"})
        assert save.status_code == 400 and "host name" in save.json()["error"]
        gone = c.delete(f"/api/analyses/{aid}", headers=forged)
        assert gone.status_code == 400 and "host name" in gone.json()["error"]
        # no Host at all (HTTP/1.0 style) is refused too; the analysis is still there
        assert c.get(f"/api/analyses/{aid}", headers={**auth, "Host": ""}).status_code == 400
        assert c.get(f"/api/analyses/{aid}", headers=auth).json()["title"] == "rebinding target"
        # the names this server answers to: loopback names, --host, --allow-host
        for host in (f"127.0.0.1:{embedded.port}", f"localhost:{embedded.port}", "LOCALHOST.",
                     "llens.proxy.example", f"[::1]:{embedded.port}"):
            r = c.get(f"/api/analyses/{aid}", headers={**auth, "Host": host})
            assert r.status_code == 200, (host, r.text)
        assert c.get(f"/api/analyses/{aid}", headers={**auth, "Host": "proxy.example"}).status_code == 400
        # a write from this server's own origin passes the perimeter (the probe above was not refused
        # for being a write): deleting with the right Host works
        own = f"127.0.0.1:{embedded.port}"
        r = c.delete(f"/api/analyses/{aid}", headers={**auth, "Origin": f"http://{own}", "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 204, r.text
        # another site's page posting to 127.0.0.1 directly: its Origin gives it away
        r = c.post("/api/analyses", headers={**auth, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
                   json={"draft": "x"})
        assert r.status_code == 403 and "cross-site" in r.json()["error"]


def test_team_server_refuses_forged_host_before_sign_in(team):
    with httpx.Client(base_url=team.base, timeout=30) as c:
        r = c.get("/api/models", headers={"Host": "evil.example"})
        assert r.status_code == 400 and "host name" in r.json()["error"]
        r = c.get("/api/models")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert team.token is None and "?token=" not in team.output()


# ---------------------------------------------------------------------------
# the access token on the no-sign-in mode


def test_token_flow(embedded):
    t = embedded.token
    assert f"http://127.0.0.1:{embedded.port}/?token={t}" in embedded.output() and len(t) >= 40
    with httpx.Client(base_url=embedded.base, timeout=30) as c:
        for path in ("/api/models", "/api/status", "/api/analyses", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and "access token" in r.json()["error"], path
        page = c.get("/models")
        assert page.status_code == 401 and 'id="token-form"' in page.text
        assert "www-authenticate" not in page.headers  # no Basic dialog: there are no accounts
        assert c.post("/api/query/text", json={"model": "m", "text": "x"}).status_code == 401
        assert c.get("/api/models", params={"token": t[:-1] + "x"}).status_code == 401
        assert c.get("/api/models", headers={"Authorization": "token wrong"}).status_code == 401
        assert c.get("/static/app.css").status_code == 200  # the token page's own style
        # the API takes it as ?token= or a header
        assert c.get("/api/models", params={"token": t}).status_code == 200
        assert c.get("/api/models", headers={"Authorization": f"token {t}"}).status_code == 200
        assert c.get("/api/models", headers={"Authorization": f"Bearer {t}"}).status_code == 200
        # a page: the token becomes a cookie and leaves the URL
        r = c.get("/analyses", params={"token": t, "kind": "text"})
        assert r.status_code == 303 and r.headers["location"] == "/analyses?kind=text"
        cookie = r.headers["set-cookie"]
        assert f"llens_token_{embedded.port}=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert c.cookies.get(f"llens_token_{embedded.port}") == t
        assert c.get("/analyses").status_code == 200  # the cookie carries it from now on
        assert c.get("/api/models").status_code == 200
    # no open redirect from a path that starts with '//' (sent raw: clients normalise it)
    with socket.create_connection(("127.0.0.1", embedded.port), timeout=30) as sock:
        sock.sendall(f"GET //evil.example/x?token={t} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Connection: close\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert embedded.output().count(t) == 1, "the token is printed once, never logged"
    assert raw.startswith(b"HTTP/1.1 303") and b"\r\nlocation: /evil.example/x\r\n" in raw.lower(), raw[:300]


def test_no_token_opts_out_loudly(tmp_path):
    s = Served(["--no-token"], _env(), tmp_path)
    try:
        assert "Warning: --no-token" in s.output() and "?token=" not in s.output()
        with httpx.Client(base_url=s.base, timeout=30) as c:
            assert c.get("/api/models").status_code == 200
            assert c.get("/api/models", headers={"Host": "evil.example"}).status_code == 400
    finally:
        s.stop()


# ---------------------------------------------------------------------------
# uploads: counted as they arrive


def _multipart_chunks(total: int, boundary: str = "llensprobe"):
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    yield head
    block = b"\xab" * (64 * 1024)
    sent = 0
    while sent < total:
        yield block
        sent += len(block)
    yield f"\r\n--{boundary}--\r\n".encode()


def _chunked_upload(served: Served, total: int, headers: dict[str, str]) -> tuple[bytes, int]:
    """POST a multipart body of ``total`` bytes with Transfer-Encoding: chunked over a raw socket;
    (the response, bytes the server let us send). Reads while sending: the server answers early."""
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    response = bytearray()

    def read() -> None:
        try:
            while chunk := sock.recv(65536):
                response.extend(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    lines = ["POST /api/query/image HTTP/1.1", f"Host: 127.0.0.1:{served.port}",
             "Content-Type: multipart/form-data; boundary=llensprobe", "Transfer-Encoding: chunked",
             *(f"{k}: {v}" for k, v in headers.items())]
    sent = 0
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for part in _multipart_chunks(total):
            sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
            sent += len(part)
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server stopped reading and closed: expected once it refused
    reader.join(30)
    sock.close()
    return bytes(response), sent


@pytest.mark.parametrize("which", ["embedded", "team"])
def test_chunked_upload_refused_at_the_limit(which, request):
    served: Served = request.getfixturevalue(which)
    # the embedded server's token is sent (it is checked first); the team server's sign-in is not:
    # the 413 comes before the 401, without spooling the body to read a password
    headers = {"Authorization": f"token {served.token}"} if which == "embedded" else {}
    before, rss_before = served.io(), served.peak_rss()
    response, sent = _chunked_upload(served, 60 * MB, headers)
    after = served.io()
    status = response.split(b"\r\n", 1)[0]
    assert b" 413 " in status, response[:300]
    assert b"at most 2 MB" in response
    # what the multipart parser spooled to its temp file (beyond 1 MB in memory): at most the
    # 2 MB limit + 1 MB slack, never the 60 MB sent at it
    written = after["wchar"] - before["wchar"]
    assert written < 4 * MB, f"the server wrote {written / MB:.1f} MB (spooled the upload)"
    assert served.peak_rss() - rss_before < 16 * MB
    # it stopped reading: the client could push the limit and the sockets' buffers, not the rest
    assert sent < 24 * MB, f"the client pushed {sent / MB:.1f} MB"
    # a small body without credentials still gets the sign-in's 401 (team) / passes (embedded)
    with httpx.Client(base_url=served.base, timeout=30, headers=headers) as c:
        r = c.post("/api/query/image", files={"image": ("x.png", b"not an image")}, data={"model": "m"})
        assert r.status_code == (401 if which == "team" else 400), r.text


# ---------------------------------------------------------------------------
# the pixel budget: a small file with a huge header


def huge_png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of width x height zeros, a few hundred KB (written without Pillow)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_budget_refused_from_the_header(embedded):
    png = huge_png(9_400, 9_400)
    assert len(png) < 400_000
    rss_before = embedded.peak_rss()
    with httpx.Client(base_url=embedded.base, timeout=60, headers={"Authorization": f"token {embedded.token}"}) as c:
        r = c.post("/api/query/image", files={"image": ("bomb.png", png, "image/png")}, data={"model": "m"})
    assert r.status_code == 400, r.text
    assert "9400x9400 = 88.4 megapixels, over the limit of 16.8 megapixels" in r.json()["error"]
    # never decoded: 88 MP would be 88 MB grey and 265 MB as RGB
    assert embedded.peak_rss() - rss_before < 40 * MB
