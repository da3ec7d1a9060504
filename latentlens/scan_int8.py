"""A certified int8 first pass for a few queries (opt-in: LLENS_SCAN_INT8=1).

Why: a few queries' bfloat16 scan is memory-bound (2 bytes a dimension); int8 codes of the
rows read 1 byte, through torch's dynamic int8 linear (fbgemm/oneDNN, VNNI/AMX where the CPU
has them). Off by default: the packed codes live in the process' anonymous memory (a 36.5k x
576 leaf: 20 MB, +160 MB for 8 leaves, over the memory goal of the 36.5k x 8 bench) and the
pack costs ~0.15-0.4 s a 36.5k-row leaf once per process; measured gain on a loaded 2-core
Xeon: 1.1-1.4x on the scan of 8 queries (docs/query.md, "int8 first pass").

Per leaf (``Int8Codes``), with xn = row * inv_norm (the row the exact re-rank scores):

* the FLOAT_DIMS dimensions of largest |xn| (hidden states' massive activations) stay
  float32; the others are codes c[i, j] = round(xn[i, j] / s[j]), s[j] = max_i |xn[i, j]| / 127;
* per row rr[i] >= |xn_i - c_i * s|_2 (the codes' rounding) and l1[i] = sum_j |c[i, j]|.

Per query q (coded part v = q * s, scaled by a power of two G to |v| <= 63/64): hi = v rounded
to a multiple of 1/64 and lo = 64 (v - hi). An anchor row holding -1 and 63/64 pins the
kernel's per-tensor activation range to [-1, 63/64], so its scale is exactly 1/64 (zero point
64): hi is quantized without error and lo with at most one step, 1/64. The int8 product of
the [hi; lo; anchor] batch is exact in int32. So, per (query, row):

    |cos - approx| <= |q_coded|_2 rr[i] + l1[i] / (64 * 64 * G) + eps

(Cauchy-Schwarz on the codes' rounding; lo's quantization; eps: float32 rounding of the
re-rank and of approx). Rows whose approx + bound reaches the k-th largest approx - bound are
re-ranked exactly; none other can be in the top k. ``kernel_exact`` checks those kernel
properties once per process (on a CPU or build where they fail, the path is off).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from latentlens.errors import InputError

if TYPE_CHECKING:
    from latentlens.scan import Leaf

ENV_SCAN_INT8 = "LLENS_SCAN_INT8"
# batches up to this many queries take the int8 pass: its kernel multiplies 2Q + 1 rows (measured
# on 8 real 35k x 576 leaves, one torch thread, load ~5: 1.2-1.3x the bf16 scan at 8 queries,
# 0.75-1.2x at 16, 0.75-1.0x at 32)
MAX_QUERIES = 16
# dimensions scored in float32: the largest |xn| (a few massive activations per layer) would
# otherwise set s[j] and the activation scale for all the rest
FLOAT_DIMS = 8
# rows per packed weight: the [2Q, rows] float32 bounds of one piece at a time
PACK_ROWS = 65536
GRID = 64  # the activation grid: multiples of 1/64 over [-1, 63/64]
F32_U = 2.0 ** -24
# quantized engines in order of preference: oneDNN's dynamic int8 linear measured 1.3x
# fbgemm's at 17 activation rows (2-core Xeon, AMX, one thread)
ENGINES = ("onednn", "x86", "fbgemm")
_ENGINE_LOCK = threading.Lock()


def enabled(requested: str | None = None) -> bool:
    """Whether a few queries take the int8 pass: ``requested`` or $LLENS_SCAN_INT8 (default off)."""
    name = (requested or os.environ.get(ENV_SCAN_INT8) or "0").strip().lower()
    if name in ("1", "on", "yes", "true"):
        return True
    if name in ("0", "off", "no", "false"):
        return False
    raise InputError(f"unknown {ENV_SCAN_INT8} value '{name}' (use 1 or 0)")


def _engine() -> str | None:
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ENGINES if e in engines), None)


def _pack(codes: torch.Tensor) -> object:
    """The engine's packed weight of int8 codes [n, d] (scale 1, zero point 0).

    The engine is a process-wide setting read by the prepack only (the packed object runs its
    own kernel): set for the call under a lock, then restored.
    """
    with warnings.catch_warnings():
        # torch 2.13 warns that quantized tensor creation is deprecated; its dynamic int8
        # linear has no other entry point, and torch is pinned exactly
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*", category=UserWarning)
        w = torch._make_per_tensor_quantized_tensor(codes, 1.0, 0)
    engine = _engine()
    if engine is None:
        raise RuntimeError("no quantized engine with a dynamic int8 linear")
    with _ENGINE_LOCK:
        old = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            return torch.ops.quantized.linear_prepack(w, None)
        finally:
            torch.backends.quantized.engine = old


def _linear(batch: torch.Tensor, packed: object) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(batch, packed, True)  # reduce_range: 7-bit activations


def _anchor(dim: int) -> torch.Tensor:
    a = torch.zeros(1, dim)
    a[0, 0], a[0, 1] = -1.0, (GRID - 1) / GRID
    return a


@functools.cache
def kernel_exact() -> bool:
    """Whether this CPU and torch build's dynamic int8 linear has the properties the bound
    assumes: grid rows under the anchor come out exact, rows in [-0.5, 0.5] within one
    1/64 step per element. Checked once per process on random codes (extremes included)."""
    if _engine() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    n, d = 300, 96
    codes = torch.randint(-127, 128, (n, d), generator=gen, dtype=torch.int8)
    codes[0], codes[1] = 127, -127
    hi = torch.randint(-GRID, GRID, (6, d), generator=gen).float() / GRID
    hi[0, :] = -1.0
    lo = torch.rand((6, d), generator=gen) - 0.5
    batch = torch.cat([hi, lo, _anchor(d)])
    try:
        y = _linear(batch, _pack(codes)).double()
    except RuntimeError:
        return False
    c = codes.double()
    exact_hi = hi.double() @ c.T
    exact_lo = lo.double() @ c.T
    step = c.abs().sum(1) / GRID  # one step per element
    return bool(torch.equal(y[:6], exact_hi) and ((y[6:12] - exact_lo).abs() <= step).all())


def _normalised(block: np.ndarray, inv: torch.Tensor) -> torch.Tensor:
    """float32 rows * 1/|row| of a block of the read-only float16 map (torch only reads it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(np.asarray(block))
    return src.float().mul_(inv[:, None])


class Int8Codes:
    """One leaf's int8 codes, packed (see the module docstring)."""

    def __init__(self, leaf: Leaf) -> None:
        n, d = leaf.rows, leaf.dim
        inv = torch.from_numpy(leaf.inv_norms())
        mx = torch.zeros(d)
        for start, block in leaf.blocks(PACK_ROWS):
            xn = _normalised(block, inv[start:start + len(block)])
            torch.maximum(mx, xn.abs().amax(0), out=mx)
        m = min(FLOAT_DIMS, max(d - 2, 0))  # the anchor needs two coded dimensions
        self.flt = torch.sort(torch.topk(mx, m).indices).values
        keep = torch.ones(d, dtype=torch.bool)
        keep[self.flt] = False
        self.coded = torch.nonzero(keep).flatten()
        self.step = (mx[self.coded] / 127).clamp_min(1e-30)
        # per row: float dims, rr, l1, 1 (the bound's terms times the query's, in one addmm)
        self.z = torch.empty((m + 3, n))
        self.z[m + 2] = 1.0
        self.packs: list[tuple[int, int, object]] = []
        for start, block in leaf.blocks(PACK_ROWS):
            stop = start + len(block)
            xn = _normalised(block, inv[start:stop])
            xr = xn[:, self.coded]
            c = torch.round(xr / self.step).clamp_(-127, 127)
            res = xr - c * self.step
            self.z[:m, start:stop] = xn[:, self.flt].T
            # (1 + 1e-5) and 2^-22: the float32 rounding of res and of its norm
            self.z[m, start:stop] = torch.linalg.vector_norm(res, dim=1) * (1 + 1e-5) + 2.0 ** -22
            self.z[m + 1, start:stop] = c.abs().sum(1)
            self.packs.append((start, stop, _pack(c.to(torch.int8))))

    def bounds(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel's batch [hi; lo; anchor], its [2Q, 2Q + 1] combination (approx from its
        output) and the [2Q, m + 3] weights of z (float dims and bounds): lower rows first."""
        nq, dim = queries.shape
        qr = queries[:, self.coded]
        v = qr * self.step
        top = v.abs().amax(1)
        g = torch.where(top > 0, torch.exp2(torch.floor(torch.log2((GRID - 1) / GRID / top.clamp_min(1e-38)))), 1.0)
        v = v * g[:, None]  # a power of two: exact
        hi = torch.round(v * GRID) / GRID
        lo = (v - hi) * GRID  # exact (v - hi is a float32 below 2^-7), in [-0.5, 0.5]
        batch = torch.cat([hi, lo, _anchor(len(self.coded))])
        inv_g = 1 / g
        comb = torch.zeros(2 * nq, 2 * nq + 1)
        ar = torch.arange(nq)
        for half in (0, nq):
            comb[half + ar, ar] = inv_g
            comb[half + ar, nq + ar] = inv_g / GRID
        gamma = dim * F32_U / (1 - dim * F32_U)
        qn = torch.linalg.vector_norm(queries, dim=1)
        # the re-rank's float32 rounding (2 gamma |q|, as _outside_bound) and approx's own (~2^-20)
        eps = 2 * gamma * qn + 2.0 ** -16
        err = torch.stack([torch.linalg.vector_norm(qr, dim=1), inv_g / (GRID * GRID), eps], dim=1)
        qf = queries[:, self.flt]
        wz = torch.cat([torch.cat([qf, -err], 1), torch.cat([qf, err], 1)])
        return batch, comb, wz

    def _pieces(self, queries: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, [2Q, stop - start] lower then upper bounds of the cosines) per packed piece."""
        batch, comb, wz = self.bounds(queries)
        for start, stop, packed in self.packs:
            yield start, stop, torch.addmm(torch.mm(comb, _linear(batch, packed)), wz, self.z[:, start:stop])

    def interval(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[Q, n] lower and upper bounds of every row's float32 cosine (for tests)."""
        nq = queries.shape[0]
        lu = torch.cat([p for _s, _e, p in self._pieces(queries)], dim=1)
        return lu[:nq], lu[nq:]

    def candidates(self, queries: torch.Tensor, k: int, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query, row) pairs that may be in a query's top k (grouped by query), and per query
        whether it kept more than ``cap`` rows (left to the caller's other path)."""
        nq = queries.shape[0]
        kth = torch.full((nq, 0), -float("inf"))  # the running k best lower bounds
        got_q: list[torch.Tensor] = []
        got_r: list[torch.Tensor] = []
        got_u: list[torch.Tensor] = []
        for start, stop, lu in self._pieces(queries):
            low = torch.cat([kth, torch.topk(lu[:nq], min(k, stop - start), dim=1).values], dim=1)
            kth = torch.topk(low, min(k, low.shape[1]), dim=1).values
            live = kth[:, -1:] if kth.shape[1] >= k else torch.full((nq, 1), -float("inf"))
            qi, ri = (lu[nq:] >= live).nonzero(as_tuple=True)
            got_q.append(qi)
            got_r.append(ri + start)
            got_u.append(lu[nq:][qi, ri])
        final = kth[:, -1] if kth.shape[1] >= k else torch.full((nq,), -float("inf"))
        qq, rr, uu = torch.cat(got_q), torch.cat(got_r), torch.cat(got_u)
        ok = uu >= final[qq]  # the running k-th only rose: drop rows below the final one
        qq, rr = qq[ok], rr[ok]
        order = torch.sort(qq, stable=True).indices
        qq, rr = qq[order], rr[order]
        over = torch.bincount(qq, minlength=nq) > cap
        keep = ~over[qq]
        return qq[keep], rr[keep], over
