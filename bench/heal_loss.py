"""heal's divergences on a GPU: the pure-torch chunked loop against liger-kernel's fused
``LigerFusedLinearJSD``, same inputs, same run. SmolLM2-135M's head shape (49,152 x 576),
32,768 rows (one heal micro-batch), under bf16 autocast with the dtypes heal has there
(the teacher's hidden states and head in bf16, the student's in float32):

    python bench/heal_loss.py                 # forward_kl, reverse_kl, jsd(0.5)
    python bench/heal_loss.py --rows 16384

For each divergence: the two losses and their relative difference, the relative difference
of the gradients (hidden states and head), milliseconds per forward and backward (median
of --reps after a warm-up) and the ratio, and peak memory above the inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import use_source_tree  # noqa: E402

use_source_tree()


def run(fn, h_s, w_s, h_t, w_t, div):
    h = h_s.detach().clone().requires_grad_(True)
    w = w_s.detach().clone().requires_grad_(True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(h, w, h_t, w_t, div)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return float(loss), h.grad.float(), w.grad.float(), peak


def timed(fn, args, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run(fn, *args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    from bitquant.training import loss

    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    try:
        import liger_kernel
        print("liger-kernel", getattr(liger_kernel, "__version__", "?"), flush=True)
    except ImportError as e:
        print("liger-kernel not importable:", e)
    g = torch.Generator(device="cuda").manual_seed(0)
    w_t = torch.randn(args.vocab, args.hidden, device="cuda", generator=g).mul_(0.05).to(torch.bfloat16)
    w_s = (w_t.float() + 0.01 * torch.randn(args.vocab, args.hidden, device="cuda", generator=g))
    h_t = torch.randn(args.rows, args.hidden, device="cuda", generator=g).to(torch.bfloat16) * 2
    h_s = (h_t.float() + 0.3 * torch.randn(args.rows, args.hidden, device="cuda", generator=g))  # float32, as heal's
    print(f"{'divergence':22s} {'chunked':>10s} {'fused':>10s} {'rel diff':>9s} {'grad h':>9s} {'grad W':>9s} "
          f"{'ms chunked':>10s} {'ms fused':>9s} {'speed-up':>8s} {'MiB c/f':>12s}", flush=True)
    for div in (loss.Divergence("forward_kl"), loss.Divergence("reverse_kl"), loss.Divergence("jsd", 0.5)):
        args_ = (h_s, w_s, h_t, w_t, div)
        lc, ghc, gwc, mc = run(lambda a, b, c, d, e: loss.chunked(a, b, c, d, e), *args_)
        try:
            lf, ghf, gwf, mf = run(lambda a, b, c, d, e: loss.fused(a, b, c, d, e), *args_)
        except Exception as e:  # reported, the others still run
            print(f"{div.label():22s} {lc:10.5f} fused failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        rel = abs(lf - lc) / abs(lc)
        gh = float((ghf - ghc).norm() / ghc.norm())
        gw = float((gwf - gwc).norm() / gwc.norm())
        tc = timed(lambda a, b, c, d, e: loss.chunked(a, b, c, d, e), args_, args.reps)
        tf = timed(lambda a, b, c, d, e: loss.fused(a, b, c, d, e), args_, args.reps)
        print(f"{div.label():22s} {lc:10.5f} {lf:10.5f} {rel:9.2e} {gh:9.2e} {gw:9.2e} {tc:10.1f} {tf:9.1f} "
              f"{tc / tf:8.2f} {mc / 2**20:6.0f}/{mf / 2**20:<6.0f}", flush=True)


if __name__ == "__main__":
    main()
