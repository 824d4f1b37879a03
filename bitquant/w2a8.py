"""A packed W2A8 matrix product in Triton: 2-bit ternary codes, read as stored, times
per-token int8 activations, accumulated in int32.

The weights stay in bitquant's packed layout (:mod:`bitquant.packing`: uint8
``[out/4, in]``, byte ``r`` holding the codes + 1 of rows ``r``, ``r + out/4``,
``r + out/2`` and ``r + 3 out/4`` in bit pairs 0-1, 2-3, 4-5 and 6-7). Each program reads
a tile of packed bytes once and unpacks it in registers into the four row tiles it holds,
so nothing is unpacked in memory and every weight byte crosses the memory bus once per
tile of tokens. The four int8 products go to the tensor cores (``tl.dot``, int32
accumulation) and the epilogue applies the per-token activation scale and the matrix's
``weight_scale`` in the runtime's convention (:class:`bitquant.runtime.TernaryLinear`):
``acc / act_scale * s`` (multiply) or ``acc / (act_scale * weight_scale)`` (bitlinear).

The integer part is exact, so the int32 result equals the CPU runtime's ``torch._int_mm``
bit for bit; the tests run it on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``) against an int32 reference. Speed is measured on a GPU by
``bench/w2a8_gpu.py``; until it measures better than the int8 path there, the runtime
does not use it.
"""

from __future__ import annotations

import torch

try:  # triton is optional: GPU machines have it; the tests install it for the interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def available() -> bool:
    """True when Triton is importable (a GPU, or ``TRITON_INTERPRET=1`` on the CPU)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _scaled(acc, xs, ws, MULTIPLY: tl.constexpr):
        """The runtime's conventions: acc / act_scale * s (multiply) or acc / (act_scale * weight_scale)."""
        if MULTIPLY:
            y = acc.to(tl.float32) / xs * ws
        else:
            y = acc.to(tl.float32) / (xs * ws)
        return y

    @triton.jit
    def _w2a8_kernel(x_ptr, w_ptr, out_ptr, xs_ptr, ws, M, R, K: tl.constexpr,
                     stride_xm, stride_xk, stride_wr, stride_wk, stride_om, stride_on,
                     SCALED: tl.constexpr, MULTIPLY: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[m, q*R + r] = sum_k x[m, k] * (((w[r, k] >> 2q) & 3) - 1), q = 0..3, for the
        tile of tokens m and packed rows r this program owns; scaled when SCALED."""
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            kk = kb * BLOCK_K + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
            # a padding byte of 0x55 holds code 0 in every field
            p = tl.load(w_ptr + rr[None, :] * stride_wr + kk[:, None] * stride_wk,
                        mask=(rr[None, :] < R) & (kk[:, None] < K), other=0x55).to(tl.int32)
            acc0 += tl.dot(x, ((p & 3) - 1).to(tl.int8), out_dtype=tl.int32)
            acc1 += tl.dot(x, (((p >> 2) & 3) - 1).to(tl.int8), out_dtype=tl.int32)
            acc2 += tl.dot(x, (((p >> 4) & 3) - 1).to(tl.int8), out_dtype=tl.int32)
            acc3 += tl.dot(x, (((p >> 6) & 3) - 1).to(tl.int8), out_dtype=tl.int32)
        mask = (rm[:, None] < M) & (rr[None, :] < R)
        base = out_ptr + rm[:, None] * stride_om + rr[None, :] * stride_on
        if SCALED:
            xs = tl.load(xs_ptr + rm, mask=rm < M, other=1.0)[:, None]
            tl.store(base, _scaled(acc0, xs, ws, MULTIPLY), mask=mask)
            tl.store(base + R * stride_on, _scaled(acc1, xs, ws, MULTIPLY), mask=mask)
            tl.store(base + 2 * R * stride_on, _scaled(acc2, xs, ws, MULTIPLY), mask=mask)
            tl.store(base + 3 * R * stride_on, _scaled(acc3, xs, ws, MULTIPLY), mask=mask)
        else:
            tl.store(base, acc0, mask=mask)
            tl.store(base + R * stride_on, acc1, mask=mask)
            tl.store(base + 2 * R * stride_on, acc2, mask=mask)
            tl.store(base + 3 * R * stride_on, acc3, mask=mask)


def _blocks(m: int) -> tuple[int, int, int]:
    """Tile sizes: 16 tokens for decode (M <= 16; tl.dot needs 16), larger tiles for prefill."""
    return (16, 64, 128) if m <= 16 else (64, 64, 64)


def _launch(xq: torch.Tensor, packed: torch.Tensor, out: torch.Tensor, act_scale: torch.Tensor | None,
            weight_scale: float, multiply: bool) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("the W2A8 kernel needs triton (pip install triton)")
    if xq.dtype != torch.int8 or packed.dtype != torch.uint8 or xq.shape[1] != packed.shape[1]:
        raise ValueError(f"need int8 [M, K] activations and uint8 [N/4, K] codes, got {xq.dtype} {tuple(xq.shape)} "
                         f"and {packed.dtype} {tuple(packed.shape)}")
    m, k = xq.shape
    r = packed.shape[0]
    bm, br, bk = _blocks(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(r, br))
    scales = act_scale if act_scale is not None else out  # unused when not scaled
    _w2a8_kernel[grid](xq, packed, out, scales, float(weight_scale), m, r, k,
                       xq.stride(0), xq.stride(1), packed.stride(0), packed.stride(1), out.stride(0), out.stride(1),
                       SCALED=act_scale is not None, MULTIPLY=multiply, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk)
    return out


def matmul_int32(xq: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """int32 ``xq @ codes.T`` for int8 ``xq`` [M, K] and packed ternary codes [N/4, K]."""
    out = torch.empty(xq.shape[0], 4 * packed.shape[0], dtype=torch.int32, device=xq.device)
    return _launch(xq, packed, out, None, 1.0, False)


def linear(xq: torch.Tensor, act_scale: torch.Tensor, packed: torch.Tensor, weight_scale: float,
           multiply: bool) -> torch.Tensor:
    """float32 ``(xq @ codes.T) / act_scale * s`` (multiply) or ``/ (act_scale * weight_scale)``,
    with ``act_scale`` per token ([M] or [M, 1]), as :class:`bitquant.runtime.TernaryLinear`."""
    out = torch.empty(xq.shape[0], 4 * packed.shape[0], dtype=torch.float32, device=xq.device)
    return _launch(xq, packed, out, act_scale.reshape(-1).float().contiguous(), weight_scale, multiply)
