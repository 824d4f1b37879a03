"""Peak memory and wall time of evaluation on a Llama-2-7B-shaped checkpoint, streamed one
decoder block at a time, next to the in-memory path's estimate (which would not fit).

    python bench/stream_eval_memory.py /tmp/llama2-7b     # writes the checkpoint first if missing (13.5 GB)

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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args()
    ckpt, out = args.checkpoint, Path(str(args.checkpoint) + "-ternary")
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "bench" / "make_checkpoint.py"), "llama2-7b", str(ckpt)], check=True)
    if not (out / "report.json").is_file():
        subprocess.run(["bitquant", "convert", str(ckpt), "-o", str(out)], check=True, capture_output=True)
    import torch

    from bitquant.streaming import model_bytes

    fp_est = model_bytes(ckpt, torch.float32) / 2**30
    tq_est = model_bytes(out, torch.float32) / 2**30
    n = str(args.tokens)
    rows = []
    for label, cmd, estimate in [
        ("eval, ternary W1.58A8, streamed", ["bitquant", "eval", str(out), str(TEXT), "--max-tokens", n, "--stream", "--json"], tq_est),
        ("eval, FP (float32), streamed", ["bitquant", "eval", str(ckpt), str(TEXT), "--max-tokens", n, "--stream", "--json"], fp_est),
        ("convert --eval-text (FP vs ternary), streamed", ["bitquant", "convert", str(ckpt), "-o", "/tmp/bq-7b-eval", "--force",
          "--eval-text", str(TEXT), "--eval-max-tokens", n, "--stream", "--json"], fp_est + tq_est),
    ]:
        wall, peak, last = run(cmd)
        rows.append((label, wall, peak, estimate))
        print(f"{label:48s} wall {wall:7.1f} s  peak RSS {peak:5.2f} GiB  (in memory: about {estimate:.1f} GiB of weights)", flush=True)
    print()
    print("| command | wall | peak RSS | in-memory path's weights alone |")
    print("|---|---|---|---|")
    for label, wall, peak, estimate in rows:
        print(f"| {label} | {wall:.0f} s | {peak:.2f} GiB | {estimate:.1f} GiB |")


if __name__ == "__main__":
    main()
