"""Evaluation throughput: bitquant's ternary runtime vs the FP model vs transformers' BitLinear.

All variants run in one process on the same tokens and windows, so the ratios are
comparable even on a noisy machine. Each variant gets one warm-up window (which for
transformers' BitLinear includes its torch.compile step, timed separately).

    python bench/eval_speed.py                       # SmolLM2-135M, 2,048 tokens of alice29.txt
    python bench/eval_speed.py --model ./my-llama --tokens 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bitquant.convert import convert
from bitquant.evaluate import EvalSettings, token_nlls, tokenize_for
from bitquant.runtime import load_fp, load_ternary
from bitquant.source import resolve_source

REPO = Path(__file__).resolve().parent.parent


def timed(model, ids, context, repeats, batch=None):
    token_nlls(model, ids[: context + 1], context, context, "cpu")  # warm-up window
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        nll, forwarded = token_nlls(model, ids, context, context, "cpu", batch=batch)
        best = min(best, time.perf_counter() - start)
    return forwarded / best, float(torch.exp(nll.mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--text", default=str(REPO / "tests" / "data" / "alice29.txt"))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-context", type=int, default=128, help="also compare batching at this window length")
    args = ap.parse_args()

    src = resolve_source(args.model).path
    work = Path(tempfile.mkdtemp(prefix="bitquant-bench-"))
    try:
        out = work / "ternary"
        convert(str(src), out)
        ids = tokenize_for(src, args.text, EvalSettings(context=args.context, max_tokens=args.tokens)).ids
        rows = []
        for label, load in [
            ("FP model, float32 (bitquant eval default on CPU)", lambda: load_fp(src, torch.float32, "cpu")),
            ("FP model, float16", lambda: load_fp(src, torch.float16, "cpu")),
            ("bitquant ternary W1.58A8 (int8 kernel)", lambda: load_ternary(out, torch.float32, "cpu")),
            ("bitquant ternary weights-only", lambda: load_ternary(out, torch.float32, "cpu", act_quant=False)),
            ("transformers BitLinear, float32", lambda: _transformers(out)),
        ]:
            model = load()
            tps, ppl = timed(model, ids, args.context, args.repeats)
            rows.append((label, tps, ppl))
            del model
        batches = []  # batched windows (the default) against one window per forward pass, same run
        for label, load in [("FP model, float32", lambda: load_fp(src, torch.float32, "cpu")),
                            ("bitquant ternary W1.58A8", lambda: load_ternary(out, torch.float32, "cpu"))]:
            model = load()
            for context in sorted({args.context, args.batch_context}):
                one, ppl_one = timed(model, ids, context, args.repeats, batch=1)
                auto, ppl_auto = timed(model, ids, context, args.repeats)
                batches.append((f"{label}, windows of {context}", one, auto, ppl_one, ppl_auto))
            del model
        base = rows[0][1]
        ours = rows[2][1]
        print(f"model {args.model}, {len(ids)} tokens, context {args.context}, torch threads {torch.get_num_threads()}")
        print(f"{'variant':52s} {'tokens/s':>10s} {'vs FP32':>8s} {'perplexity':>12s}")
        for label, tps, ppl in rows:
            print(f"{label:52s} {tps:10.1f} {tps / base:8.2f} {ppl:12.4g}")
        print(f"ratio bitquant ternary / FP float32: {ours / base:.2f}")
        print(f"ratio bitquant ternary / FP float16: {ours / rows[1][1]:.2f}")
        print(f"ratio bitquant ternary / transformers BitLinear: {ours / rows[4][1]:.2f}")
        print(f"{'batched windows (default) vs one per pass':52s} {'one/s':>10s} {'batched/s':>10s} {'ratio':>6s} "
              f"{'ppl one':>10s} {'ppl batched':>12s}")
        for label, one, auto, p1, p2 in batches:
            print(f"{label:52s} {one:10.1f} {auto:10.1f} {auto / one:6.2f} {p1:10.6g} {p2:12.6g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _transformers(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


if __name__ == "__main__":
    main()
