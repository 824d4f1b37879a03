"""The packed W2A8 kernels (bitquant/w2a8.py) against bf16 cuBLAS, the int8 path
(torch._int_mm on unpacked codes) and the libraries (gemlite's A8W158, torchao's int8
dynamic-activation path), on one GPU, in one run.

    python bench/w2a8_gpu.py                 # Llama-2-7B and BitNet 2B-4T projection shapes
    python bench/w2a8_gpu.py --m 1 16 8192
    python bench/w2a8_gpu.py --sweep         # time every tile configuration, print the best
    python bench/w2a8_gpu.py --warm          # weights reused from call to call (L2-resident)

Every variant is timed the same way: captured in a CUDA graph and replayed (Triton's
do_bench_cudagraph), so Python's launch overhead counts for none of them, as in a decode
step run from a graph. Each replay cycles through copies of the weights that together
exceed twice the L2 cache, so every call reads its weights from memory, as each layer of a
model does (a 4096 x 4096 ternary matrix is 4 MB: called again and again on one copy it
would stay in the 50 MB L2); --warm reuses one copy. The libraries are timed on one copy.

Columns: microseconds of each variant, on int8 activations ("gemv": the dp4a kernel, up
to 16 tokens, which the runtime sends one token; "tiles": the tensor-core kernel, which
the runtime uses from 2 tokens; "int8mm" and "int8 TN": torch._int_mm on unpacked codes
stored [K, N] row-major, as the runtime did, and column-major), "quant" (the activation
quantization alone) and "fused" (the whole layer from bf16 activations as the runtime
runs it, quantization included); "kern x" (the
runtime's kernel for that many tokens) and "fused x" are bf16's time over theirs (above 1:
faster than bf16); "x floor" is the fused layer's time over the memory-bandwidth floor
(packed weights, bf16 activations in and out, int8 activations written and read, at the
card's nominal bandwidth). Every output is checked first: the int32 product exactly
equals the reference, and the fused layer is within 1e-6 (relative) of the same
arithmetic done by torch in float32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import use_source_tree  # noqa: E402

use_source_tree()

from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from bitquant import w2a8  # noqa: E402
from bitquant.packing import pack_ternary  # noqa: E402
from bitquant.ternary import quantize_activations  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (2560, 6912), (6912, 2560)]  # [out, in]
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, nominal HBM
# the alternatives each replaced (tokens as the first operand, fields unpacked a byte at a
# time, a split added by atomics and a second kernel, a gemv on bytes) were swept against
# these at commit 7810710; docs/measurements.md has that table
DECODE_SWEEP = ([w2a8.Tiles(16, r, k, sp) for r in (16, 32, 64) for k in (128, 256, 512) for sp in (1, 2, 4, 8, 16)]
                + [w2a8.Tiles(16, r, 1024, sp) for r in (32, 64) for sp in (1, 2, 4, 8)]
                + [w2a8.Tiles(16, 64, k, sp, 8, st) for k in (256, 512) for sp in (2, 4, 8) for st in (2, 3)])
GEMV_SWEEP = [w2a8.GemvTiles(r, w, nw, st) for r in (4, 8, 16) for w in (64, 128, 256, 512) for nw in (4, 8)
              for st in (1, 3, 4)]
PREFILL_SWEEP = [w2a8.Tiles(bm, r, k, 1, nw, st) for bm in (64, 128) for r in (64, 128) for k in (64, 128)
                 for nw, st in ((4, 3), (4, 4), (8, 3), (8, 4))]


def safe(fn) -> float:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a library that fails is reported, not fatal
        print(f"  {type(e).__name__}: {str(e)[:100]}", flush=True)
        return float("nan")


ONE = None  # a unit weight scale on the GPU, set in main()
WARM = False  # --warm: one copy of the weights, reused


def us(fn) -> float:
    """Microseconds per call, from CUDA-graph replays."""
    return do_bench_cudagraph(fn, rep=20) * 1e3


def copies(w: torch.Tensor) -> list[torch.Tensor]:
    """``w`` and enough copies of it that together they exceed twice the L2: cycling through
    them leaves none there."""
    if WARM:
        return [w]
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    n = -(-2 * l2 // (w.numel() * w.element_size()))
    return [w] + [w.clone() for _ in range(n - 1)]


def us_each(fn, weights: list[torch.Tensor]) -> float:
    """Microseconds per call of ``fn(w)``, each replay calling it once on every copy in ``weights``."""
    return do_bench_cudagraph(lambda: [fn(w) for w in weights], rep=20) * 1e3 / len(weights)


def gemlite_layer(codes: torch.Tensor, scale: float):
    try:
        from gemlite.helper import A8W158_INT_dynamic

        return A8W158_INT_dynamic(device="cuda:0", dtype=torch.bfloat16).from_weights(
            codes.to(torch.bfloat16), torch.tensor(scale))
    except Exception as e:  # noqa: BLE001 - a library that is absent or fails is reported, not fatal
        print(f"  gemlite unavailable: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None


def torchao_layer(w: torch.Tensor):
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16, device="cuda")
        lin.weight.data.copy_(w)
        quantize_(lin, Int8DynamicActivationInt8WeightConfig())
        return lin
    except Exception as e:  # noqa: BLE001
        print(f"  torchao unavailable: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None


def reference(xq, codes) -> torch.Tensor:
    """The int32 product ``xq @ codes.T`` by torch: int8 GEMM for prefill, float64 for a few
    tokens (exact: every sum is below 2**53)."""
    if xq.shape[0] > 16:
        return torch._int_mm(xq, codes.t().contiguous())
    return (xq.double() @ codes.double().T).to(torch.int32)


def check(xq, packed, codes, x, ws) -> None:
    assert torch.equal(w2a8.matmul_int32(xq, packed), reference(xq, codes)), "int32 product differs from the reference"
    q, s = quantize_activations(x.float())
    assert torch.equal(w2a8.quantize(x)[0], q.to(torch.int8)), "activation codes differ from quantize_activations"
    ref = (q @ codes.float().T) / s * ws  # the runtime's float32 arithmetic
    got = w2a8.linear(xq, w2a8.quantize(x)[1], packed, ws, True)
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < 1e-6, f"scaled float32 output differs by {err:.2e}"
    one = w2a8.gemv(xq[:1], packed, ws, True, act_scale=w2a8.quantize(x[:1])[1])
    assert torch.equal(one, got[:1]), "gemv differs from the tiled kernel"
    err_bf16 = float((w2a8.forward(x, packed, ws, True).float() - ref).abs().max() / ref.abs().max())
    assert err_bf16 < 8e-3, f"bf16 output differs by {err_bf16:.2e}"  # bf16's rounding: 2^-8


def sweep(n, k, m, packs, xq, s, ws, x, want) -> None:
    """Time every configuration (each checked exact first) and print the four fastest."""
    def best(label, configs, run):
        rows = []
        for t in configs:
            try:
                got = run(t, packs[0])
                if not torch.equal(got.to(torch.int32) if got.dtype != torch.int32 else got, want):
                    print(f"    {t}: WRONG", flush=True)
                    continue
                t_us = us_each(lambda p, t=t: run(t, p), packs)
                if not torch.equal(run(t, packs[-1]).to(torch.int32), want):  # again, after hundreds of runs
                    print(f"    {t}: WRONG after timing", flush=True)
                    continue
                rows.append((t_us, t))
            except Exception as e:  # noqa: BLE001 - out of shared memory, registers etc.
                print(f"    {t}: {type(e).__name__}: {str(e)[:80]}", flush=True)
        rows.sort(key=lambda row: row[0])
        print(f"  sweep {label} {n}x{k} M={m}: " + "; ".join(f"{t_us:.1f} us {tuple(t)}" for t_us, t in rows[:5]),
              flush=True)
        return rows

    ones_m = torch.ones(m, device="cuda")
    if m == 1:  # the runtime's one-token path; more tokens take the tiles
        best("gemv", GEMV_SWEEP, lambda t, p: w2a8.gemv(xq, p, ONE, True, act_scale=ones_m, tiles=t))
        fused = []
        for t in GEMV_SWEEP:  # with the quantization in the kernel, as the runtime runs one token
            fused.append((us_each(lambda p, t=t: w2a8.gemv(x, p, ws, True, tiles=t), packs), t))
        fused.sort(key=lambda row: row[0])
        print(f"  sweep gemv fused {n}x{k} M={m}: " + "; ".join(f"{a:.1f} us {t}" for a, t in fused[:5]), flush=True)
        return
    configs = DECODE_SWEEP if m <= 16 else PREFILL_SWEEP
    configs = [t for t in configs if not (t.split > 1 and k // t.split < t.k)]
    best("tiles", configs, lambda t, p: w2a8.matmul_int32(xq, p, t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 8192])
    ap.add_argument("--sweep", action="store_true", help="time every tile configuration of the kernel")
    ap.add_argument("--no-libraries", action="store_true", help="skip gemlite and torchao")
    ap.add_argument("--shapes", nargs="+", help="NxK shapes (default: the Llama-2-7B and 2B-4T ones)")
    ap.add_argument("--warm", action="store_true", help="reuse one copy of the weights (they may stay in L2)")
    args = ap.parse_args()
    global WARM
    WARM = args.warm
    name = torch.cuda.get_device_name()
    bandwidth = next((v for k, v in BANDWIDTH.items() if k in name), 3.35e12)
    print(f"{name}, torch {torch.__version__}, nominal bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"times in us from CUDA-graph replays, weights {'reused (warm)' if WARM else 'read from memory (cold)'}")
    print(f"{'N x K':>12s} {'M':>5s} {'bf16':>8s} {'int8mm':>8s} {'int8 TN':>8s} {'rt int8':>8s} {'tiles':>8s} {'gemv':>8s} {'quant':>7s} "
          f"{'fused':>8s} {'gemlite':>8s} {'torchao':>8s} {'kern x':>7s} {'fused x':>7s} {'x floor':>7s}", flush=True)
    global ONE
    ONE = torch.ones(1, device="cuda")
    print(f"one launch of a one-element kernel: {us(lambda: ONE.add_(0)):.1f} us (the floor of any kernel here)",
          flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in [tuple(map(int, t.split("x"))) for t in args.shapes] if args.shapes else SHAPES:
        codes = torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8, generator=g)
        packed = pack_ternary(codes)
        w_bf16 = codes.to(torch.bfloat16) * 0.02
        codes_t = codes.t().contiguous()
        packs, bf16s = copies(packed), copies(w_bf16)
        prefill = any(m > 16 for m in args.m)  # the int8 baselines run there only
        codes_ts, codes_tn = (copies(codes_t), copies(codes)) if prefill else ([], [])
        ws = torch.tensor([0.02], device="cuda")
        gem = None if args.no_libraries else gemlite_layer(codes, 0.02)
        tao = None if args.no_libraries else torchao_layer(w_bf16)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            xq, s = w2a8.quantize(x)
            if args.sweep:  # first: a configuration that fails to build is reported there, not fatal
                sweep(n, k, m, packs, xq, s, ws, x, reference(xq, codes))
            try:
                check(xq, packed, codes, x, ws)
            except Exception as e:  # noqa: BLE001 - reported, and the other shapes still run
                print(f"{n:>5d}x{k:<6d} {m:5d} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            t_bf16 = us_each(lambda w: x @ w.T, bf16s)
            nan = float("nan")
            t_int8 = us_each(lambda c: torch._int_mm(xq, c), codes_ts) if m > 16 else nan
            t_tn = safe(lambda: us_each(lambda c: torch._int_mm(xq, c.t()), codes_tn)) if m > 16 else nan

            def runtime_int8(c):  # the runtime's path before this kernel: torch quantization, _int_mm, scale
                q, sc = quantize_activations(x)
                return (torch._int_mm(q.to(torch.int8), c).to(x.dtype) / sc * 0.02)

            t_rt = us_each(runtime_int8, codes_ts) if m > 16 else nan
            t_tiles = us_each(lambda p: w2a8.linear(xq, s, p, ws, True, None, torch.bfloat16), packs)
            t_gemv = us_each(lambda p: w2a8.gemv(xq, p, ws, True, act_scale=s), packs) if m <= w2a8.GEMV_ROWS else nan
            t_w2a8 = t_gemv if m <= w2a8.FORWARD_GEMV_ROWS else t_tiles  # what the runtime runs
            t_quant = us(lambda: w2a8.quantize(x))
            t_fused = us_each(lambda p: w2a8.forward(x, p, ws, True), packs)
            t_gem = safe(lambda: us(lambda: gem(x))) if gem is not None else nan
            t_tao = safe(lambda: do_bench(lambda: tao(x), rep=20) * 1e3) if tao is not None else nan  # not capturable
            floor = (n * k / 4 + 2 * m * k + 2 * m * k + 2 * m * n) / bandwidth * 1e6
            print(f"{n:>5d}x{k:<6d} {m:5d} {t_bf16:8.1f} {t_int8:8.1f} {t_tn:8.1f} {t_rt:8.1f} {t_tiles:8.1f} {t_gemv:8.1f} {t_quant:7.1f} "
                  f"{t_fused:8.1f} {t_gem:8.1f} {t_tao:8.1f} {t_bf16 / t_w2a8:7.2f} {t_bf16 / t_fused:7.2f} "
                  f"{t_fused / floor:7.1f}", flush=True)


if __name__ == "__main__":
    main()
