"""Packed W2A8 in Triton: per-token int8 activations times 2-bit ternary codes, read as
stored, accumulated in int32; and the per-token activation quantization in front of it.

The weights stay in bitquant's packed layout (:mod:`bitquant.packing`: uint8
``[out/4, in]``, byte ``r`` holding the codes + 1 of rows ``r``, ``r + out/4``,
``r + out/2`` and ``r + 3 out/4`` in bit pairs 0-1, 2-3, 4-5 and 6-7), so nothing is
unpacked in memory. Every product is taken with the fields (codes + 1, in {0, 1, 2}) and
the tokens' sums of x taken off afterwards, which spares the subtraction per weight.

- :func:`linear` (2 tokens or more): the tensor cores (``tl.dot``, int8 in, int32 out), with
  the weights as the first operand, so the products are [rows, tokens]: a few tokens fill
  the instruction's narrow side, and the unpacked fields feed it from registers. On the GPU
  a shift and a mask of a 32-bit register unpack a field of four bytes at once (PTX inline;
  the interpreter unpacks byte by byte). Decode (up to 16 tokens) splits the inner
  dimension over programs in one launch: each stores its int32 partial sums, and the last
  of a tile to finish adds them and applies the epilogue. Integer sums are exact in any
  order, so the result does not depend on the split.
- :func:`gemv` (one token, the quantization inside, one launch): no tensor cores; the codes
  read as 32-bit words, whose fields multiply four int8 activations at a time (PTX dp4a),
  and copied ahead of use through shared memory (``tl.range`` stages), so that enough
  bytes are in flight to read them at close to the memory's speed.

The epilogue applies the per-token activation scale, the matrix's ``weight_scale`` in the
runtime's convention (:class:`bitquant.runtime.TernaryLinear`: ``acc / act_scale * s``
(multiply) or ``acc / (act_scale * weight_scale)``) and the bias, and writes the caller's
dtype, rounding every operation as torch does (IEEE division, no fused multiply-add), so
that in float32 a layer gives the CPU runtime's and heal's student's numbers bit for bit.

:func:`quantize` is the runtime's activation quantization (:func:`bitquant.ternary.quantize_activations`:
``scale = 127 / max(max|x|, 1e-5)``, ``q = clamp(round_half_even(x * scale), -128, 127)``),
one program per token and done in float32 whatever ``x``'s dtype, with correctly rounded
division and no fused multiply-add, so that it gives the CPU runtime's float32 integers
exactly. The weight scale is read from device memory, never from the host: a forward pass
makes no host synchronisation, so it can be captured in a CUDA graph.

The tests run the kernels on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)
against the int32 reference; ``bench/w2a8_gpu.py`` measures them on a GPU and checks the
PTX paths, which the interpreter cannot run, exact there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:  # triton is optional: GPU machines have it; the tests install it for the interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


class Tiles(NamedTuple):
    """A launch of :func:`linear`: tokens, packed rows (each gives four output rows) and
    inner dimension per program, programs along the inner dimension, warps, pipeline stages."""

    m: int
    r: int
    k: int
    split: int = 1
    warps: int = 4
    stages: int = 3


def available() -> bool:
    """True when Triton is importable (a GPU, or ``TRITON_INTERPRET=1`` on the CPU)."""
    return triton is not None


if triton is not None:
    #: 1.5 * 2**23: adding and subtracting it rounds a float32 of magnitude below 2**22 to the
    #: nearest integer, ties to even (as torch.round), in plain IEEE arithmetic
    _ROUNDER = tl.constexpr(12582912.0)

    @triton.jit
    def _act_scale(amax):
        """127 / max(amax, 1e-5) as torch evaluates it: reciprocal, then times 127, each rounded."""
        return tl.div_rn(1.0, tl.maximum(amax, 1e-5)) * 127.0

    @triton.jit
    def _field(p, Q: tl.constexpr, ASM: tl.constexpr):
        """Field Q (bits 2Q, 2Q+1) of packed bytes ``p`` as int8 codes + 1, in {0, 1, 2}. On the
        GPU a shift and a mask of a 32-bit register unpack four bytes at once."""
        if ASM:
            if Q == 0:
                return tl.inline_asm_elementwise("and.b32 $0, $1, 0x03030303;", "=r,r", [p], dtype=tl.int8,
                                                 is_pure=True, pack=4)
            elif Q == 1:
                return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 2; and.b32 $0, t, 0x03030303; }",
                                                 "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
            elif Q == 2:
                return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x03030303; }",
                                                 "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 6; and.b32 $0, t, 0x03030303; }",
                                                 "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
        else:
            return ((p >> (2 * Q)) & 3).to(tl.int8)

    @triton.jit
    def _dot4(a, b, c, ASM: tl.constexpr):
        """c plus the sum of the four products of the signed bytes of int32 words a and b
        (PTX dp4a on the GPU; spelled out byte by byte under the interpreter)."""
        if ASM:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:
            for j in tl.static_range(4):
                c += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
            return c

    @triton.jit
    def _act_codes(x, scale):
        """clamp(round_half_even(x * scale), -128, 127) in float32 (launched without fp fusion,
        so x * scale is rounded before the rounding constant is added)."""
        v = (x * scale + _ROUNDER) - _ROUNDER
        return tl.minimum(tl.maximum(v, -128.0), 127.0)

    @triton.jit
    def _scaled(acc, xs, ws, MULTIPLY: tl.constexpr):
        """The runtime's conventions: acc / act_scale * s (multiply) or acc / (act_scale * weight_scale),
        with correctly rounded division as torch divides (Triton's ``/`` is PTX div.full, an
        approximation within 2 ulp, whose last bits 210 activation quantizers in a row amplify)."""
        if MULTIPLY:
            y = tl.div_rn(acc.to(tl.float32), xs) * ws
        else:
            y = tl.div_rn(acc.to(tl.float32), xs * ws)
        return y

    @triton.jit
    def _quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
        """One token (row) per program: its absmax scale and int8 codes; with ONE_PASS (the
        row fits one block) the row is read from memory once."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        if ONE_PASS:
            x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
            scale = _act_scale(tl.max(tl.abs(x), axis=0))
            tl.store(s_ptr + row, scale)
            tl.store(q_ptr + row * stride_qm + offs, _act_codes(x, scale).to(tl.int8), mask=offs < K)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                kk = k0 + offs
                x = tl.load(x_ptr + row * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = _act_scale(tl.max(amax, axis=0))
            tl.store(s_ptr + row, scale)
            for k0 in range(0, K, BLOCK):
                kk = k0 + offs
                x = tl.load(x_ptr + row * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
                tl.store(q_ptr + row * stride_qm + kk, _act_codes(x, scale).to(tl.int8), mask=kk < K)

    @triton.jit
    def _epilogue(acc, rm, rn, M, N, xs_ptr, ws_ptr, b_ptr, MULTIPLY: tl.constexpr, HAS_BIAS: tl.constexpr):
        """A tile of int32 sums [tokens rm, outputs rn] scaled (:func:`_scaled`), + bias."""
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=1.0)[:, None]
        y = _scaled(acc, xs, tl.load(ws_ptr), MULTIPLY)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        return y

    @triton.jit
    def _w2a8_kernel(x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr, part_ptr, count_ptr, M, R, K,
                     stride_xm, stride_xk, stride_wr, stride_wk, stride_om, stride_on,
                     SCALED: tl.constexpr, LAST: tl.constexpr, MULTIPLY: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, SPLIT: tl.constexpr):
        """out[m, q*R + r] = sum_k x[m, k] * (((w[r, k] >> 2q) & 3) - 1), q = 0..3, over the tile
        of packed rows r and tokens m this program owns and its share of k, scaled when SCALED.
        The weights are the tensor cores' first operand: each product is [rows, tokens] of
        (codes + 1) times x, less the tokens' sums of x, so a few tokens fill the narrow side
        of the instruction and the unpacked fields feed it from registers. With LAST (the
        inner dimension split over programs) each program stores its int32 partial sums in
        ``part`` ([split, 4, M, R]) and counts itself in ``count`` (one int32 per tile, zero
        between calls); the last of a tile to finish adds the parts in split order, applies
        the epilogue and sets its count back to zero, so a split product is still one launch."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_r = tl.cdiv(R, BLOCK_R)
        width = GROUP_M * num_r
        first_m = (pid // width) * GROUP_M
        group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group
        pid_r = (pid % width) // group
        span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K
        k_first = tl.program_id(1) * span
        k_end = tl.minimum(k_first + span, K)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        acc0 = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.int32)
        acc1 = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.int32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.int32)
        acc3 = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.int32)
        xsum = tl.zeros((1, BLOCK_M), dtype=tl.int32)
        for k0 in range(k_first, k_end, BLOCK_K):
            kk = k0 + rk
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None] * stride_xk,
                         mask=(rm[None, :] < M) & (kk[:, None] < k_end), other=0)
            p = tl.load(w_ptr + rr[:, None] * stride_wr + kk[None, :] * stride_wk,
                        mask=(rr[:, None] < R) & (kk[None, :] < k_end), other=0)
            xsum += tl.sum(xt.to(tl.int32), axis=0, keep_dims=True)
            acc0 += tl.dot(_field(p, 0, ASM), xt, out_dtype=tl.int32)
            acc1 += tl.dot(_field(p, 1, ASM), xt, out_dtype=tl.int32)
            acc2 += tl.dot(_field(p, 2, ASM), xt, out_dtype=tl.int32)
            acc3 += tl.dot(_field(p, 3, ASM), xt, out_dtype=tl.int32)
        mask = (rm[:, None] < M) & (rr[None, :] < R)
        base = out_ptr + rm[:, None] * stride_om + rr[None, :] * stride_on
        step = R * stride_on
        if LAST:
            part = part_ptr + rm[:, None] * R + rr[None, :]
            field = M * R
            share = 4 * field
            here = part + tl.program_id(1) * share
            tl.store(here, tl.trans(acc0 - xsum), mask=mask)
            tl.store(here + field, tl.trans(acc1 - xsum), mask=mask)
            tl.store(here + 2 * field, tl.trans(acc2 - xsum), mask=mask)
            tl.store(here + 3 * field, tl.trans(acc3 - xsum), mask=mask)
            tl.debug_barrier()  # every thread's parts are stored before the count says so
            done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT - 1:
                for q in tl.static_range(4):
                    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
                    for j in range(0, SPLIT):
                        acc += tl.load(part + j * share + q * field, mask=mask, other=0, cache_modifier=".cg")
                    _put(acc, base + q * step, mask, rm, rr + q * R, M, 4 * R, xs_ptr, ws_ptr, b_ptr, SCALED,
                         MULTIPLY, HAS_BIAS)
                tl.atomic_xchg(count_ptr + pid, 0)
        else:
            _store4(acc0 - xsum, acc1 - xsum, acc2 - xsum, acc3 - xsum, base, step, mask, rm, rr, M, R, xs_ptr,
                    ws_ptr, b_ptr, SCALED, MULTIPLY, HAS_BIAS)

    @triton.jit
    def _store4(acc0, acc1, acc2, acc3, base, step, mask, rm, rr, M, R, xs_ptr, ws_ptr, b_ptr,
                SCALED: tl.constexpr, MULTIPLY: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The four [rows, tokens] products stored as [tokens, rows]: scaled, or as int32."""
        for q in tl.static_range(4):
            if q == 0:
                acc = tl.trans(acc0)
            elif q == 1:
                acc = tl.trans(acc1)
            elif q == 2:
                acc = tl.trans(acc2)
            else:
                acc = tl.trans(acc3)
            _put(acc, base + q * step, mask, rm, rr + q * R, M, 4 * R, xs_ptr, ws_ptr, b_ptr, SCALED, MULTIPLY,
                 HAS_BIAS)

    @triton.jit
    def _put(acc, ptr, mask, rm, rn, M, N, xs_ptr, ws_ptr, b_ptr, SCALED: tl.constexpr, MULTIPLY: tl.constexpr,
             HAS_BIAS: tl.constexpr):
        """A tile of int32 sums [tokens rm, outputs rn] stored scaled (:func:`_epilogue`), or as int32."""
        if SCALED:
            tl.store(ptr, _epilogue(acc, rm, rn, M, N, xs_ptr, ws_ptr, b_ptr, MULTIPLY, HAS_BIAS), mask=mask)
        else:
            tl.store(ptr, acc, mask=mask)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr, R, KW, stride_wr, stride_xm, stride_om,
                     QUANT: tl.constexpr, MULTIPLY: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, STAGES: tl.constexpr):
        """Decode without tensor cores, on 32-bit words: ``w`` is the packed codes viewed as
        int32 [R, K/4], so a word holds four inner positions of four row groups, and a shift
        and a mask give field q of four positions as four bytes, which one dp4a multiplies
        with four int8 activations and adds; the sum of x is taken off at the end (code =
        field - 1). One token per program along axis 1, BLOCK_R packed rows (4 BLOCK_R
        outputs) per program along axis 0, the whole inner dimension. ``x`` is int8 viewed as
        int32 [M, K/4], or with QUANT float [M, K], quantized here (every program finds the
        same absmax and codes as _quant_kernel, reading the row from L2), so a layer is one
        launch."""
        rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rw = tl.arange(0, BLOCK_W)
        rj = tl.arange(0, 4)
        token = tl.program_id(1)
        x_ptr += token * stride_xm
        out_ptr += token * stride_om
        if QUANT:
            amax = tl.zeros((BLOCK_W, 4), dtype=tl.float32)
            for w0 in range(0, KW, BLOCK_W):
                ww = w0 + rw
                v = tl.load(x_ptr + ww[:, None] * 4 + rj[None, :], mask=ww[:, None] < KW, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            xs = _act_scale(tl.max(tl.max(amax, axis=1), axis=0))
        else:
            xs = tl.load(xs_ptr + token)
        acc0 = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.int32)
        acc1 = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.int32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.int32)
        acc3 = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.int32)
        xsum = tl.zeros((BLOCK_W,), dtype=tl.int32)
        for w0 in tl.range(0, KW, BLOCK_W, num_stages=STAGES):  # codes copied ahead, STAGES - 1 blocks
            ww = w0 + rw
            if QUANT:
                v = tl.load(x_ptr + ww[:, None] * 4 + rj[None, :], mask=ww[:, None] < KW, other=0.0).to(tl.float32)
                c = _act_codes(v, xs).to(tl.int32)
                xsum += tl.sum(c, axis=1)
                xw = tl.sum((c & 0xFF) << (8 * rj)[None, :], axis=1)  # four int8 codes in one word
            else:
                xw = tl.load(x_ptr + ww, mask=ww < KW, other=0)
                xsum = _dot4(xw, tl.full((BLOCK_W,), 0x01010101, tl.int32), xsum, ASM)
            p = tl.load(w_ptr + rr[:, None] * stride_wr + ww[None, :], mask=(rr[:, None] < R) & (ww[None, :] < KW),
                        other=0)
            xb = tl.broadcast_to(xw[None, :], (BLOCK_R, BLOCK_W))
            acc0 = _dot4(p & 0x03030303, xb, acc0, ASM)
            acc1 = _dot4((p >> 2) & 0x03030303, xb, acc1, ASM)
            acc2 = _dot4((p >> 4) & 0x03030303, xb, acc2, ASM)
            acc3 = _dot4((p >> 6) & 0x03030303, xb, acc3, ASM)
        total = tl.sum(xsum, axis=0)
        ws = tl.load(ws_ptr)
        for q in tl.static_range(4):
            if q == 0:
                acc = acc0
            elif q == 1:
                acc = acc1
            elif q == 2:
                acc = acc2
            else:
                acc = acc3
            rn = rr + q * R
            y = _scaled(tl.sum(acc, axis=1) - total, xs, ws, MULTIPLY)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + rn, mask=rr < R, other=0.0).to(tl.float32)
            tl.store(out_ptr + rn, y, mask=rr < R)


#: (device, split, tokens, packed rows, tiles) -> int32 parts and zeroed per-tile counts. Kept
#: for the process's life: a CUDA graph keeps the addresses it was captured with. One set per
#: shape serves every layer of that shape, as the kernels of a stream run one after another.
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, split: int, m: int, r: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), split, m, r, tiles)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.empty(split * 4 * m * r, dtype=torch.int32, device=device),
                            torch.zeros(tiles, dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("the W2A8 kernels need triton (pip install triton)")


def _weight_scale(weight_scale: torch.Tensor) -> torch.Tensor:
    """The one-element float32 scale the kernels read from device memory."""
    return weight_scale.reshape(-1)[:1].to(torch.float32)


def tiles_for(m: int, r: int, k: int) -> Tiles:
    """The launch for ``m`` tokens and ``r`` packed rows of inner dimension ``k``, from
    ``bench/w2a8_gpu.py --sweep`` on an H100 (docs/measurements.md): decode tiles of 16 tokens
    (``tl.dot``'s least) and 64 packed rows, the inner dimension split so that a program
    covers about 1k of it (within 4% of the best of 45 on the Llama-2-7B and 2B-4T shapes);
    prefill tiles of 64 tokens and 128 packed rows (the best of 32 on three shapes, within
    2.3% on the other two)."""
    if m <= 16:
        return Tiles(16, 64, 256, min(8, 1 << (-(-k // 1024) - 1).bit_length()))  # a power of two >= k / 1024
    return Tiles(64, 128, 128, 1, 8, 3)


def _launch(xq: torch.Tensor, packed: torch.Tensor, out: torch.Tensor, act_scale: torch.Tensor | None,
            weight_scale: torch.Tensor | None, multiply: bool, bias: torch.Tensor | None,
            tiles: Tiles | None) -> torch.Tensor:
    _need_triton()
    if xq.dtype != torch.int8 or packed.dtype != torch.uint8 or xq.dim() != 2 or xq.shape[1] != packed.shape[1]:
        raise ValueError(f"need int8 [M, K] activations and uint8 [N/4, K] codes, got {xq.dtype} {tuple(xq.shape)} "
                         f"and {packed.dtype} {tuple(packed.shape)}")
    m, k = xq.shape
    r = packed.shape[0]
    t = tiles or tiles_for(m, r, k)
    scaled = act_scale is not None
    grid = (triton.cdiv(m, t.m) * triton.cdiv(r, t.r), t.split)
    last = t.split > 1
    part, count = _workspace(xq.device, t.split, triton.cdiv(m, t.m) * t.m, r, grid[0]) if last else (out, out)
    _w2a8_kernel[grid](xq, packed, out, act_scale if scaled else out, weight_scale if scaled else out,
                       bias if bias is not None else out, part, count, m, r, k, xq.stride(0), xq.stride(1),
                       packed.stride(0), packed.stride(1), out.stride(0), out.stride(1), SCALED=scaled, LAST=last,
                       MULTIPLY=multiply, HAS_BIAS=bias is not None, ASM=xq.is_cuda, BLOCK_M=t.m, BLOCK_R=t.r,
                       BLOCK_K=t.k, GROUP_M=8, SPLIT=t.split, num_warps=t.warps, num_stages=t.stages,
                       enable_fp_fusion=False)  # the epilogue rounds as torch does: no fused multiply-add
    return out


#: the longest row :func:`quantize` reads once (longer rows: twice, a block at a time)
QUANT_ROW = 16384


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 activations of ``x`` [M, K] (any float dtype) and their float32
    scales [M]: :func:`bitquant.ternary.quantize_activations` in float32, in one kernel."""
    _need_triton()
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    block = min(QUANT_ROW, triton.next_power_of_2(k))
    if m:
        _quant_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block, ONE_PASS=k <= block,
                            num_warps=max(4, min(16, block // 512)), enable_fp_fusion=False)
    return q, scale


def matmul_int32(xq: torch.Tensor, packed: torch.Tensor, tiles: Tiles | None = None) -> torch.Tensor:
    """int32 ``xq @ codes.T`` for int8 ``xq`` [M, K] and packed ternary codes [N/4, K]."""
    out = torch.empty(xq.shape[0], 4 * packed.shape[0], dtype=torch.int32, device=xq.device)
    return _launch(xq, packed, out, None, None, False, None, tiles)


def linear(xq: torch.Tensor, act_scale: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
           multiply: bool, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
           tiles: Tiles | None = None) -> torch.Tensor:
    """``(xq @ codes.T) / act_scale * s`` (multiply) or ``/ (act_scale * weight_scale)``, plus
    ``bias``, in ``dtype``; ``act_scale`` per token ([M] or [M, 1]), ``weight_scale`` a
    one-element tensor on the device, as :class:`bitquant.runtime.TernaryLinear` holds it."""
    out = torch.empty(xq.shape[0], 4 * packed.shape[0], dtype=dtype, device=xq.device)
    scales = act_scale.reshape(-1).to(torch.float32).contiguous()
    return _launch(xq, packed, out, scales, _weight_scale(weight_scale), multiply, bias, tiles)


#: the most tokens :func:`gemv` takes (one program per token and tile)
GEMV_ROWS = 16
#: the most tokens :func:`forward` sends through :func:`gemv`: one; at 16 tokens the tiles
#: were faster on every shape measured (docs/measurements.md)
FORWARD_GEMV_ROWS = 1


class GemvTiles(NamedTuple):
    """A launch of :func:`gemv`: packed rows and 32-bit words of the inner dimension per
    program, warps, and pipeline stages (blocks of codes in flight)."""

    r: int
    w: int
    warps: int = 4
    stages: int = 4


def gemv_tiles(r: int, k: int) -> GemvTiles:
    """The gemv's launch for ``r`` packed rows of inner dimension ``k``, from a sweep of 72 on
    an H100 with the weights read from memory (``bench/w2a8_gpu.py --sweep --m 1``): within
    2% of the best on every Llama-2-7B and 2B-4T shape, the best on three."""
    return GemvTiles(8 if r >= 1536 else 4, 128 if k <= 4096 else 256, 4, 4)


def gemv(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, multiply: bool,
         bias: torch.Tensor | None = None, act_scale: torch.Tensor | None = None,
         tiles: tuple | None = None) -> torch.Tensor:
    """A few tokens through a ternary layer in one launch: ``x`` [M, K] float (quantized in
    the kernel) or int8 with its ``act_scale`` [M]; output [M, N] in ``x``'s float dtype
    (float32 for int8 input). ``K`` must be a multiple of 4 (the kernel reads words)."""
    _need_triton()
    if x.dim() != 2 or not 1 <= x.shape[0] <= GEMV_ROWS or x.shape[1] != packed.shape[1] or packed.dtype != torch.uint8:
        raise ValueError(f"need 1 to {GEMV_ROWS} tokens [M, K] and uint8 [N/4, K] codes, got {tuple(x.shape)} and "
                         f"{packed.dtype} {tuple(packed.shape)}")
    if not takes_words(packed):
        raise ValueError(f"the gemv reads 32-bit words: need contiguous codes with an inner dimension that is a "
                         f"multiple of 4, got {tuple(packed.shape)}")
    quant = x.dtype != torch.int8
    if x.stride(-1) != 1 or not (quant or (x.stride(0) % 4 == 0 and x.data_ptr() % 4 == 0)):
        x = x.clone(memory_format=torch.contiguous_format)  # int8 is read as 32-bit words: aligned
    m = x.shape[0]
    r, k = packed.shape
    out = torch.empty(m, 4 * r, dtype=x.dtype if quant else torch.float32, device=x.device)
    xs = out if quant else act_scale.reshape(-1).to(torch.float32).contiguous()  # quantized in the kernel: unused
    w = packed.view(torch.int32)
    xw = x if quant else x.view(torch.int32)
    t = GemvTiles(*tiles) if tiles else gemv_tiles(r, k)
    _gemv_kernel[(triton.cdiv(r, t.r), m)](xw, w, out, xs, _weight_scale(weight_scale), bias if bias is not None else out,
                                          r, k // 4, w.stride(0), xw.stride(0), out.stride(0), QUANT=quant,
                                          MULTIPLY=multiply, HAS_BIAS=bias is not None, ASM=x.is_cuda, BLOCK_R=t.r,
                                          BLOCK_W=t.w, STAGES=t.stages, num_warps=t.warps, enable_fp_fusion=False)
    return out


def takes_words(packed: torch.Tensor) -> bool:
    """True when :func:`gemv` can read ``packed`` as 32-bit words (true of every real model)."""
    return packed.shape[1] % 4 == 0 and packed.is_contiguous() and packed.data_ptr() % 4 == 0


def forward(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, multiply: bool,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """A ternary layer W1.58A8 on ``x`` [..., K]: quantize, multiply, scale; output in
    ``x``'s dtype. Up to :data:`FORWARD_GEMV_ROWS` tokens take :func:`gemv`, one launch."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if 1 <= x2.shape[0] <= FORWARD_GEMV_ROWS and takes_words(packed):
        y = gemv(x2, packed, weight_scale, multiply, bias)
    else:
        q, scale = quantize(x2)
        y = linear(q, scale, packed, weight_scale, multiply, bias, x.dtype)
    return y.reshape(*shape[:-1], y.shape[-1])


@torch.library.custom_op("bitquant::w2a8_forward", mutates_args=())
def forward_op(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, multiply: bool,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`forward` as one opaque operator, for ``torch.compile``: the compiler fuses what
    is around a ternary layer and calls these kernels as they are, without tracing them."""
    return forward(x, packed, weight_scale, multiply, bias)


@forward_op.register_fake
def _forward_shape(x, packed, weight_scale, multiply, bias=None):
    return x.new_empty(*x.shape[:-1], 4 * packed.shape[0])
