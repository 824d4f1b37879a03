"""Fused absmean-ternarize-pack for FP16/BF16 weights (numba), tensor in, tensor out.

Same scale convention and codes as :mod:`bitquant.ternary` (s = max(mean|W|, eps) in
float32; code = clamp(round(W / s), -1, 1) with the division and round-half-to-even in
float32), in two passes over the 16-bit weights instead of about a dozen torch passes over
float32 copies. A 16-bit weight takes one of only 65,536 values, so:

1. pass one counts how often each value occurs (a histogram, per CPU core). Every sum the
   recipe and the report need (sum |W|, sum W^2, and, once s is known, the non-zero count
   and sum W*code) is then an exact float64 dot product over 65,536 bins: the scale is the
   float64 mean rounded to float32, independent of summation order and thread count;
2. the code of each value that occurs is computed once with numpy exactly as the recipe
   says (float32 W / s, round half to even, clamp), into one table; pass two then builds
   each packed byte from the four weights of rows r, R+r, 2R+r, 3R+r (transformers' row-block order, see :mod:`bitquant.packing`) with
   four table look-ups, shifts and ORs.

Rows are spread over the CPU's cores. Compiled on first use and cached on disk by numba.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bitquant.packing import pack_ternary, packed_shape
from bitquant.ternary import check_float, quantize_absmean, relative_error_from_sums

SUPPORTED = (torch.float16, torch.bfloat16)

_TABLES: dict[torch.dtype, np.ndarray] = {}
_KERNELS: tuple | None = None


@dataclass(frozen=True)
class PackedTernary:
    packed: torch.Tensor  # uint8 [out/4, in]
    scale: float  # s (float32 value)
    scale_clamped: bool
    zero_fraction: float
    relative_error: float
    copied: bool = False  # codes and scale taken from an already-ternary source, not computed


def available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _values(dtype: torch.dtype) -> np.ndarray:
    """float32 value of each of the 65,536 bit patterns of ``dtype``."""
    if dtype not in _TABLES:
        bits = np.arange(65536, dtype=np.uint32)
        if dtype == torch.float16:
            table = bits.astype(np.uint16).view(np.float16).astype(np.float32)
        else:  # bfloat16: the top half of a float32
            table = (bits << 16).view(np.float32)
        _TABLES[dtype] = np.ascontiguousarray(table)
    return _TABLES[dtype]


def _compile():
    global _KERNELS
    if _KERNELS is None:
        import numba
        from numba import njit, prange

        # numba's OpenMP layer and torch's OpenMP threads spin-wait against each other on
        # the same cores (measured: 23 ms instead of 3 ms per small matrix, 7B conversion
        # 11.6 s instead of 8.3 s). The workqueue layer does not; the kernels are only
        # ever launched from one thread at a time, which is all it requires.
        if numba.config.THREADING_LAYER == "default":
            numba.config.THREADING_LAYER = "workqueue"

        @njit(parallel=True, cache=True, nogil=True)
        def histogram(w, chunks):
            rows = w.shape[0]
            hist = np.zeros((chunks, 65536), dtype=np.int64)
            step = (rows + chunks - 1) // chunks
            for k in prange(chunks):
                h = hist[k]
                for r in range(k * step, min(rows, (k + 1) * step)):
                    row = w[r]
                    for c in range(row.shape[0]):
                        h[row[c]] += 1
            return hist.sum(axis=0)

        @njit(parallel=True, cache=True, nogil=True)
        def pack(w, table, packed):
            R, cols = packed.shape
            for r in prange(R):
                a, b, c, d, out = w[r], w[R + r], w[2 * R + r], w[3 * R + r], packed[r]
                for j in range(cols):
                    out[j] = table[a[j]] | (table[b[j]] << 2) | (table[c[j]] << 4) | (table[d[j]] << 6)

        _KERNELS = (histogram, pack)
    return _KERNELS


def code_table(values: np.ndarray, s: np.float32) -> np.ndarray:
    """int8 codes clamp(round(value / s), -1, 1) of float32 values, computed in float32."""
    return np.clip(np.round(values / s), -1, 1).astype(np.int8)


def quantize_pack(w: torch.Tensor, eps: float, name: str = "weight") -> PackedTernary:
    """Absmean-ternarize a 2-D matrix and pack it.

    FP16/BF16 go through the fused kernel when numba is installed; other float dtypes
    (and everything without numba) through the torch reference in :mod:`bitquant.ternary`.
    Both give the same codes, scale and statistics.
    """
    check_float(w, name)
    if w.dtype in SUPPORTED and available():
        return _fused(w, eps, name)
    t = quantize_absmean(w, eps=eps, name=name)
    return PackedTernary(pack_ternary(t.codes), t.scale, t.scale_clamped, t.zero_fraction, t.relative_error)


def _fused(w: torch.Tensor, eps: float, name: str) -> PackedTernary:
    from bitquant.errors import TensorError

    rows, cols = packed_shape(w.shape, name)
    histogram, pack = _compile()
    u16 = w.contiguous().view(torch.int16).numpy().view(np.uint16)
    hist = histogram(u16, max(1, torch.get_num_threads()))
    seen = np.nonzero(hist)[0]  # the bit patterns that occur (NaN/Inf ones only if present)
    count = hist[seen].astype(np.float64)
    v32 = _values(w.dtype)[seen]
    if not np.isfinite(v32).all():
        raise TensorError(f"tensor {name!r} contains NaN or Inf values; fix or re-export the checkpoint")
    v = v32.astype(np.float64)
    mean = float(count @ np.abs(v)) / w.numel()
    s = np.float32(max(np.float32(mean), np.float32(eps)))
    seen_codes = code_table(v32, s)
    table = np.ones(65536, dtype=np.uint8)  # stored code = code + 1; patterns that do not occur are never read
    table[seen] = (seen_codes + 1).astype(np.uint8)
    packed = np.empty((rows, cols), dtype=np.uint8)
    pack(u16, table, packed)
    c = seen_codes.astype(np.float64)
    nnz = float(count @ np.abs(c))
    wq = float(count @ (v * c))
    w2 = float(count @ (v * v))
    scale = float(s)
    return PackedTernary(
        packed=torch.from_numpy(packed),
        scale=scale,
        scale_clamped=bool(np.float32(mean) < np.float32(eps)),
        zero_fraction=1.0 - nnz / w.numel(),
        relative_error=relative_error_from_sums(w2, wq, nnz, scale),
    )
