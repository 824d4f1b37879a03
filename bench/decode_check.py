"""bitquant.decode on the GPU: each step's logits against the model's full forward pass
(a SmolLM2-shaped model with random weights, bf16), then sampling speed at a large batch.

    python bench/decode_check.py --batch 2048 --steps 64
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import use_source_tree  # noqa: E402

use_source_tree()


def main() -> None:
    faulthandler.enable()
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--length", type=int, default=512)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    from bitquant import decode
    from heal_speed import smollm2_config

    config = smollm2_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    got = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = decode.sample_batch(model, 8, 64, 1, 1.0, [2], g, on_step=lambda pos, l: got.__setitem__(pos, l.clone()))
    with torch.inference_mode():
        full = model(ids).logits.float()
    err = max(float((got[pos] - full[:, pos]).norm() / full[:, pos].norm()) for pos in got)
    print(f"step vs full-forward logits, bf16: max relative error {err:.2e}", flush=True)
    for batch in (args.batch // 4, args.batch):
        g = torch.Generator(device="cuda").manual_seed(1)
        torch.cuda.synchronize()
        began = time.perf_counter()
        decode.sample_batch(model, batch, args.length, 1, 1.0, [2], g)
        torch.cuda.synchronize()
        s = time.perf_counter() - began
        print(f"batch {batch} x {args.length}: {s:.2f} s, {batch * args.length / s:,.0f} tokens/s, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
