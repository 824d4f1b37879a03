"""heal's report completions: the 32 prompts of ``bitquant.generate.PROMPTS`` in one
left-padded batch (what the report does) against one prompt at a time (what it did until
2026-12-08), on one model, in one run: seconds each way, their ratio, and how many prompts
got the same greedy tokens both ways.

    python bench/report_completions.py                              # SmolLM2-135M FP on the CPU
    python bench/report_completions.py --model ./smollm2-healed     # a heal output (W1.58A8)
    python bench/report_completions.py --device cuda

Measured on 2 CPU cores (docs/heal.md, the report's fields): SmolLM2 FP 86 s one at a time
against 8.3 s in one batch, the same tokens for all 32 prompts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heal_gpu import source_folder  # noqa: E402
from source_tree import use_source_tree  # noqa: E402

use_source_tree()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m", help="anything bitquant eval takes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per completion")
    args = p.parse_args()

    import torch

    from bitquant import runtime
    from bitquant.evaluate import EvalSettings
    from bitquant.generate import PROMPTS, completions, distinct_ngrams, one_at_a_time

    folder = Path(args.model) if Path(args.model).is_dir() else source_folder(args.model)
    model, mode = runtime.load_model(folder, EvalSettings().resolved_dtype(args.device), args.device)
    tokenizer = runtime.load_tokenizer(folder)

    def timed(fn):
        began = time.perf_counter()
        out = fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - began

    alone, t_alone = timed(lambda: one_at_a_time(model, tokenizer, PROMPTS, args.tokens))
    batched, t_batched = timed(lambda: completions(model, tokenizer, PROMPTS, args.tokens))
    same = sum(a.ids == b.ids for a, b in zip(alone, batched))
    print(f"{args.model} ({mode}) on {args.device}, {len(PROMPTS)} prompts x {args.tokens} tokens, greedy")
    print(f"one at a time   {t_alone:8.1f} s   distinct 4-grams {distinct_ngrams([g.ids for g in alone]):.4f}")
    print(f"one batch       {t_batched:8.1f} s   distinct 4-grams {distinct_ngrams([g.ids for g in batched]):.4f}")
    print(f"ratio           {t_alone / t_batched:8.2f}x  same tokens for {same} of {len(PROMPTS)} prompts")


if __name__ == "__main__":
    main()
