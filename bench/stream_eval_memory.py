"""Peak memory and wall time of evaluation on a Llama-2-7B-shaped checkpoint, streamed one
decoder block at a time, next to the in-memory path's estimate (which would not fit).

    python bench/stream_eval_memory.py /tmp/llama2-7b     # writes the checkpoint first if missing (13.5 GB)
    python bench/stream_eval_memory.py /tmp/llama2-7b /tmp/qwen2-1.5b   # a 32k and a 152k vocabulary, one run

Each command runs in its own process; its peak RSS is the kernel's (wait4's rusage of
that child). The text is the first --tokens tokens of tests/data/alice29.txt.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "tests" / "data" / "alice29.txt"


def run(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GiB, last line of stdout) of one command in a child process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed: {stderr.strip().splitlines()[-1]}")
    return wall, usage.ru_maxrss / 2**20, stdout.strip().splitlines()[-1] if stdout.strip() else ""


def measure(ckpt: Path, tokens: int) -> list[tuple[str, float, float, float]]:
    """(command, wall s, peak RSS GiB, in-memory weights GiB) of the three streamed commands on one checkpoint."""
    out = Path(str(ckpt) + "-ternary")
    if not (out / "report.json").is_file():
        subprocess.run(["bitquant", "convert", str(ckpt), "-o", str(out), "--force"], check=True, capture_output=True)
    import torch

    from bitquant.streaming import model_bytes

    fp_est = model_bytes(ckpt, torch.float32) / 2**30
    tq_est = model_bytes(out, torch.float32) / 2**30
    n = str(tokens)
    rows = []
    for label, cmd, estimate in [
        ("eval, ternary W1.58A8, streamed", ["bitquant", "eval", str(out), str(TEXT), "--max-tokens", n, "--stream", "--json"], tq_est),
        ("eval, FP (float32), streamed", ["bitquant", "eval", str(ckpt), str(TEXT), "--max-tokens", n, "--stream", "--json"], fp_est),
        ("convert --eval-text (FP vs ternary), streamed", ["bitquant", "convert", str(ckpt), "-o", "/tmp/bq-eval-bench", "--force",
          "--eval-text", str(TEXT), "--eval-max-tokens", n, "--stream", "--json"], fp_est + tq_est),
    ]:
        wall, peak, last = run(cmd)
        rows.append((label, wall, peak, estimate))
        print(f"{ckpt.name}: {label:48s} wall {wall:7.1f} s  peak RSS {peak:5.2f} GiB  "
              f"(in memory: about {estimate:.1f} GiB of weights)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", type=Path, nargs="+", help="folders; a missing one is written first (llama2-7b shape, "
                   "or the preset its name starts with)")
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args()
    table = []
    for ckpt in args.checkpoints:
        if not (ckpt / "config.json").is_file():
            preset = next((k for k in ("qwen2-1.5b", "qwen3-8b", "tinyllama-1b") if ckpt.name.startswith(k)), "llama2-7b")
            subprocess.run([sys.executable, str(REPO / "bench" / "make_checkpoint.py"), preset, str(ckpt)], check=True)
        table += [(ckpt.name, *row) for row in measure(ckpt, args.tokens)]
    print()
    print("| checkpoint | command | wall | peak RSS | in-memory path's weights alone |")
    print("|---|---|---|---|---|")
    for name, label, wall, peak, estimate in table:
        print(f"| {name} | {label} | {wall:.0f} s | {peak:.2f} GiB | {estimate:.1f} GiB |")


if __name__ == "__main__":
    main()
