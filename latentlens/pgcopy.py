"""PostgreSQL binary COPY, encoded and decoded with numpy: no per-row Python.

pgvector-python's ``copy.write_row`` costs a Python call per row; for a
bulk load of millions of rows we lay out whole batches as numpy structured
arrays whose memory *is* the COPY wire format (big-endian fields, each
preceded by its int32 length), as pgvector's ``halfvec_recv``/``halfvec_send``
expect: int16 dim, int16 unused, then dim big-endian float16.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)

# numpy dtype code for each supported scalar PostgreSQL type
SCALARS = {"int2": ">i2", "int4": ">i4", "int8": ">i8", "float4": ">f4", "float8": ">f8"}


def _row_dtype(columns: Sequence[tuple[str, str]], dim: int | None, null: frozenset[str]) -> np.dtype:
    fields: list[tuple] = [("_nfields", ">i2")]
    for name, typ in columns:
        fields.append((f"_len_{name}", ">i4"))
        if name in null:
            continue
        if typ == "halfvec":
            assert dim is not None
            fields += [(f"_dim_{name}", ">i2"), (f"_unused_{name}", ">i2"), (name, ">f2", (dim,))]
        else:
            fields.append((name, SCALARS[typ]))
    return np.dtype(fields)


def _field_size(typ: str, dim: int | None) -> int:
    if typ == "halfvec":
        assert dim is not None
        return 4 + 2 * dim
    return np.dtype(SCALARS[typ]).itemsize


def encode_rows(
    columns: Sequence[tuple[str, str]],
    data: dict[str, np.ndarray],
    *,
    nullable: Sequence[str] = (),
) -> bytes:
    """Encode rows as binary COPY tuples (no header/trailer).

    ``columns`` is the COPY column list as (name, pg type); ``data`` maps each
    name to an array of length N (a [N, D] array for a halfvec). For names in
    ``nullable`` a negative value means NULL.
    """
    n = len(next(iter(data.values())))
    dim = None
    for name, typ in columns:
        if typ == "halfvec":
            dim = int(data[name].shape[1])
    null_mask = np.zeros(n, dtype=bool)
    for name in nullable:
        null_mask |= np.asarray(data[name]) < 0
    chunks = []
    for is_null in (False, True):
        sel = null_mask if is_null else ~null_mask
        count = int(sel.sum())
        if count == 0:
            continue
        null = frozenset(nullable) if is_null else frozenset()
        rows = np.zeros(count, dtype=_row_dtype(columns, dim, null))
        rows["_nfields"] = len(columns)
        for name, typ in columns:
            if name in null:
                rows[f"_len_{name}"] = -1
                continue
            rows[f"_len_{name}"] = _field_size(typ, dim)
            values = np.asarray(data[name])
            if count != n:  # avoid copying a whole [n, D] block when nothing is NULL
                values = values[sel]
            if typ == "halfvec":
                rows[f"_dim_{name}"] = dim
                rows[name] = values.astype(">f2")  # same dtype as the field: a plain copy
            else:
                rows[name] = values
        chunks.append(rows.tobytes())
    return b"".join(chunks)


def decode_rows(columns: Sequence[tuple[str, str]], payload: bytes | memoryview, dim: int | None = None) -> np.ndarray:
    """Decode binary COPY tuples of fixed-size, non-NULL columns (no header/trailer)."""
    dtype = _row_dtype(columns, dim, frozenset())
    return np.frombuffer(payload, dtype=dtype)


def row_size(columns: Sequence[tuple[str, str]], dim: int | None = None) -> int:
    return _row_dtype(columns, dim, frozenset()).itemsize


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise in float32 (hidden states of mid layers have norms in the
    thousands: casting to float16 first would overflow or lose the direction)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norms, np.float32(1e-12))
