"""heal's divergences on a GPU: the pure-torch chunked loop (each chunk eager, or each
chunk ``torch.compile``d as heal runs it on CUDA) against liger-kernel's fused
``LigerFusedLinearJSD``, same inputs, same run. SmolLM2-135M's head shape (49,152 x 576),
32,768 rows (one heal micro-batch), under bf16 autocast with the dtypes heal has there
(the teacher's hidden states and head in bf16, the student's in float32; the student's
head is not trained, as in heal's bundled recipe, unless --head-grad, as with
``train: [projections, norms, embeddings]``):

    python bench/heal_loss.py                 # forward_kl, reverse_kl, jsd(0.5)
    python bench/heal_loss.py --rows 16384 --head-grad

For each divergence: the losses and their relative difference to the eager chunks, the
relative difference of the gradients (hidden states; with --head-grad the head's too),
milliseconds per forward and backward (median of --reps after a warm-up) and the speed-up
over the eager chunks, and peak memory above the inputs.
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


HEAD_GRAD = [False]


def run(fn, h_s, w_s, h_t, w_t, div):
    h = h_s.detach().clone().requires_grad_(True)
    w = w_s.detach().clone().requires_grad_(HEAD_GRAD[0])
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(h, w, h_t, w_t, div)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return float(loss), h.grad.float(), None if w.grad is None else w.grad.float(), peak


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
    p.add_argument("--head-grad", action="store_true", help="train the student's head too")
    args = p.parse_args()
    HEAD_GRAD[0] = args.head_grad
    import os

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

    def chunks(compiled: bool):
        def fn(a, b, c, d, e):
            os.environ["BITQUANT_COMPILED_LOSS"] = "1" if compiled else "0"
            return loss.chunked(a, b, c, d, e)
        return fn

    variants = {"eager chunks": chunks(False), "compiled chunks": chunks(True),
                "liger fused": lambda a, b, c, d, e: loss.fused(a, b, c, d, e)}
    print(f"{'divergence':22s} {'variant':16s} {'loss':>10s} {'rel diff':>9s} {'grad h':>9s} {'grad W':>9s} "
          f"{'ms':>8s} {'speed-up':>8s} {'MiB':>6s}", flush=True)
    for div in (loss.Divergence("forward_kl"), loss.Divergence("reverse_kl"), loss.Divergence("jsd", 0.5)):
        args_ = (h_s, w_s, h_t, w_t, div)
        base = None
        for name, fn in variants.items():
            try:
                value, gh, gw, mem = run(fn, *args_)
                ms = timed(fn, args_, args.reps)
            except Exception as e:  # reported, the others still run
                print(f"{div.label():22s} {name:16s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            if base is None:
                base = (value, gh, ms, gw)
            rel = abs(value - base[0]) / abs(base[0])
            dg = float((gh - base[1]).norm() / base[1].norm())
            dw = "-" if gw is None else f"{float((gw - base[3]).norm() / base[3].norm()):.2e}"
            print(f"{div.label():22s} {name:16s} {value:10.5f} {rel:9.2e} {dg:9.2e} {dw:>9s} {ms:8.1f} "
                  f"{base[2] / ms:8.2f} {mem / 2**20:6.0f}", flush=True)
        if loss._COMPILED_FAILED:
            print("the compiled chunks failed:", loss._COMPILED_FAILED[0][:300])


if __name__ == "__main__":
    main()
