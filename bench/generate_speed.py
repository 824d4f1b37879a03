"""`bitquant generate` on SmolLM2-135M, FP16 source against its absmean ternary version
(W1.58A8 as deployed), in one run on the same machine: tokens/s of greedy decoding.

    python bench/generate_speed.py                       # CPU, 64 new tokens, 3 repeats
    python bench/generate_speed.py --device cuda --tokens 128

The ternary model is converted first (`bitquant convert embedded:smollm2-135m`) into a
temporary folder. Prints each model's median tokens/s and the ratio to the FP model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import use_source_tree  # noqa: E402

use_source_tree()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", default="The capital of France is")
    args = p.parse_args()

    import torch

    from bitquant.convert import convert
    from bitquant.generate import Sampling, run_generate
    from bitquant.source import resolve_source

    fp = str(resolve_source("embedded:smollm2-135m").path)
    with tempfile.TemporaryDirectory() as tmp:
        ternary = str(Path(tmp) / "ternary")
        convert(fp, ternary)
        sampling = Sampling(max_new_tokens=args.tokens)
        rows = []
        for label, model in (("FP16 source", fp), ("ternary W1.58A8", ternary)):
            runs = [run_generate(model, args.prompt, sampling, device=args.device) for _ in range(args.repeats)]
            rate = statistics.median(r.tokens_per_second for r in runs)
            rows.append((label, rate, len(runs[0].ids), runs[0].text))
    print(f"device {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"greedy, prompt {args.prompt!r}, median of {args.repeats}")
    base = rows[0][1]
    for label, rate, n, text in rows:
        print(f"{label:18s} {rate:8.1f} tokens/s ({rate / base:.2f}x FP)  {n} tokens: {text[:70]!r}")


if __name__ == "__main__":
    main()
