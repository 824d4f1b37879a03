"""bitquant eval beside another PyTorch job on the same cores (a shared CI runner), with
and without dividing the cores between them.

    python bench/shared_runner.py          # SmolLM2-135M, 2,048 tokens of tests/data/alice29.txt

The neighbour multiplies 1024x1024 float32 matrices in a loop for as long as the
measurement runs. Tokens/s is bitquant eval's own figure (forward passes only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "tests" / "data" / "alice29.txt"
NEIGHBOUR = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a = (a @ a).clamp_(-1, 1)\n"


def evaluate(threads: int | None) -> float:
    args = ["bitquant", *(["--threads", str(threads)] if threads else []), "eval", "embedded:smollm2-135m", str(TEXT),
            "--max-tokens", "2048", "--json"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_second"]


def main() -> None:
    cores = os.cpu_count()
    rows = [("alone, all cores", evaluate(None))]
    for neighbour_threads, threads, label in ((None, None, "beside a neighbour, both on all cores"),
                                              (1, 1, "beside a neighbour on 1 core, bitquant --threads 1")):
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(neighbour_threads)} if neighbour_threads else {}))
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env)
        try:
            rows.append((label, evaluate(threads)))
        finally:
            neighbour.kill()
            neighbour.wait()
    print(f"{cores} cores")
    print("| run | tokens/s | vs alone |")
    print("|---|---|---|")
    for label, rate in rows:
        print(f"| {label} | {rate:,.0f} | {rate / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
