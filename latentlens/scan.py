"""Exact nearest neighbours by scanning a local fp16 copy of each leaf.

Why not HNSW: visual tokens and other out-of-distribution queries have best
neighbours at cosine ~0.1-0.3, where HNSW recall@10 is 0.24-0.34 at
ef_search 40. A brute-force scan is exact for every query distribution and,
done right, as fast as the reference library's in-RAM matmul:

* each leaf (model, layer) is copied once from the database by binary COPY
  (``Store.iter_layer``) into ``cache_dir()/scan/<instance>/<model_id>/<layer>/``
  as raw float16 rows + keys + inverse norms, and recopied when the leaf's
  ``(row_count, version)`` changes (``Store.leaf_version``);
* the file is memory-mapped and scanned in blocks: each block is multiplied
  by the whole query batch with torch, in float32 (converted per block) or,
  where the CPU has BF16/AMX units, in bfloat16 read straight from a second
  copy of the leaf rounded once to bfloat16 (``vectors.bf16``: no per-search
  conversion); each block keeps, per query, the rows scoring at least a
  threshold that trails the running k-th best by the rounding bound
  (threshold_blocks: the one pass), or its running top-(k + margin)
  (topk_blocks; see scan_select for which runs when); pages of a finished block are dropped from the process
  (``MADV_DONTNEED``), so resident memory is one block plus the query batch
  and the kept rows, whatever the leaf size, while the OS page cache keeps
  the file hot for the next query;
* the kept rows are re-ranked by exact float32 cosine, and the answer is
  certified equal to the float32 one: no row left out can beat the k-th
  (bounded by the rounding of bfloat16). The one pass certifies by
  construction; a top-k query not certified is scanned again by the one
  pass (or with 4x the candidates), until certified (ScanEngine.search_leaf).

This module imports torch; the store does not.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch

from latentlens import config
from latentlens.errors import EmptyResult, InputError, LatentLensError
from latentlens.store import KnnResult, ModelInfo, Store
from latentlens.store.types import KEY_DTYPE, SPAN_UNKNOWN, check_k, unit_queries

CACHE_FORMAT = 2  # 2: keys.npy holds each row's char span (KEY_DTYPE)
_T = TypeVar("_T")
ENV_SCAN_DTYPE = "LLENS_SCAN_DTYPE"
# a leaf's bfloat16 copy (the file every scan maps) is written in whole pieces of this many
# bytes at offsets that are multiples of it (_AlignedWriter): Linux's page cache (6.x, ext4 and
# others with large folios) then holds it in 2 MiB folios, mapped by one page-table entry each,
# so that populating and dropping a 40 MB leaf's pages each search took 0.05 + 0.08 ms instead
# of 0.4-0.6 + 0.2-0.4 (written in ~2 MB pieces at any offset: small folios). 2-core Xeon, 35k
# real rows x 8 layers: 8 queries 38 -> 31 ms a search, 576 out of distribution 428 -> 342
# (with ONE_PASS_FIRST). Allocating the large folios slows the writes themselves (the very first
# query's copy of the 8 leaves: 1.52 -> 1.6-1.9 s), so the float16 file, read only by re-ranks,
# is written as it comes. Where the kernel has no large folios nothing changes.
WRITE_ALIGN = 2 << 20
# candidates beyond k on the first try: enough that ~all queries' top-k are certified at once
# (36.5k clustered rows, 576 random unit queries: 81% at k + 16, 100% at k + 32)
DEFAULT_MARGIN = 32
# the one pass re-ranks its best k + this many candidates by score first, and then only those
# of the rest whose score can still beat the exact k-th among them (_one_pass): 576 queries x
# 35k real 576-d rows x 8 layers, out of distribution, 166k -> 102k pairs re-ranked and
# 492 -> 404 ms a search (k + 32 first; 2-core Xeon, AMX, quiet, A/B of the two trees), the same answers
ONE_PASS_FIRST = 4
MAX_KEEP_HINT = 1024
# bytes of float32 scores per block; bounds memory as Q grows
SCORE_BUDGET = 96 << 20
MAX_BLOCK_ROWS = 65536
MIN_BLOCK_ROWS = 4096
# rows per chunk whose best score decides whether the threshold scan looks at them
SELECT_CHUNK = 32
# batches up to this many queries select rows by one mask over the scores instead
DIRECT_SELECT_QUERIES = 32
# rows a query may keep in the one-pass threshold scan before it falls back to a top-k scan
# (at 2048, 200k x 4096-d leaves' OOD queries kept up to ~2000 and a few went over: each
# rescanned the leaf 3 times, 42, 168 and 672 candidates)
MAX_CANDIDATES = 4096
# bytes of float32 candidate rows per re-rank step (the top-k path's buffers are reused;
# few steps: on a loaded machine every parallel op waits for a descheduled worker thread)
RERANK_BYTES = 16 << 20
# float16 bytes per chunk of a leaf's copy out of PostgreSQL (its float32 norms: twice that)
COPY_CHUNK_BYTES = 2 << 20
# leaves copied at once by LeafCache.get_many (a connection and a server backend each)
COPY_WORKERS = 4
# elements per piece of the copy's arithmetic (_fill_arithmetic): torch's grain size, below
# which an op runs on the calling thread
FILL_PIECE = 32768
# with LLENS_SCAN_SIDE_BY_SIDE=1, batches up to this many queries scan several leaves at once,
# one per thread (ScanEngine.search_many). Off by default: on a quiet 2-core Xeon (AVX-512-BF16,
# AMX) leaf by leaf on torch's 2 threads was faster (8 queries, warm: 35k x 8 rows 44 vs 46-50 ms,
# 300k x 8 0.23 vs 0.28 s, 200k x 2 x 4096 0.18 vs 0.35 s); side by side won only under heavy load
# from other processes (4x at a load average of 7-10), where each op's thread barrier waits
PARALLEL_LEAF_QUERIES = DIRECT_SELECT_QUERIES
SIDE_BY_SIDE_ENV = "LLENS_SCAN_SIDE_BY_SIDE"
# bytes of leaves' rows mapped at once by all those threads together: less than one block of
# the leaf-by-leaf scan (a 35k x 576 leaf: 40 MB), so that side by side adds no peak memory
PARALLEL_BLOCK_BYTES = 32 << 20
# an image's batch scores block @ q.T ([n, Q]) up to this many dimensions, q @ block.T above:
# 576 x 40960-row bf16 blocks, 2 threads (Xeon, AMX): 7.4 vs 9.8 ms at 576-d, 34.9 vs 41.5 at
# 2048, but 89.1 vs 65.3 at 3072 and 109.6 vs 96.3 at 4096
ROWS_FIRST_MAX_DIM = 2048
# rows per piece of a re-rank's read of candidate rows (Leaf.gather)
GATHER_ROWS = 4096
# at most this many rows: a pread each instead of reading through the map (Leaf._pread)
PREAD_ROWS = 1024
# a re-rank whose distinct rows x queries x dim is at most this many multiply-adds (or at most
# 4x its pairs' work) takes one [U, D] x [D, Q] matmul and picks its pairs out (_dense_cosines)
DENSE_RERANK_MACS = 16 << 20


# --------------------------------------------------------------------------
# the on-disk leaf cache


@dataclass
class Leaf:
    """One cached leaf: ``rows`` float16 vectors of ``dim`` plus keys and 1/|v|."""

    path: Path
    rows: int
    dim: int
    row_count: int
    version: int
    # keys, norms and maps opened once per process (LeafCache hands out the same Leaf while
    # its version holds): reopened per search they cost ~1 ms a leaf, a sixth of a warm
    # 8-query search at 36.5k rows
    _opened: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def vectors_path(self) -> Path:
        return self.path / "vectors.f16"

    @property
    def bf16_path(self) -> Path:
        return self.path / "vectors.bf16"

    def keys(self) -> np.ndarray:
        if "keys" not in self._opened:
            self._opened["keys"] = np.load(self.path / "keys.npy", mmap_mode="r")
        return self._opened["keys"]

    def inv_norms(self) -> np.ndarray:
        if "inv" not in self._opened:
            self._opened["inv"] = np.load(self.path / "inv_norm.npy")
        return self._opened["inv"]

    def inv_range(self) -> tuple[float, float]:
        """(min, max) of 1/|row| (the certificate's scale bounds), taken once."""
        if "inv_range" not in self._opened:
            inv = self.inv_norms()
            self._opened["inv_range"] = (float(inv.min()), float(inv.max())) if self.rows else (1.0, 1.0)
        return self._opened["inv_range"]

    def _map(self, bf16: bool = False) -> np.ndarray:
        """The float16 rows, or the bfloat16 copy's bit patterns (int16), mapped once.

        A plain array over an mmap (kept as ``_mmaps[name]``, for madvise): slicing an
        np.memmap runs Python for every block and every gather.
        """
        name = "bf16" if bf16 else "f16"
        if name not in self._opened:
            with open(self.bf16_path if bf16 else self.vectors_path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                # pages read back from disk (evicted, after a reboot) then come in as 2 MiB
                # folios where the kernel can (see WRITE_ALIGN): a 40 MB leaf's populate
                # 0.11 ms, not 0.5
                _advise(mm, mmap.MADV_HUGEPAGE, 0, len(mm))
            if len(mm) != self.rows * self.dim * 2:
                mm.close()
                raise OSError(f"{f.name} holds {len(mm)} bytes, not {self.rows} rows of {self.dim}")
            self._opened[name] = np.frombuffer(mm, dtype=np.int16 if bf16 else np.float16).reshape(
                self.rows, self.dim)
            self._opened.setdefault("_mmaps", {})[name] = mm
        return self._opened[name]

    def pin(self) -> Leaf:
        """Open every file of this version now: keys and maps stay readable after another
        process, caching a newer version, prunes this one's folder (an unlinked file lives
        on while mapped), where a file first opened later would be gone mid-search."""
        self.keys()
        self.inv_range()
        if self.rows:
            self._map()
            self._stored_rho()
            if hasattr(os, "preadv"):
                self._f16file()  # gather's pread: a later open could find the file pruned
        return self

    def _f16file(self) -> BinaryIO:
        """The float16 file opened for pread (gather), once (pin() opens it with the maps)."""
        f = self._opened.get("f16file")
        if f is None:
            f = self._opened["f16file"] = open(self.vectors_path, "rb", buffering=0)  # noqa: SIM115
        return f

    def _stored_rho(self) -> float | None:
        """rho of a whole bfloat16 copy already written (bf16.json comes after it), the copy
        mapped now; None where there is none yet (or it is damaged)."""
        if "rho" in self._opened:
            return float(self._opened["rho"])
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            rho = float(json.loads((self.path / "bf16.json").read_text())["rho"])
            if self.bf16_path.stat().st_size == self.rows * self.dim * 2:
                if self.rows:
                    self._map(bf16=True)
                self._opened["rho"] = rho
                return rho
        return None

    def _mmap_of(self, bf16: bool = False) -> mmap.mmap:
        self._map(bf16)
        return self._opened["_mmaps"]["bf16" if bf16 else "f16"]

    def blocks(self, block_rows: int, bf16: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """(start, [b, dim]) views of the mapped file; pages are released after use.

        float16 rows, or with ``bf16`` the bfloat16 copy (see ensure_bf16) as
        int16 bit patterns (numpy has no bfloat16; topk_blocks views them back).
        Each block's pages are faulted in by one MADV_POPULATE_READ before it is
        read (where the kernel has it, 5.14+): cheaper than a fault per page from
        the matmul's threads.
        """
        if self.rows == 0:
            return
        arr = self._map(bf16)
        mm = self._mmap_of(bf16)
        row_bytes = self.dim * 2
        for start in range(0, self.rows, block_rows):
            stop = min(start + block_rows, self.rows)
            if sys.platform == "linux":
                _advise(mm, MADV_POPULATE_READ, start * row_bytes, (stop - start) * row_bytes)
            yield start, arr[start:stop]
            _release(mm, start * row_bytes, (stop - start) * row_bytes)

    def ensure_bf16(self) -> float:
        """Write the rows rounded to bfloat16 once (``vectors.bf16``), so a bf16 scan reads
        the matmul's dtype straight from the page cache instead of converting every
        float16 row on every search (measured: the conversion cost as much as the
        matmul at 576 queries, and 8x it at 8). Returns rho = max |bf16(r) - r| / |r|
        over the rows, which bounds the rounding in the re-rank's certificate.

        Raises OSError where the cache folder is read-only.
        """
        known = self._stored_rho()  # once per process: a json read and a stat per search cost
        if known is not None:
            return known
        info = self.path / "bf16.json"
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.path / f".bf16-{tag}"
        rho = 0.0
        try:
            with _aligned(tmp) as f:
                for _start, block in self.blocks(MAX_BLOCK_ROWS):
                    x = torch.from_numpy(np.array(block)).float()
                    xb = x.to(torch.bfloat16)
                    res = torch.linalg.vector_norm(x - xb.float(), dim=1)
                    norm = torch.linalg.vector_norm(x, dim=1).clamp_min(1e-30)
                    rho = max(rho, float((res / norm).max()))
                    f.write(xb.view(torch.int16).numpy())
            os.replace(tmp, self.bf16_path)
            tmp_info = self.path / f".bf16-{tag}.json"
            tmp_info.write_text(json.dumps({"rho": rho * (1 + 1e-6)}))
            os.replace(tmp_info, info)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._opened["rho"] = rho * (1 + 1e-6)
        return rho * (1 + 1e-6)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """float16 vectors of the given row numbers (for re-ranking).

        A few rows, or rows of a page or more (2048-d and up), by one pread each (_pread);
        others through the map in row order, GATHER_ROWS at a time, dropping each piece's
        pages after use: candidates scattered over the whole leaf otherwise kept all its
        pages mapped (at 4096-d x 50k rows, +400 MB of peak RSS in the first query).
        """
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float16)
        if not len(rows):
            return out
        if (len(rows) <= PREAD_ROWS or self.dim * 2 >= mmap.PAGESIZE) and hasattr(os, "preadv"):
            return self._pread(rows, out)
        arr = self._map()
        mm = self._mmap_of()
        order = np.argsort(rows, kind="stable")
        for lo in range(0, len(rows), GATHER_ROWS):
            sel = order[lo:lo + GATHER_ROWS]
            r = rows[sel]
            out[sel] = arr[r]
            _release(mm, int(r[0]) * self.dim * 2, (int(r[-1]) - int(r[0]) + 1) * self.dim * 2)
        return out

    def _pread(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``gather`` for a few rows, or rows of a page or more: one pread each, straight into
        ``out``. Through the map each row faulted in its neighbours' pages too and the range was
        dropped after (8 queries x 42 candidates in 8 leaves: 2.5x the time of the reads; 25k of
        200k rows at 4096-d: 1.9x, 140 vs 74 ms; at 576-d the map was 2x faster for 14k rows)."""
        fd, n = self._f16file().fileno(), self.dim * 2
        buf = out.data.cast("B")
        if int(rows.min()) < 0 or int(rows.max()) >= self.rows:
            raise IndexError(f"rows out of range for a leaf of {self.rows} rows")
        for j, r in enumerate(rows.tolist()):
            if os.preadv(fd, [buf[j * n:(j + 1) * n]], r * n) != n:
                raise OSError(f"short read of row {r} in {self.vectors_path}")
        return out


class _AlignedWriter:
    """A binary file written through in whole WRITE_ALIGN pieces (see WRITE_ALIGN), the tail
    at close(). Data that spans whole pieces is written from where it lies; the rest waits in
    one buffer allocated once (a growing bytearray cost page faults and copies under the GIL:
    the very first query's parallel copy of 8 leaves took 0.5 s longer)."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.buf = np.empty(WRITE_ALIGN, dtype=np.uint8)
        self.n = 0

    def write(self, data: Any) -> None:
        view = np.frombuffer(data, dtype=np.uint8)  # any contiguous buffer, empty ones included
        if self.n:
            head = min(len(view), WRITE_ALIGN - self.n)
            self.buf[self.n:self.n + head] = view[:head]
            self.n += head
            view = view[head:]
            if self.n < WRITE_ALIGN:
                return
            self._out(self.buf)
            self.n = 0
        whole = len(view) - len(view) % WRITE_ALIGN
        if whole:
            self._out(view[:whole])
        self.n = len(view) - whole
        self.buf[:self.n] = view[whole:]

    def close(self) -> None:
        if self.n:
            self._out(self.buf[:self.n])
            self.n = 0

    def _out(self, a: np.ndarray) -> None:
        """All of ``a``: a raw file's write may take less (Linux: at most 2 GiB - 4 KiB a call)."""
        mv = a.data  # a memoryview of the array
        while len(mv):
            n = self.f.write(mv)
            if not n:
                raise OSError(f"wrote nothing of {len(mv)} bytes to {getattr(self.f, 'name', 'a file')}")
            mv = mv[n:]


@contextlib.contextmanager
def _aligned(path: Path) -> Iterator[_AlignedWriter]:
    """``path`` opened for writing through an _AlignedWriter; the tail is written when the
    ``with`` body ends without an error (an early return included)."""
    with open(path, "wb", buffering=0) as f:
        w = _AlignedWriter(f)
        yield w
        w.close()


def _fill_arithmetic(
    v: np.ndarray, bf16: bool, work: dict[str, torch.Tensor]
) -> tuple[np.ndarray, np.ndarray, float]:
    """A chunk's row norms and, with ``bf16``, its bfloat16 bit patterns (int16) and
    rho = max |bf16(r) - r| / |r|; the arrays are views of ``work``, valid until the next chunk.

    torch, not numpy: its float16 -> float32 -> bfloat16 conversions are vectorised (numpy's
    astype and bit arithmetic took 2x the CPU: 0.15 s a 35k x 576 leaf). Into buffers reused
    chunk after chunk: fresh temporaries per chunk grew each copying thread's malloc arena.
    """
    n, d = v.shape
    if "x" not in work or work["x"].shape[0] < n or work["x"].shape[1] != d:
        work.update(x=torch.empty(n, d), xb=torch.empty(n, d, dtype=torch.bfloat16),
                    norms=torch.empty(n), res=torch.empty(n))
    x, xb, norms, res = work["x"][:n], work["xb"][:n], work["norms"][:n], work["res"][:n]
    src = torch.from_numpy(v)
    # pieces under torch's grain size run on this thread: four copying threads each
    # starting an OpenMP team of their own cost more CPU and memory than they saved
    step = max(1, FILL_PIECE // max(d, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        xp = x[lo:hi]
        xp.copy_(src[lo:hi])
        torch.linalg.vector_norm(xp, dim=1, out=norms[lo:hi])
        if bf16:
            xb[lo:hi].copy_(xp)  # round to nearest even, as bf16_bits
            torch.linalg.vector_norm(xp.sub_(xb[lo:hi]), dim=1, out=res[lo:hi])
    rho = float(res.div_(norms.clamp_min(1e-30)).max()) if bf16 and n else 0.0
    return norms.numpy(), xb.view(torch.int16).numpy(), rho


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None


def release_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    A copy's threads leave tens of MiB of freed chunks in their malloc arenas (chunk
    buffers, decoded ranges); kept, they sat under the first search's own memory and
    made the very first query's peak resident set ~30-50 MiB higher.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _alive(pid: str) -> bool:
    """Whether a process of this id runs (on this host: the cache dir is local); unsure -> yes."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True
    return True


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even as torch rounds
    (finite values: the leaves hold float16 rows)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


# Linux 5.14+ (mmap has no name for it); older kernels answer EINVAL, ignored
MADV_POPULATE_READ = 22


def _release(mm: mmap.mmap, offset: int, length: int) -> None:
    """Drop these pages from the process (they stay in the page cache)."""
    if hasattr(mmap, "MADV_DONTNEED"):
        _advise(mm, mmap.MADV_DONTNEED, offset, length)


def _advise(mm: mmap.mmap, advice: int, offset: int, length: int) -> None:
    if not hasattr(mm, "madvise") or length <= 0:
        return
    page = mmap.PAGESIZE
    start = (offset // page) * page
    end = offset + length
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(advice, start, end - start)


def version_dir(row_count: int, version: int) -> str:
    """A leaf version's folder name. It names the cache format: a folder of another format
    (an older latentlens) is then never in a fill's way; the next fill's prune removes it."""
    return f"v{row_count}-{version}-f{CACHE_FORMAT}"


class LeafCache:
    """Finds or fills the local copy of a leaf; safe with several processes.

    A fill writes into a private temp folder and renames it to
    ``v<row_count>-<version>``; a fill that raced with a write to the leaf
    (its version moved while copying) is thrown away and redone.
    """

    def __init__(self, store: Store, root: Path | None = None):
        self.store = store
        self.root = Path(root) if root is not None else config.cache_dir() / "scan"
        self._instance: str | None = None
        self._leaves: dict[Path, Leaf] = {}
        self._by_version: dict[tuple[int, int, int, int], Leaf] = {}  # see _known
        self._leaves_lock = threading.Lock()  # get_many fills leaves from several threads

    def leaf_dir(self, info: ModelInfo, layer: int) -> Path:
        if self._instance is None:
            self._instance = self.store.instance_id()
        return self.root / self._instance / str(info.id) / str(layer)

    def cached(self, info: ModelInfo, layer: int, version: tuple[int, int]) -> Leaf | None:
        """The cached copy of this leaf version if there is one (never copies).

        One this process already opened is answered from memory (reading meta.json twice a
        layer per search was ~5% of a warm 8-query search at 36.5k rows x 8 layers), and
        one found on disk is kept (a layer HNSW answers was reopened, ~0.6 ms, every search).
        """
        leaf = self._known(info, layer, *version)
        if leaf is None:
            path = self.leaf_dir(info, layer) / version_dir(*version)
            leaf = self._leaves.get(path) or self._open(path, info.hidden_size)
            if leaf is not None:
                self._remember(leaf, (info.id, layer, *version))
        return leaf

    def _known(self, info: ModelInfo, layer: int, row_count: int, ver: int) -> Leaf | None:
        """The leaf this process holds for this version, by a dict lookup: its path took four
        Path joins (12-40 us, up to three times a layer per search)."""
        leaf = self._by_version.get((info.id, layer, row_count, ver))
        return leaf if leaf is not None and self._leaves.get(leaf.path) is leaf else None

    def get(
        self, info: ModelInfo, layer: int, *, version: tuple[int, int] | None = None,
        progress: Callable[[int], None] | None = None, bf16: bool = False, store: Store | None = None,
    ) -> Leaf:
        """The current cached leaf, copying it from the database if needed (through ``store``,
        default this cache's; with ``bf16`` the bfloat16 copy is written in the same pass)."""
        store = store or self.store
        for _attempt in range(3):
            row_count, ver = version if version is not None else store.leaf_version(info, layer)
            version = None
            leaf = self.cached(info, layer, (row_count, ver))
            if leaf is not None:
                return leaf
            base = self.leaf_dir(info, layer)
            leaf = self._fill(info, layer, base, row_count, ver, progress, bf16, store)
            if leaf is not None:
                self._prune(base, keep=leaf.path.name)
                return self._remember(leaf, (info.id, layer, row_count, ver))
        raise InputError(f"layer {layer} of '{info.name}' kept changing while it was being cached; retry")

    @staticmethod
    def _open(path: Path, dim: int) -> Leaf | None:
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != CACHE_FORMAT or meta.get("dim") != dim:
            return None
        try:
            return Leaf(path, meta["rows"], dim, meta["row_count"], meta["version"]).pin()
        except OSError:  # pruned (or damaged) while being opened: not cached
            return None

    def _fill(
        self, info: ModelInfo, layer: int, base: Path, row_count: int, ver: int,
        progress: Callable[[int], None] | None, bf16: bool = False, store: Store | None = None,
    ) -> Leaf | None:
        """Copy the leaf by binary COPY into a private temp folder, then rename it into place.

        One pass over small chunks (~COPY_CHUNK_BYTES of float16): each chunk is written as
        float16, its norms taken, and with ``bf16`` also written rounded to bfloat16 with
        its rounding rho (what ensure_bf16 would otherwise redo in a second read of the
        whole leaf). Memory stays a few chunks whatever the leaf's size (chunks of 64k rows
        in float32 were 1 GiB at 4096-d). A copy interrupted midway leaves only the temp
        folder, removed here or by the next fill; the leaf is never seen half written.
        """
        store = store or self.store
        dim = info.hidden_size
        chunk = max(256, COPY_CHUNK_BYTES // (2 * max(dim, 1)))
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            keys = np.zeros(row_count, KEY_DTYPE)
            inv = np.zeros(row_count, np.float32)
            rows, rho = 0, 0.0
            work: dict[str, torch.Tensor] = {}
            with open(tmp / "vectors.f16", "wb") as f, \
                    (_aligned(tmp / "vectors.bf16") if bf16 else contextlib.nullcontext()) as fb:
                for k, v in store.iter_layer(info, layer, chunk_rows=chunk):
                    n = len(k)
                    if rows + n > row_count:
                        return None  # grew while copying: retry
                    v = np.ascontiguousarray(v, dtype=np.float16)
                    f.write(v.data)
                    keys[rows:rows + n] = k
                    norms, xb, chunk_rho = _fill_arithmetic(v, fb is not None, work)
                    np.divide(np.float32(1.0), np.maximum(norms, np.float32(1e-12)), out=inv[rows:rows + n])
                    if fb is not None:
                        rho = max(rho, chunk_rho)
                        fb.write(xb.data)
                    rows += n
                    if progress is not None:
                        progress(n)
            if store.leaf_version(info, layer) != (row_count, ver) or rows != row_count:
                return None  # written to while copying: retry
            np.save(tmp / "keys.npy", keys)
            np.save(tmp / "inv_norm.npy", inv)
            if bf16:
                (tmp / "bf16.json").write_text(json.dumps({"rho": rho * (1 + 1e-6)}))
            meta = {"format": CACHE_FORMAT, "rows": rows, "dim": dim, "row_count": row_count,
                    "version": ver, "model": info.name, "layer": layer, "created": time.time()}
            (tmp / "meta.json").write_text(json.dumps(meta))
            final = base / version_dir(row_count, ver)
            try:
                os.rename(tmp, final)
            except OSError:
                if self._open(final, dim) is None:  # not a finished twin: give up
                    raise
            return self._open(final, dim)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def get_many(
        self, info: ModelInfo, layers: list[int], *, bf16: bool = False, workers: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Leaf]:
        """Every leaf of ``layers`` cached, the missing ones copied in parallel.

        A thread per missing leaf (at most ``workers``, default COPY_WORKERS), each on a
        connection of its own (Store.sibling): the server's COPY of one leaf is one
        backend's work, so leaves copied side by side use every core the server has.
        """
        todo = []
        for layer in layers:
            li = info.layer(layer)
            if self.cached(info, layer, (li.row_count, li.version)) is None:
                todo.append(layer)
        if len(todo) > 1 and (workers or COPY_WORKERS) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.leaf_dir(info, todo[0])  # instance id asked once, on this thread's connection

            def one(layer: int) -> None:
                try:
                    reader = self.store.sibling()
                except LatentLensError:
                    return  # no second connection (server full, ...): copied one by one below
                with reader:
                    self.get(info, layer, bf16=bf16, progress=progress, store=reader)

            with ThreadPoolExecutor(min(len(todo), workers or COPY_WORKERS)) as pool:
                for fut in [pool.submit(one, layer) for layer in todo]:
                    fut.result()
        leaves = [self.get(info, layer, bf16=bf16, progress=progress) for layer in layers]
        if todo:
            release_heap()
        return leaves

    @staticmethod
    def _prune(base: Path, keep: str) -> None:
        """Remove stale versions (open maps of them stay valid on POSIX) and the temp folders
        of fills whose process died midway (killed: no ``finally`` ran)."""
        for p in base.iterdir():
            stale = p.name != keep and p.name.startswith("v")
            dead = p.name.startswith(".tmp-") and not _alive(p.name.split("-")[1])
            if stale or dead:
                shutil.rmtree(p, ignore_errors=True)

    def _remember(self, leaf: Leaf, key: tuple[int, int, int, int]) -> Leaf:
        """Keep ``leaf`` (its maps) for the next search, found by ``key`` (model id, layer,
        row count, version); older versions of it are let go."""
        with self._leaves_lock:
            for old in [p for p in self._leaves if p.parent == leaf.path.parent and p != leaf.path]:
                del self._leaves[old]
            self._leaves[leaf.path] = leaf
            self._by_version = {k: v for k, v in self._by_version.items()
                                if k[:2] != key[:2] and self._leaves.get(v.path) is v}
            self._by_version[key] = leaf
        return leaf

    def clear(self) -> None:
        self._leaves.clear()
        self._by_version.clear()
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------
# choosing the matmul dtype


def _calibration_path() -> Path:
    return config.cache_dir() / "scan" / "calibration.json"


def calibration_key() -> str:
    # v2: bfloat16 measured without the per-block conversion (the cache holds bf16 rows)
    return f"v2/{torch.__version__}/{torch.backends.cpu.get_cpu_capability()}/{torch.get_num_threads()}"


def measure_dtypes(dim: int = 1024, queries: int = 512, rows: int = 16384, repeats: int = 3) -> dict[str, float]:
    """Seconds per block as the scan runs it: fp16 -> float32 conversion + matmul, and
    the bfloat16 matmul of rows already in bfloat16 (read from vectors.bf16)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(queries, dim, generator=gen)
    block = torch.randn(rows, dim, generator=gen).half()
    block_bf16 = block.to(torch.bfloat16)
    out: dict[str, float] = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        qq = q.to(dt)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(qq, (block.to(dt) if dt == torch.float32 else block_bf16).T)
            best = min(best, time.perf_counter() - t)
        out[name] = best
    return out


def scan_dtype(requested: str | None = None) -> torch.dtype:
    """The matmul dtype: requested, else $LLENS_SCAN_DTYPE, else a cached one-time calibration.

    On CPUs without AVX-512-BF16/AMX, bfloat16 matmul is 3-4x slower than
    float32 (measured: 17.6 vs 61.7 GFLOP/s on a 2-core AVX2 EPYC), so "auto"
    uses float32 on non-AVX-512 CPUs and bfloat16 on CPUs with AMX-BF16 without
    measuring, and elsewhere picks bfloat16 only when a ~0.1 s one-time
    measurement finds it 1.5x faster.
    """
    name = (requested or os.environ.get(ENV_SCAN_DTYPE) or "auto").strip().lower()
    if name in ("float32", "fp32", "f32"):
        return torch.float32
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    if name != "auto":
        raise InputError(f"unknown scan dtype '{name}' (use float32, bfloat16 or auto)")
    if "AVX512" not in torch.backends.cpu.get_cpu_capability().upper():
        # without AVX-512 (no BF16 / AMX units) bfloat16 matmul is emulated: skip measuring
        return torch.float32
    if "amx_bf16" in config.cpu_flags():
        # AMX tiles: bfloat16 measured 5x float32 on a 2-core Xeon; measuring cost the very
        # first query 0.1-0.4 s (and the first bf16 matmul's setup came on top)
        return torch.bfloat16

    def measure() -> dict:
        times = measure_dtypes(dim=768, queries=256, rows=8192)
        return {"times": times, "choice": "bfloat16" if times["bfloat16"] * 1.5 < times["float32"] else "float32"}

    choice = measured_once(_calibration_path(), measure)["choice"]
    return torch.bfloat16 if choice == "bfloat16" else torch.float32


ENV_SCAN_DEVICE = "LLENS_SCAN_DEVICE"
ENV_SCAN_SELECT = "LLENS_SCAN_SELECT"


def scan_select(requested: str | None = None) -> str:
    """How the CPU scan selects candidates, from ``requested`` or $LLENS_SCAN_SELECT:

    "threshold": one certified pass (threshold_blocks); "topk": the top-(k + margin),
    widened until certified; "auto" (default): the one pass for batches of more than
    DIRECT_SELECT_QUERIES queries (an image's patches: 1.4-1.7x faster than top-k at
    300k rows, equal at 36.5k, measured with 2 threads on a quiet 2-core Xeon with
    AMX), and for a few queries top-k (~10% faster there) with the one pass for the
    queries it leaves, and for every later batch on a leaf where it left > 10% (dense
    leaves, near-ties).
    """
    name = (requested or os.environ.get(ENV_SCAN_SELECT) or "auto").strip().lower()
    if name not in ("auto", "threshold", "topk"):
        raise InputError(f"unknown scan selection '{name}' (use auto, threshold or topk)")
    return name


def scan_device(requested: str | None = None) -> torch.device:
    """The scan's device: requested, else $LLENS_SCAN_DEVICE, else "auto" (CUDA when present)."""
    name = (requested or os.environ.get(ENV_SCAN_DEVICE) or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown scan device '{name}' (use auto, cpu or cuda[:N])") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"scan device '{name}': this torch build sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"scan device '{name}': only cpu and cuda are supported")
    return dev


def measured_once(path: Path, measure: Callable[[], dict]) -> dict:
    """A measurement of this machine and torch build, made once and kept in ``path`` (JSON).

    Keyed by calibration_key(); several processes may race to write it (each
    writes a temp file and renames), and an unwritable cache only means
    measuring again next time.
    """
    key = calibration_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if key not in cached:
        cached[key] = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass
    return cached[key]


def measured_before(path: Path) -> dict | None:
    """measured_once's answer if this machine has it already, else None (never measures)."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    got = cached.get(calibration_key()) if isinstance(cached, dict) else None
    return got if isinstance(got, dict) else None


# --------------------------------------------------------------------------
# the scan


def block_rows_for(num_queries: int) -> int:
    """Rows per block so that the [Q, block] score matrix stays within SCORE_BUDGET."""
    rows = SCORE_BUDGET // max(4 * num_queries, 1)
    rows = max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, rows))
    return int(rows // MIN_BLOCK_ROWS * MIN_BLOCK_ROWS)


def _block_scores(q: torch.Tensor, block: np.ndarray, conv: torch.Tensor, scores: torch.Tensor,
                  block_rows: int, rows_first: bool = False) -> torch.Tensor:
    """q @ block.T into the reused ``scores`` buffer ([Q, n] view), or with ``rows_first`` its
    transpose block @ q.T ([n, Q]): the block is viewed as the matmul's dtype when it already is
    (bfloat16 bit patterns included), else converted into ``conv``.

    A few queries (<= DIRECT_SELECT_QUERIES) multiply the other way round too, block @ q.T into
    [n, Q], returned as its [Q, n] transposed view: the same products summed in float32 and
    rounded to the matmul's dtype (the certificate's bound holds either way; the scores were
    equal bit for bit on the real 35k x 576 leaves), but the kernel streams the block as it
    lies instead of repacking a transposed operand (8 queries x 35k rows x 576 bfloat16, one
    thread, under load: 1.6x faster, median of 15).
    """
    n = len(block)
    if n > block_rows:
        raise ValueError(f"block of {n} rows exceeds block_rows={block_rows}")
    with warnings.catch_warnings():  # a read-only map: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(np.asarray(block))
    if src.dtype == torch.int16:  # bfloat16 bit patterns (Leaf.blocks(bf16=True))
        src = src.view(torch.bfloat16)
    if src.dtype == q.dtype:
        b = src  # already the matmul's dtype: no conversion, no copy
    else:
        b = conv[:n]
        b.copy_(src)
    nq = q.shape[0]
    # which kernel: block @ q.T for an image's batch up to ROWS_FIRST_MAX_DIM and for a few
    # queries; q @ block.T otherwise (its [Q, n] result read as [n, Q] where asked)
    if (q.shape[1] <= ROWS_FIRST_MAX_DIM) if rows_first else (nq <= DIRECT_SELECT_QUERIES):
        st = scores[: nq * n].view(n, nq)
        torch.mm(b, q.T, out=st)
    else:
        st = scores[: nq * n].view(nq, n)
        torch.mm(q, b.T, out=st)
        st = st.T
    return st if rows_first else st.T


def topk_blocks(
    blocks: Iterator[tuple[int, np.ndarray]],
    queries: torch.Tensor,
    keep: int,
    dtype: torch.dtype = torch.float32,
    block_rows: int = MAX_BLOCK_ROWS,
    buffers: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-``keep`` of queries · rows over (start, block) blocks.

    Blocks are float16, or int16 holding bfloat16 bits (read as they are when
    ``dtype`` is bfloat16).

    Returns (scores [Q, keep'], row numbers [Q, keep']) best first, where
    keep' = min(keep, rows seen). The converted block and the score matrix
    live in buffers allocated once: a fresh [Q, B] result per block costs
    page faults that measured ~20% of the CPU time of the matmul itself.
    """
    q = queries.to(dtype).contiguous()
    nq, dim = q.shape
    best_v = torch.full((nq, 0), -float("inf"))
    best_i = torch.zeros((nq, 0), dtype=torch.int64)
    conv, scores = _buffers(buffers, dtype, dim, nq, block_rows)
    for start, block in blocks:
        n = len(block)
        s = _block_scores(q, block, conv, scores, block_rows)
        kk = min(keep, n)
        v, i = torch.topk(s, kk, dim=1)
        if v.dtype != torch.float32:
            v = v.float()
        v = torch.cat([best_v, v], dim=1)
        i = torch.cat([best_i, i + start], dim=1)
        kk = min(keep, v.shape[1])
        best_v, sel = torch.topk(v, kk, dim=1)
        best_i = torch.gather(i, 1, sel)
    return best_v, best_i


@dataclass
class Collected:
    """What threshold_blocks kept: (query, row, score) triples, grouped by query, and per query
    the threshold every row not kept scored below; ``over``: queries that hit the cap (not kept)."""

    query: torch.Tensor  # [P] int64, ascending
    row: torch.Tensor  # [P] int64
    score: torch.Tensor  # [P] float32
    threshold: torch.Tensor  # [Q] float32
    over: torch.Tensor  # [Q] bool


def threshold_blocks(
    blocks: Iterator[tuple[int, np.ndarray]],
    queries: torch.Tensor,
    k: int,
    threshold: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype = torch.float32,
    block_rows: int = MAX_BLOCK_ROWS,
    buffers: dict | None = None,
    cap: int = MAX_CANDIDATES,
) -> Collected:
    """Every row whose score could make a query's top k, in one pass over the blocks.

    Per query a running k-th best score (a lower bound: the k-th best of the
    maxima of the block's SELECT_CHUNK-row chunks, scores of distinct rows) gives
    ``threshold(kth)``; a block's rows scoring at least the current threshold
    are kept. Only the chunks whose maximum reaches it are looked at, so the
    selection costs a max over the score matrix, not a sort of it (torch.topk
    over the whole [Q, block] matrix cost as much as the bf16 matmul). The
    threshold only rises, so every row not kept scored below the final one.
    A query that keeps more than ``cap`` rows stops collecting (``over``):
    memory stays one block's scores plus Q * cap triples.
    """
    q = queries.to(dtype).contiguous()
    nq, dim = q.shape
    top = torch.full((nq, 0), -float("inf"))  # running best chunk maxima
    thr = torch.full((nq,), -float("inf"))
    count = torch.zeros(nq, dtype=torch.int64)
    over = torch.zeros(nq, dtype=torch.bool)
    got_q: list[torch.Tensor] = []
    got_r: list[torch.Tensor] = []
    got_s: list[torch.Tensor] = []
    conv, scores = _buffers(buffers, dtype, dim, nq, block_rows)
    c = SELECT_CHUNK
    for start, block in blocks:
        n = len(block)
        if nq <= DIRECT_SELECT_QUERIES:
            s = _block_scores(q, block, conv, scores, block_rows)
            # a few queries: the block's own top k and one mask are cheaper than chunk maxima
            # (a max over the middle dimension of [Q, 32, n/32] is slow when Q is small)
            best = torch.cat([top, torch.topk(s, min(k, n), dim=1).values.float()], dim=1)
            top = torch.topk(best, min(k, best.shape[1]), dim=1).values
            if top.shape[1] >= k:
                thr = torch.maximum(thr, threshold(top[:, k - 1]))
            live = _round_down(torch.where(over, float("inf"), thr), s.dtype)
            qi, ri = (s >= live[:, None]).nonzero(as_tuple=True)
            newly = (count + torch.bincount(qi, minlength=nq) > cap) & ~over
            over |= newly
            qi, ri = qi[~over[qi]], ri[~over[qi]]
            count += torch.bincount(qi, minlength=nq)
            got_q.append(qi)
            got_r.append(ri + start)
            got_s.append(s[qi, ri].float())
            continue
        # scores row by query ([n, Q], block @ q.T): half the matmul's time of q @ block.T, whose
        # [Q, n] output with n not a multiple of 32 (a leaf's last block; an entire 36.5k leaf)
        # took another kernel (measured 10.7 vs 6.5 ms a 576 x 35255 x 576 bf16 block, 2 threads)
        st = _block_scores(q, block, conv, scores, block_rows, rows_first=True)
        # chunk i of a block is its rows i, i + nc, i + 2 nc, ...: its maximum is an elementwise
        # max of c contiguous [nc, Q] slabs; the last block's rows past whole chunks (< c) count
        # one by one (no padded copy)
        nc = n // c
        chunks = st[: nc * c].view(c, nc, nq)
        tail = st[nc * c:]  # [n - nc c, Q]
        if st.stride(0) == 1:  # wide rows: st is q @ block.T's [Q, n] read as [n, Q] (_block_scores)
            cmax = _chunk_max(st.T[:, : nc * c].view(nq, c, nc).transpose(0, 1)).T  # the same maxima
        else:
            cmax = _chunk_max(chunks)  # [nc, Q]
        best = torch.cat([top, cmax.T.float(), tail.T.float()], dim=1)
        top0, top = top, torch.topk(best, min(k, best.shape[1]), dim=1).values
        thr0 = thr
        if top.shape[1] >= k:
            thr = torch.maximum(thr0, threshold(top[:, k - 1]))
        live = _round_down(torch.where(over, float("inf"), thr), st.dtype)
        bad = torch.nonzero(live <= 0).flatten() if st.dtype == torch.bfloat16 else live[:0].long()
        if len(bad):
            # thresholds <= 0 (out-of-distribution queries at ~0 cosine): those queries' exact
            # maxima, their running top and threshold again (see _chunk_max)
            cmax[:, bad] = chunks[:, :, bad].amax(dim=0)
            redo = torch.cat([top0[bad], cmax[:, bad].T.float(), tail[:, bad].T.float()], dim=1)
            top[bad] = torch.topk(redo, top.shape[1], dim=1).values
            if top.shape[1] >= k:
                thr = torch.maximum(thr0, threshold(top[:, k - 1]))
            live = _round_down(torch.where(over, float("inf"), thr), st.dtype)
        # pairs in the order that reads the scores where they lie: (chunk, query) for [n, Q]
        # scores, neighbouring pairs in one score row (in query order the gather cost 2.2x, 576
        # OOD queries x 35k real rows), (query, chunk) for wide rows' [Q, n]; the final stable
        # sort by query puts the triples in the same order either way
        if st.stride(0) == 1:
            qi, ci = (cmax.t() >= live[:, None]).nonzero(as_tuple=True)
        else:
            ci, qi = (cmax >= live[None, :]).nonzero(as_tuple=True)
        sel = chunks.permute(1, 2, 0)[ci, qi]  # [P, c] the chunks that may hold candidates
        hit = sel >= live[qi, None]
        tj, tq = (tail >= live[None, :]).nonzero(as_tuple=True)
        if len(qi) == 0 and len(tq) == 0:
            continue
        added = torch.zeros(nq, dtype=torch.int64).index_add_(0, qi, hit.sum(dim=1))
        added.index_add_(0, tq, torch.ones_like(tq))
        newly = (count + added > cap) & ~over
        if newly.any():
            over |= newly
            hit &= ~newly[qi, None]
            t_ok = ~newly[tq]
            tq, tj = tq[t_ok], tj[t_ok]
        count += torch.where(over, 0, added)
        p, j = hit.nonzero(as_tuple=True)
        got_q += [qi[p], tq]
        got_r += [ci[p] + j * nc + start, tj + nc * c + start]
        got_s += [sel[p, j].float(), tail[tj, tq].float()]
    if got_q:
        qq, rr, ss = torch.cat(got_q), torch.cat(got_r), torch.cat(got_s)
        keep = ~over[qq]
        qq, rr, ss = qq[keep], rr[keep], ss[keep]
        order = torch.sort(qq, stable=True).indices
        qq, rr, ss = qq[order], rr[order], ss[order]
    else:
        qq = rr = torch.zeros(0, dtype=torch.int64)
        ss = torch.zeros(0)
    return Collected(qq, rr, ss, thr, over)


def _chunk_max(chunks: torch.Tensor) -> torch.Tensor:
    """Per (chunk, query) a score of one of the chunk's rows, the chunk's maximum wherever that is
    positive: [c, nc, Q] -> [nc, Q].

    bfloat16 scores are compared as their int16 bit patterns (3.5x faster than amax over
    bfloat16, which converts every element: measured 1.6 vs 5.7 ms of CPU a 576 x 35k block,
    a tenth of the leaf's selection). Sign-magnitude bits order every positive score rightly
    and above every negative one, so where the maximum is positive it is exact; where the
    whole chunk is negative it is some row's score (a lower bound). Where a query's threshold
    comes out > 0, its k best chunk maxima were positive, so exact, and every chunk its
    threshold skips is one whose maximum is below it: its rows, threshold and running top are
    those of the exact maxima. threshold_blocks redoes the other queries with the exact amax.
    """
    if chunks.dtype != torch.bfloat16:
        return chunks.amax(dim=0)
    return chunks.view(torch.int16).amax(dim=0).view(torch.bfloat16)


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, rounded towards -inf (a threshold rounded up would drop rows it must keep;
    comparing in the scores' own dtype spares converting them)."""
    if dtype == x.dtype:
        return x
    y = x.to(dtype)
    return torch.where(y.to(x.dtype) > x, torch.nextafter(y, torch.full_like(y, -float("inf"))), y)


def _buffers(cache: dict | None, dtype: torch.dtype, dim: int, nq: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block and score buffers, reused across layers and calls when ``cache`` is given
    (fresh ~100 MiB buffers per layer cost page faults each time)."""
    if cache is not None:
        conv, scores = cache.get("conv"), cache.get("scores")
        if (conv is not None and conv.dtype == dtype and conv.shape[1] == dim and conv.shape[0] >= rows
                and scores is not None and scores.numel() >= nq * rows):
            return conv, scores
    conv = torch.empty((rows, dim), dtype=dtype)
    scores = torch.empty(nq * rows, dtype=dtype)
    if cache is not None:
        cache["conv"], cache["scores"] = conv, scores
    return conv, scores


# scratch buffers (block conversion, scores, re-rank) shared by a process's engines, one scan
# at a time: per engine, a bench or a server holding two Lenses kept two sets (~66 MiB each
# at 576 queries x 36k rows) though only one scan runs at a time
_SCRATCH: dict = {}
_SCRATCH_LOCK = threading.Lock()


def _shared_scratch(method: Callable[..., _T]) -> Callable[..., _T]:
    """Run an engine's scan on the process' shared scratch buffers, or, while another scan
    (another thread) holds them, on the engine's own."""

    @functools.wraps(method)
    def run(self: ScanEngine, *args: object, **kwargs: object) -> _T:
        if not _SCRATCH_LOCK.acquire(blocking=False):
            return method(self, *args, **kwargs)
        # this thread's buffers only (search_many scans leaves side by side on threads)
        own, self._local.buffers = getattr(self._local, "buffers", None), _SCRATCH
        try:
            return method(self, *args, **kwargs)
        finally:
            self._local.buffers = own
            _SCRATCH_LOCK.release()

    return run


def normalize_queries(queries: np.ndarray | torch.Tensor, dim: int, model: str = "") -> torch.Tensor:
    """float32 [Q, D] unit rows as a tensor (checks: see store.types.unit_queries)."""
    return torch.from_numpy(unit_queries(queries, dim, model))


def measure_scan(dim: int = 576, rows: int = 65536, repeats: int = 3) -> dict[str, float]:
    """Seconds per element (row x dim) of a warm scan: a fixed part and a part per query.

    The search policy's cost model (latentlens.search) fits scan time as
    rows * dim * (read + Q * mul); measured here with Q = 1 and Q = 512 (an
    image's patches) over a block bigger than the CPU caches (~1.5 s once),
    in the dtype the scan will use (bfloat16 rows as read from vectors.bf16),
    with the scan's one-pass selection (threshold_blocks).
    """
    gen = torch.Generator().manual_seed(0)
    dtype = scan_dtype()
    # drawn in the rows' own dtype: float32 draws and their conversions were ~300 MiB at
    # once, the peak of a fresh machine's first default query
    drawn = torch.randn(rows, dim, generator=gen, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    block = (drawn.view(torch.int16) if dtype == torch.bfloat16 else drawn).numpy()
    times = {}
    for nq in (1, 512):
        q = torch.nn.functional.normalize(torch.randn(nq, dim, generator=gen), dim=1)
        best = float("inf")
        br = block_rows_for(nq)
        for _ in range(repeats):
            t = time.perf_counter()
            threshold_blocks(((s, block[s:s + br]) for s in range(0, rows, br)), q, 10,
                             functools.partial(_threshold, q, dtype=dtype, rho=BF16_U / 2, inv_range=(1.0, 1.0)),
                             dtype, br)
            best = min(best, time.perf_counter() - t)
        times[nq] = best / (rows * dim)
    mul = max((times[512] - times[1]) / 511, 1e-13)
    return {"read": max(times[1] - mul, 1e-12), "mul": mul}


def _round_up(rows: int) -> int:
    return max(MIN_BLOCK_ROWS, -(-rows // MIN_BLOCK_ROWS) * MIN_BLOCK_ROWS)


def _by_cosine(sims: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    v, sel = torch.topk(sims, min(k, sims.shape[1]), dim=1)
    return v, torch.gather(rows, 1, sel)


def _dense_rerank(distinct: int, nq: int, pairs: int, dim: int) -> bool:
    """Whether a re-rank takes _dense_cosines: every distinct candidate row times every query
    is at most 4x the pairs' own work, or small anyway (a few queries: at 8 queries x 42
    candidates the gather + convert + bmm of the pairs cost ~3x this one matmul, each a
    wait on the thread pool)."""
    return distinct * nq <= 4 * pairs or distinct * nq * dim <= DENSE_RERANK_MACS


def _dense_cosines(vecs: torch.Tensor, queries: torch.Tensor, slot: torch.Tensor, qidx: torch.Tensor) -> torch.Tensor:
    """float32 dot products of pairs (query ``qidx[j]``, row ``vecs[slot[j]]``) from one
    [U, D] x [D, Q] matmul of the distinct float16 rows (converted once) by every query."""
    full = torch.mm(vecs.float(), queries.T)  # [U, Q]
    return full[slot, qidx]


def _pair_dots(vecs: torch.Tensor, queries: torch.Tensor, slot: torch.Tensor, qidx: torch.Tensor) -> torch.Tensor:
    """_dense_cosines' dot products for pairs grouped by query (``qidx`` ascending):
    a matmul [Q, D] x [D, U] sampled at the pairs (SDDMM), each dot read from the query and the
    row where they lie. Copying every pair's row into a [pairs, D] float32 operand for a bmm
    moved ~4x the bytes (576 OOD queries x 35k real rows: ~20k pairs, ~14k distinct rows)."""
    nq = queries.shape[0]
    crow = torch.zeros(nq + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(qidx, minlength=nq), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, slot, torch.zeros(len(slot)), size=(nq, len(vecs)),
                                          check_invariants=False)
        # vecs.T: the kernel reads mat2's columns, so a transposed view of contiguous rows is read as it lies
        return torch.sparse.sampled_addmm(pattern, queries, vecs.float().T, beta=0.0).values()


def _by_query(
    qidx: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, nq: int, width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, rows) of pairs grouped by query (ascending ``qidx``) as [nq, >= width] rows padded with -inf."""
    counts = torch.bincount(qidx, minlength=nq)
    w = max(width, int(counts.max()) if len(qidx) else 0)
    pos = torch.arange(len(qidx)) - (torch.cumsum(counts, 0) - counts)[qidx]
    v = torch.full((nq, w), -float("inf"))
    r = torch.zeros((nq, w), dtype=torch.int64)
    v[qidx, pos] = values
    r[qidx, pos] = rows
    return v, r


BF16_U = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)
F32_U = 2.0 ** -24
F16_U = 2.0 ** -11  # float16 (the GPU path: rows are float16 already, so exact there)
F16_TINY = 2.0 ** -20  # absolute slack for float16 scores and queries near underflow


def _error_terms(q: torch.Tensor, dtype: torch.dtype, rho: float) -> tuple[torch.Tensor, float]:
    """Per query the absolute error E of a cosine read off a matmul score, and u_out (see _outside_bound)."""
    dim = q.shape[1]
    gamma = dim * F32_U / (1 - dim * F32_U)
    qn = torch.linalg.vector_norm(q, dim=1)
    if dtype == torch.float32:
        err = gamma * qn
        u_out = 0.0
    else:
        u = BF16_U if dtype == torch.bfloat16 else F16_U
        qe = torch.linalg.vector_norm(q.to(dtype).float() - q, dim=1)
        err = (1 + u) * qe + rho * qn + gamma * (1 + u) ** 2 * qn + F16_TINY
        u_out = 2 * u / (1 - 2 * u)
    return err + 2 * gamma * qn, u_out


def _outside_bound(
    q: torch.Tensor, weakest: torch.Tensor, dtype: torch.dtype, rho: float, inv_range: tuple[float, float],
    terms: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Per query: the highest float32 cosine a row outside the candidates can have.

    Such a row's matmul score s is at most ``weakest`` (the last candidate's).
    Its exact dot d = q . r differs from s by at most |r| * E + u_out * |s|:
    E = (1 + u) |bf16(q) - q| + rho |q| (the rounding of query and row to
    bfloat16) + gamma_D (1 + u)^2 |q| (float32 accumulation over D terms), and
    u_out the rounding of the score itself to bfloat16 (counted twice, in case
    the kernel rounds a partial sum). The same with float16's u on the GPU
    path, where rho = 0 (the rows are float16 already). So its cosine d / |r| is at most
    g(weakest) / |r| + E with g(x) = x + u_out' |x| (increasing in x). A
    further 2 gamma_D covers the float32 re-rank's own rounding (ties within
    it are ties). ``terms``: _error_terms(q, dtype, rho) when the caller has them.
    """
    err, u_out = terms if terms is not None else _error_terms(q, dtype, rho)
    w = weakest.float()
    g = w + u_out * w.abs()
    lo, hi = inv_range
    return torch.maximum(g * lo, g * hi) + err


def _threshold(
    q: torch.Tensor, kth: torch.Tensor, dtype: torch.dtype, rho: float, inv_range: tuple[float, float],
) -> torch.Tensor:
    """Per query: the lowest matmul score a row needs to possibly beat the exact k-th,
    when k rows score at least ``kth``; _outside_bound inverted.

    Those k rows' float32 cosines are at least min(h(kth) lo, h(kth) hi) - E with
    h(x) = x - u_out |x|, so the k-th exact cosine is too; a row scoring below the
    returned t has _outside_bound(t) at most that, and cannot be in the top k.
    (-inf where kth is -inf: fewer than k rows seen.)
    """
    return _threshold_of(_error_terms(q, dtype, rho), kth, inv_range)


def _threshold_of(terms: tuple[torch.Tensor, float], kth: torch.Tensor, inv_range: tuple[float, float]) -> torch.Tensor:
    """_threshold with the queries' error terms computed once (_error_terms)."""
    err, u_out = terms
    lo, hi = inv_range
    kth = kth.double()
    h = kth - u_out * kth.abs()
    return _inverse_bound(terms, torch.minimum(h * lo, h * hi) - err.double(), inv_range)


def _inverse_bound(terms: tuple[torch.Tensor, float], cos: torch.Tensor, inv_range: tuple[float, float]) -> torch.Tensor:
    """Per query the lowest matmul score t whose _outside_bound(t) may reach ``cos``: a row
    scoring below t cannot beat a float32 cosine of ``cos``."""
    err, u_out = terms
    lo, hi = inv_range
    target = cos.double() - err.double()  # what g(t) * inv may reach
    y = torch.where(target >= 0, target / hi, target / lo)
    t = torch.where(y >= 0, y / (1 + u_out), y / (1 - u_out))
    # a hair lower than the algebra, for float rounding in computing it (the certificate is checked anyway)
    t = t - 1e-6 * (1 + t.abs())
    return t.float().nan_to_num(nan=-float("inf"), posinf=float("inf"), neginf=-float("inf"))


def _cores() -> int:
    """torch's thread count: the leaves a few queries scan at once."""
    return torch.get_num_threads()


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (process id, threads) -> pool
_POOL_LOCK = threading.Lock()


def _leaf_pool(n: int) -> ThreadPoolExecutor:
    """``n`` threads that each run torch ops on one thread of their own (ScanEngine.search_many).

    torch.set_num_threads sets the calling thread's OpenMP team size, and also the
    size every thread started later begins with: so the n workers set 1 together
    (held at a barrier, so that n distinct threads do), then the caller's count is
    set back for threads started after (a server's request threads; one starting in
    that short window, once per pool size and process, would begin at 1). One pool
    per size and process, never shut down while the process lives (another thread may
    be about to submit to it; callers whose torch thread counts differ get pools of
    their own); a forked child makes its own: the parent's threads are not in it.
    """
    key = (os.getpid(), n)
    with _POOL_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="llens-leaf")
            barrier = threading.Barrier(n, timeout=60)

            def pin() -> None:
                # torch sets a thread's count up from the default on its first ask: that first,
                # or the 1 would be overwritten by the caller's count set back below
                torch.get_num_threads()
                torch.set_num_threads(1)
                barrier.wait()

            try:
                for fut in [pool.submit(pin) for _ in range(n)]:
                    fut.result()
            except BaseException:
                pool.shutdown(wait=False)
                raise
            finally:
                torch.set_num_threads(threads)
            for stale in [k for k in _POOLS if k[0] != key[0]]:  # a parent's, seen after a fork
                del _POOLS[stale]
            _POOLS[key] = pool
        return pool


class ScanEngine:
    """Exact k-NN over cached leaves (see module docstring)."""

    def __init__(
        self, store: Store, *, cache_root: Path | None = None, dtype: str | None = None,
        margin: int = DEFAULT_MARGIN, block_rows: int | None = None, use_cache: bool = True,
        device: str | None = None, select: str | None = None,
    ):
        self.store = store
        self.select = scan_select(select)
        self.cache = LeafCache(store, cache_root)
        self._dtype_name = dtype
        self._dtype: torch.dtype | None = None
        self.margin = margin
        self.block_rows = block_rows
        self.use_cache = use_cache
        # block, score and re-rank buffers, per thread: search_many scans leaves side by side
        self._local = threading.local()
        self.widened = 0  # (query, leaf) pairs whose candidates had to be widened, for tests and benches
        self._widened_lock = threading.Lock()
        self.device = scan_device(device)
        # on an accelerator each leaf is copied to its memory once (float16) and scanned there
        self._resident_scan = self.device.type != "cpu"
        self._resident: dict[Path, torch.Tensor] = {}
        # per leaf: the candidate count that certified most queries last time (dense leaves
        # with in-distribution queries need more than k + margin: start there, not rescan)
        self._keep_hint: dict[Path, int] = {}
        # leaves where the top-k path needed a rescan for > 10% of a batch: "auto" takes the one pass there
        self._dense: set[Path] = set()

    @property
    def _buffers(self) -> dict:
        """This thread's reused buffers (see _buffers() and _rerank_buffers)."""
        bufs = getattr(self._local, "buffers", None)
        if bufs is None:
            bufs = self._local.buffers = {}
        return bufs

    def _widen(self, n: int) -> None:
        with self._widened_lock:
            self.widened += n

    @property
    def dtype(self) -> torch.dtype:
        if self._dtype is None:
            self._dtype = scan_dtype(self._dtype_name)
        return self._dtype

    @property
    def bf16_rows(self) -> bool:
        """Whether scans read the leaves' bfloat16 copy (so a fill writes it in the same pass)."""
        return not self._resident_scan and self.dtype == torch.bfloat16

    def prefetch(self, info: ModelInfo, layers: list[int]) -> None:
        """Copy the uncached leaves of ``layers`` now, in parallel (LeafCache.get_many), so that a
        first query over several layers waits for the slowest copy, not their sum.

        A cache that cannot be written is left to search's fallback (the COPY stream).
        """
        if not self.use_cache:
            return
        with contextlib.suppress(OSError):
            self.cache.get_many(info, layers, bf16=self.bf16_rows)

    def search(
        self, info: ModelInfo, layer: int, queries: np.ndarray | torch.Tensor, k: int, *,
        version: tuple[int, int] | None = None, progress: Callable[[int], None] | None = None,
    ) -> KnnResult:
        """Exact top-k cosine of unit ``queries`` [Q, D] (array or tensor) against one leaf."""
        k = check_k(k)
        if not isinstance(queries, torch.Tensor):
            queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        li = info.layer(layer)
        if li.row_count == 0:
            raise EmptyResult(f"model '{info.name}' has no rows in layer {layer} yet")
        nq = queries.shape[0]
        block = self.block_rows or block_rows_for(nq)
        leaf = None
        if self.use_cache:
            try:
                leaf = self.cache.get(info, layer, version=version, progress=progress, bf16=self.bf16_rows)
            except OSError:
                leaf = None  # cache dir not writable: scan the COPY stream instead
        if leaf is None:
            return self._search_stream(info, layer, queries, k)
        sims, rows = self.search_leaf(leaf, queries, k, block_rows=block)
        return self._result(layer, leaf.keys(), sims, rows, k)

    def leaf_workers(self, nq: int, leaves: int) -> int:
        """How many leaves search_many scans at once for a batch of ``nq`` queries (1: one by one)."""
        if (os.environ.get(SIDE_BY_SIDE_ENV) != "1" or self._resident_scan or nq > PARALLEL_LEAF_QUERIES
                or leaves < 2 or not self.use_cache):
            return 1
        return max(1, min(leaves, _cores()))

    def search_many(
        self, info: ModelInfo, layers: Sequence[int], queries: np.ndarray | torch.Tensor, k: int, *,
        versions: dict[int, tuple[int, int]] | None = None,
    ) -> dict[int, KnnResult]:
        """search() of each layer; a few queries scan their cached leaves side by side.

        A few queries against one leaf are a few milliseconds of ops (the matmul, the
        selection, the re-rank) too small to split well over torch's threads: each op
        waits at the thread pool's barrier (on a loaded machine, for a descheduled
        thread), and the kernel's page population and the Python between ops run on
        one core anyway. So each leaf is scanned whole by one of leaf_workers() threads
        running torch on one thread each: every core busy, no barrier. Measured on a
        2-core Xeon under load, 8 queries x 8 leaves of 35k rows (mapped, selected):
        54 ms side by side against 128 ms leaf by leaf. Big batches keep the leaf by
        leaf scan on every torch thread (their matmuls split well, and two leaves'
        score buffers at once would double the memory).
        """
        k = check_k(k)
        if not isinstance(queries, torch.Tensor):
            queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        versions = versions or {}
        nq = queries.shape[0]
        workers = self.leaf_workers(nq, len(layers))
        leaves: dict[int, Leaf] = {}
        if workers > 1:
            for layer in layers:
                if info.layer(layer).row_count == 0:
                    continue  # search() says why
                with contextlib.suppress(OSError):  # not writable: search() streams it
                    leaves[layer] = self.cache.get(info, layer, version=versions.get(layer), bf16=self.bf16_rows)
        out: dict[int, KnnResult] = {}
        if len(leaves) > 1:
            # every worker has one block's pages mapped: PARALLEL_BLOCK_BYTES between them
            workers = min(workers, len(leaves))
            budget = PARALLEL_BLOCK_BYTES // workers // (2 * max(info.hidden_size, 1))
            block = min(self.block_rows or block_rows_for(nq), max(MIN_BLOCK_ROWS, budget // MIN_BLOCK_ROWS * MIN_BLOCK_ROWS))
            pool = _leaf_pool(_cores())  # one size whatever the layer count: made once

            def one(layer: int, leaf: Leaf) -> KnnResult:
                sims, rows = self.search_leaf(leaf, queries, k, block_rows=block)
                return self._result(layer, leaf.keys(), sims, rows, k)

            futures = {layer: pool.submit(one, layer, leaf) for layer, leaf in leaves.items()}
            for layer, fut in futures.items():
                out[layer] = fut.result()
        for layer in layers:
            if layer not in out:
                out[layer] = self.search(info, layer, queries, k, version=versions.get(layer))
        return {layer: out[layer] for layer in layers}

    @_shared_scratch
    def search_leaf(
        self, leaf: Leaf, queries: torch.Tensor, k: int, *, block_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k (float32 cosines, row numbers) of unit ``queries`` in one cached leaf.

        One pass (threshold_blocks) keeps every row whose matmul score is
        within the rounding bound of the running k-th best, so that the k-th
        exact cosine of the re-ranked candidates is certified: at least the
        most any row left out could reach (its score is below the threshold,
        plus the rounding bound, see _outside_bound). Queries not certified
        (or over the candidate cap: ties by the thousand) take the older path:
        the top-(k + margin) by score, re-ranked and certified the same way,
        scanned again with 4x the candidates until certified or the candidates
        are the whole leaf. So the answer is the float32 one, near-ties
        included, whatever the matmul's dtype.
        """
        dtype = torch.float16 if self._resident_scan else self.dtype
        nq = queries.shape[0]
        block = min(block_rows or self.block_rows or block_rows_for(nq), _round_up(leaf.rows))
        inv = leaf.inv_norms()
        bf16_file, rho = False, 0.0
        if self._resident_scan:
            pass  # float16 rows as stored: rho = 0
        elif dtype == torch.bfloat16:
            try:
                rho, bf16_file = leaf.ensure_bf16(), True
            except OSError:  # read-only cache: convert each block (round to nearest)
                rho = BF16_U
        inv_t = torch.from_numpy(inv)
        inv_range = leaf.inv_range()
        kk = min(k, leaf.rows)
        out_v = torch.full((nq, kk), -float("inf"))
        out_i = torch.zeros((nq, kk), dtype=torch.int64)
        todo = torch.arange(nq)
        can = not self._resident_scan and kk > 0
        tried = False  # the one pass, at most once a search
        if can and (self.select == "threshold" or (self.select == "auto" and (
                nq > DIRECT_SELECT_QUERIES or leaf.path in self._dense))):
            todo, tried = self._one_pass_for(todo, leaf, inv_t, queries, kk, dtype, rho, inv_range, block,
                                             bf16_file, out_v, out_i), True
            self._widen(len(todo))
        keep = min(max(k + self.margin, self._keep_hint.get(leaf.path, 0)), leaf.rows)
        first = True
        while len(todo):
            q = queries[todo]
            if self._resident_scan:
                approx, cand = self._scan_resident(leaf, q, keep)
            else:
                approx, cand = topk_blocks(leaf.blocks(block, bf16=bf16_file), q, keep, dtype, block, self._buffers)
            v, i = self._rerank(leaf, inv_t, q, cand, k)
            if keep >= leaf.rows or kk == 0:
                done = torch.ones(len(todo), dtype=torch.bool)
            else:
                bound = _outside_bound(q, approx[:, -1], dtype, rho, inv_range)
                done = v[:, kk - 1] >= bound
            out_v[todo[done]], out_i[todo[done]] = v[done], i[done]
            todo = todo[~done]
            self._widen(len(todo))
            if first and len(todo) > nq // 10:
                # > 10% rescanned: later searches of this leaf start wider (the hint only grows:
                # halving it back would trade a rescan every few searches for a smaller re-rank),
                # and with "auto" they take the one pass (a dense leaf: near-ties everywhere)
                self._keep_hint[leaf.path] = min(keep * 4, MAX_KEEP_HINT)
                if self.select == "auto":
                    self._dense.add(leaf.path)
            first = False
            keep = min(keep * 4, leaf.rows)
            if len(todo) and can and not tried and self.select == "auto":
                # those left: one pass certifies them at once (rather than 4x the candidates, again)
                todo, tried = self._one_pass_for(todo, leaf, inv_t, queries, kk, dtype, rho, inv_range, block,
                                                 bf16_file, out_v, out_i), True
        return out_v, out_i

    def _one_pass_for(
        self, todo: torch.Tensor, leaf: Leaf, inv: torch.Tensor, queries: torch.Tensor, kk: int, dtype: torch.dtype,
        rho: float, inv_range: tuple[float, float], block: int, bf16_file: bool, out_v: torch.Tensor,
        out_i: torch.Tensor,
    ) -> torch.Tensor:
        """_one_pass for the queries numbered ``todo``; returns those it did not certify."""
        if len(todo) == len(queries):
            return todo[self._one_pass(leaf, inv, queries, kk, dtype, rho, inv_range, block, bf16_file, out_v, out_i)]
        ov = torch.full((len(todo), kk), -float("inf"))
        oi = torch.zeros((len(todo), kk), dtype=torch.int64)
        left = self._one_pass(leaf, inv, queries[todo], kk, dtype, rho, inv_range, block, bf16_file, ov, oi)
        ok = torch.ones(len(todo), dtype=torch.bool)
        ok[left] = False
        out_v[todo[ok]], out_i[todo[ok]] = ov[ok], oi[ok]
        return todo[left]

    def _one_pass(
        self, leaf: Leaf, inv: torch.Tensor, queries: torch.Tensor, kk: int, dtype: torch.dtype, rho: float,
        inv_range: tuple[float, float], block: int, bf16_file: bool, out_v: torch.Tensor, out_i: torch.Tensor,
    ) -> torch.Tensor:
        """The threshold scan, its re-rank and certificate: fills out_v / out_i of the certified
        queries and returns the others' numbers (for the top-k path)."""
        nq = queries.shape[0]

        terms = _error_terms(queries, dtype, rho)

        def thr_of(kth: torch.Tensor) -> torch.Tensor:
            return _threshold_of(terms, kth, inv_range)

        got = threshold_blocks(leaf.blocks(block, bf16=bf16_file), queries, kk, thr_of, dtype, block,
                               self._buffers, max(MAX_CANDIDATES, 8 * kk))
        # the final threshold from the k-th best score among the kept (tighter than the
        # running one, a bound from chunk maxima)
        approx, rowmat = _by_query(got.query, got.score, got.row, nq, kk)
        thr = torch.maximum(got.threshold, thr_of(torch.topk(approx, kk, dim=1).values[:, kk - 1]))
        # re-rank in two steps: the best k + ONE_PASS_FIRST by score first; their exact k-th then says
        # which of the other kept rows can still beat it (those within the rounding bound
        # below it, ~half the rows above thr, which assumed the worst rounding both ways)
        m = min(kk + ONE_PASS_FIRST, approx.shape[1])
        first_v, first = torch.topk(approx, m, dim=1)
        ok1 = (first_v >= thr[:, None]) & (first_v > -float("inf"))  # not padding
        q1 = torch.arange(nq).repeat_interleave(m).view(nq, m)
        sims1, rows1 = self._rerank_pairs(leaf, inv, queries, q1[ok1], rowmat.gather(1, first)[ok1], kk)
        v1 = torch.topk(sims1, kk, dim=1).values[:, kk - 1]
        need = torch.maximum(thr, _inverse_bound(terms, v1, inv_range))
        rest = ((approx >= need[:, None]) & (approx > -float("inf"))).scatter_(1, first, False)
        q2, p2 = rest.nonzero(as_tuple=True)
        sims2, rows2 = self._rerank_pairs(leaf, inv, queries, q2, rowmat[q2, p2], 0)
        v, i = _by_cosine(torch.cat([sims1, sims2], dim=1), torch.cat([rows1, rows2], dim=1), kk)
        # every row not re-ranked scored below `need`; thr = -inf: no row was left out
        bound = _outside_bound(queries, need, dtype, rho, inv_range, terms)
        done = ~got.over & (torch.isneginf(thr) | (v[:, kk - 1] >= bound))
        out_v[done], out_i[done] = v[done], i[done]
        return torch.arange(nq)[~done]

    def _rerank_buffers(self, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[>= n, dim] float16 and float32 buffers for candidate rows, kept between searches."""
        b16, b32 = self._buffers.get("rerank16"), self._buffers.get("rerank32")
        if b16 is None or b32 is None or b16.shape[1] != dim or b16.shape[0] < n:
            b16 = self._buffers["rerank16"] = torch.empty((n, dim), dtype=torch.float16)
            b32 = self._buffers["rerank32"] = torch.empty((n, dim), dtype=torch.float32)
        return b16, b32

    def _rerank_pairs(
        self, leaf: Leaf, inv: torch.Tensor, queries: torch.Tensor, qidx: torch.Tensor, rows: torch.Tensor,
        width: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact float32 cosines of (query, row) pairs grouped by query (ascending ``qidx``),
        any number per query: ([Q, W] cosines padded with -inf, [Q, W] row numbers), W >= width.

        Each distinct row is read once (float16); the pairs' dot products are one sampled
        matmul (_pair_dots), or, when the distinct rows times the queries are not many more
        than the pairs, a dense one (_dense_cosines).
        """
        nq, dim = queries.shape
        if len(qidx) == 0:
            return _by_query(qidx, torch.zeros(0), rows, nq, width)
        uniq, inverse = np.unique(rows.numpy(), return_inverse=True)
        inverse_t = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        if _dense_rerank(len(uniq), nq, len(qidx), dim):
            dots = _dense_cosines(torch.from_numpy(leaf.gather(uniq)), queries, inverse_t, qidx)
        else:
            # the distinct rows a slice at a time: all at once as float32 were ~450 MiB at 4096-d
            # (45k distinct rows a leaf, 576 queries out of distribution)
            dots = torch.empty(len(qidx))
            step = max(1, RERANK_BYTES // (dim * 4))
            for lo in range(0, len(uniq), step):
                hi = min(lo + step, len(uniq))
                vecs = torch.from_numpy(leaf.gather(uniq[lo:hi]))
                at = inverse_t < hi if lo == 0 else (inverse_t >= lo) & (inverse_t < hi)
                dots[at] = _pair_dots(vecs, queries, inverse_t[at] - lo, qidx[at])
        return _by_query(qidx, dots * inv[rows], rows, nq, width)

    def _scan_resident(self, leaf: Leaf, queries: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``keep`` float16 scores and rows of the leaf kept in the device's memory (a GPU).

        float16 products accumulate in float32 (reduced-precision reductions are
        switched off for the call): the bound in _outside_bound holds.
        """
        mat = self._resident.get(leaf.path)
        if mat is None:
            mat = torch.empty((leaf.rows, leaf.dim), dtype=torch.float16, device=self.device)
            for start, block in leaf.blocks(MAX_BLOCK_ROWS):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    mat[start:start + len(block)].copy_(torch.from_numpy(np.asarray(block)))
            for old in [p for p in self._resident if p.parent == leaf.path.parent]:
                del self._resident[old]  # an older version of this leaf
            self._resident[leaf.path] = mat
        q = queries.to(self.device, torch.float16)
        nq = q.shape[0]
        step = max(MIN_BLOCK_ROWS, (1 << 30) // max(2 * nq, 1))  # <= 1 GiB of scores at a time
        best_v = best_i = None
        flag = getattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", None)
        if flag is not None:
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        try:
            for start in range(0, leaf.rows, step):
                s = q @ mat[start:start + step].T
                v, i = torch.topk(s, min(keep, s.shape[1]), dim=1)
                i = i + start
                if best_v is not None and best_i is not None:
                    v, i = torch.cat([best_v, v], dim=1), torch.cat([best_i, i], dim=1)
                    v, sel = torch.topk(v, min(keep, v.shape[1]), dim=1)
                    i = torch.gather(i, 1, sel)
                best_v, best_i = v, i
        finally:
            if flag is not None:
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = flag
        assert best_v is not None and best_i is not None
        return best_v.float().cpu(), best_i.cpu()

    def _rerank(
        self, leaf: Leaf, inv: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact float32 cosines of the candidates, best first.

        Each distinct row is read once (float16), and the [Q, keep, D] float32
        candidates are built a few MiB of queries at a time in reused buffers:
        built whole (56 MiB at 576 x 42 x 576) and freshly allocated per layer,
        the re-rank cost 4x the bf16 scan's matmul (profiled under load: page faults, memory traffic).
        """
        nq, keep = rows.shape
        dim = queries.shape[1]
        uniq, inverse = np.unique(rows.numpy(), return_inverse=True)
        vecs = torch.from_numpy(leaf.gather(uniq))  # [U, D] float16
        inverse_t = torch.from_numpy(inverse.reshape(rows.shape).astype(np.int64))
        scale = inv[torch.from_numpy(uniq)][inverse_t]  # [Q, keep] 1/|row|
        if _dense_rerank(len(uniq), nq, nq * keep, dim):
            qidx = torch.arange(nq).repeat_interleave(keep)
            sims = _dense_cosines(vecs, queries, inverse_t.reshape(-1), qidx).view(nq, keep)
            return _by_cosine(sims * scale, rows, k)
        step = max(1, RERANK_BYTES // max(keep * dim * 4, 1))
        n = min(step, nq) * keep
        b16, b32 = self._rerank_buffers(n, dim)
        sims = torch.empty((nq, keep), dtype=torch.float32)
        for lo in range(0, nq, step):
            hi = min(lo + step, nq)
            m = (hi - lo) * keep
            torch.index_select(vecs, 0, inverse_t[lo:hi].reshape(-1), out=b16[:m])
            c = b32[:m]
            c.copy_(b16[:m])
            torch.bmm(c.view(hi - lo, keep, dim), queries[lo:hi].unsqueeze(2), out=sims[lo:hi].unsqueeze(2))
        return _by_cosine(sims * scale, rows, k)

    def _search_stream(self, info: ModelInfo, layer: int, queries: torch.Tensor, k: int) -> KnnResult:
        keys: list[np.ndarray] = []
        invs: list[np.ndarray] = []
        block = self.block_rows or block_rows_for(queries.shape[0])

        def blocks() -> Iterator[tuple[int, np.ndarray]]:
            start = 0
            for kk, v in self.store.iter_layer(info, layer, chunk_rows=block):
                keys.append(kk)
                invs.append(1.0 / np.maximum(np.linalg.norm(v.astype(np.float32), axis=1), 1e-12))
                yield start, v
                start += len(kk)

        sims, rows = topk_blocks(blocks(), queries, k + self.margin, torch.float32, block, self._buffers)
        inv = np.concatenate(invs).astype(np.float32)
        sims, rows = _by_cosine(sims * torch.from_numpy(inv[rows.numpy()]), rows, k)
        return self._result(layer, np.concatenate(keys), sims, rows, k)

    @staticmethod
    def _result(layer: int, keys: np.ndarray, sims: torch.Tensor, rows: torch.Tensor, k: int) -> KnnResult:
        nq, got = sims.shape
        sim = np.full((nq, k), -np.inf, dtype=np.float32)
        sid = np.full((nq, k), -1, dtype=np.int64)
        pos = np.full((nq, k), -1, dtype=np.int32)
        tok = np.full((nq, k), -1, dtype=np.int32)
        cs = np.full((nq, k), SPAN_UNKNOWN, dtype=np.int32)  # padding: never taken as a found row's
        ce = np.full((nq, k), SPAN_UNKNOWN, dtype=np.int32)
        r = rows.numpy()
        sim[:, :got] = sims.numpy()
        sel = keys[r.ravel()].reshape(r.shape) if got else keys[:0]
        if got:
            sid[:, :got] = sel["sentence_id"]
            pos[:, :got] = sel["position"]
            tok[:, :got] = sel["token_id"]
            cs[:, :got] = sel["char_start"]
            ce[:, :got] = sel["char_end"]
        return KnnResult(layer=layer, similarity=sim, sentence_id=sid, position=pos, token_id=tok,
                         char_start=cs, char_end=ce)

    def warm(self, info: ModelInfo, layers: list[int] | None = None) -> list[Leaf]:
        """Fill the cache of these layers now (e.g. after an ingest)."""
        return self.cache.get_many(info, layers or info.layer_numbers, bf16=self.bf16_rows)


__all__ = [
    "Leaf", "LeafCache", "ScanEngine", "block_rows_for", "calibration_key", "measure_dtypes", "measure_scan",
    "measured_before", "measured_once",
    "normalize_queries", "scan_device", "scan_dtype", "scan_select", "threshold_blocks", "topk_blocks",
]
