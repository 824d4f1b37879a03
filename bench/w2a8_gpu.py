"""The packed W2A8 Triton kernel (bitquant/w2a8.py) against bf16 cuBLAS and the runtime's
int8 path (torch._int_mm on unpacked codes), on one GPU, in one run.

    python bench/w2a8_gpu.py                 # Llama-2-7B and BitNet 2B-4T projection shapes
    python bench/w2a8_gpu.py --m 1 16 8192

For each shape [N, K] and token count M it prints the median time of each variant (CUDA
events, after warm-up), the ratio of bf16's time to each (above 1: faster than bf16), and
the kernel's time as a multiple of the memory-bandwidth floor (packed weights + int8
activations + float32 outputs, at the card's nominal bandwidth). "w2a8 + act quant" adds
the per-token int8 quantization of bf16 activations (bitquant.ternary.quantize_activations)
that a layer needs in front of the kernel. Every kernel output is checked first: exactly the
int32 reference before scaling.
"""

from __future__ import annotations

import argparse

import torch

from bitquant import w2a8
from bitquant.packing import pack_ternary
from bitquant.ternary import quantize_activations

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (2560, 6912), (6912, 2560)]  # [out, in]
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, nominal HBM


def timed(fn, repeats: int = 50) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs (CUDA events), after 5 warm-ups."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 8192])
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    bandwidth = next((v for k, v in BANDWIDTH.items() if k in name), 3.35e12)
    print(f"{name}, torch {torch.__version__}, nominal bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'N x K':>12s} {'M':>6s} {'bf16 us':>9s} {'int8 us':>9s} {'w2a8 us':>9s} {'+quant us':>10s} "
          f"{'x bf16':>7s} {'x bf16 +q':>9s} {'x floor':>8s}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in SHAPES:
        codes = torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8, generator=g)
        packed = pack_ternary(codes)
        w_bf16 = codes.to(torch.bfloat16) * 0.02
        codes_t = codes.t().contiguous()
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            q, scale = quantize_activations(x.float())
            xq = q.to(torch.int8)
            want = xq.to(torch.int32) @ codes.to(torch.int32).T if m <= 64 else torch._int_mm(xq, codes_t)
            assert torch.equal(w2a8.matmul_int32(xq, packed), want), (n, k, m)
            t_bf16 = timed(lambda: x @ w_bf16.T)
            t_int8 = timed(lambda: torch._int_mm(xq, codes_t)) if m > 16 else float("nan")
            t_w2a8 = timed(lambda: w2a8.linear(xq, scale, packed, 0.02, True))

            def with_quant():
                qq, ss = quantize_activations(x)
                return w2a8.linear(qq.to(torch.int8), ss, packed, 0.02, True)

            t_q = timed(with_quant)
            floor = (n * k / 4 + m * k + 4 * m * n) / bandwidth
            print(f"{n:>5d}x{k:<6d} {m:6d} {t_bf16 * 1e6:9.1f} {t_int8 * 1e6:9.1f} {t_w2a8 * 1e6:9.1f} "
                  f"{t_q * 1e6:10.1f} {t_bf16 / t_w2a8:7.2f} {t_bf16 / t_q:9.2f} {t_w2a8 / floor:8.1f}", flush=True)


if __name__ == "__main__":
    main()
