"""``bitquant eval`` as a user runs it: the command line in fresh processes, one after the
other, so that the first one meets an empty kernel cache (cold) and the next ones find
Triton's and torch's on-disk caches (warm). Prints, per run, the evaluation tokens/s and
the set-up seconds from the report (``tokens_per_second``, ``setup_seconds``), the
perplexity, the BOS convention and the wall time of the whole process.

    python bench/eval_cli.py embedded:smollm2-135m ./smollm2-ternary --runs 2 --max-tokens 16384

Runs from the source tree (no install needed: the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "tests" / "data" / "alice29.txt"
LAUNCH = ("import sys; sys.path.insert(0, %r); from source_tree import use_source_tree; use_source_tree(); "
          "from bitquant.cli.main import main; sys.argv[0] = 'bitquant'; main()")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--text", default=str(TEXT))
    args = p.parse_args()
    launch = LAUNCH % str(REPO / "bench")
    print(f"{'model':34s} {'run':>3s} {'tokens/s':>10s} {'setup s':>8s} {'perplexity':>10s} {'bos':>10s} {'process s':>9s}")
    for model in args.models:
        for run in range(1, args.runs + 1):
            began = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", launch, "eval", model, args.text, "--max-tokens",
                                   str(args.max_tokens), "--json"], capture_output=True, text=True)
            wall = time.perf_counter() - began
            if proc.returncode:
                print(f"{model[-34:]:34s} {run:>3d} failed: {proc.stderr.strip().splitlines()[-1][:200]}")
                continue
            d = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{model[-34:]:34s} {run:>3d} {d['tokens_per_second']:>10,.0f} {d['setup_seconds']:>8.3f} "
                  f"{d['perplexity']:>10.3f} {d['bos']:>10s} {wall:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
