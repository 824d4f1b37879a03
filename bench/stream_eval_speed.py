"""Streamed (one decoder block at a time) against in-memory evaluation on SmolLM2-135M:
time and the numbers each gives, in one run.

    python bench/stream_eval_speed.py            # 16,384 tokens of tests/data/alice29.txt, windows of 512

Models: the FP source, `absmean-middle` (layers 10-11 ternary, well conditioned) and full
`absmean` (chaotic: a change in summation order moves its logits), converted first into
/tmp if missing. Each pair runs in this process, in-memory first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "tests" / "data" / "alice29.txt"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args()
    from bitquant import embedded, evaluate
    from bitquant.convert import convert
    from bitquant.evaluate import EvalSettings
    from bitquant.recipe import load_recipe

    source = embedded.materialize("smollm2-135m")
    models = {"FP16 source": source}
    for name in ("absmean-middle", "absmean"):
        out = Path(f"/tmp/bq-smollm2-{name}")
        if not (out / "report.json").is_file():
            convert(str(source), out, recipe=load_recipe(name), force=True)
        models[name] = out
    rows = []
    for label, folder in models.items():
        results = {}
        for stream in (False, True):
            started = time.perf_counter()
            r = evaluate.evaluate(str(folder), TEXT, settings=EvalSettings(max_tokens=args.tokens, device="cpu", stream=stream))
            results[stream] = (r.perplexity, time.perf_counter() - started)
        (ppl_m, t_m), (ppl_s, t_s) = results[False], results[True]
        rows.append((label, ppl_m, ppl_s, abs(ppl_s - ppl_m) / ppl_m, t_m, t_s))
        print(rows[-1], flush=True)
    print()
    print("| model | perplexity in memory | streamed | relative difference | time in memory | streamed | ratio |")
    print("|---|---|---|---|---|---|---|")
    for label, pm, ps, diff, tm, ts in rows:
        print(f"| {label} | {pm:.6g} | {ps:.6g} | {diff:.2e} | {tm:.1f} s | {ts:.1f} s | {ts / tm:.2f} |")


if __name__ == "__main__":
    main()
