"""Conversion speed and memory: bitquant vs the I/O floor vs onebitllms, in one run.

On the same input, with the page cache warmed first for all of them:

  (a) the I/O floor: read every input byte, write as many bytes as bitquant's output
      (and fsync, as bitquant does), no compute;
  (b) `bitquant convert IN -o OUT`;
  (c) `onebitllms convert IN OUT` (onebitllms 0.0.4), when it is installed and the model
      fits in memory (it loads the whole model in bf16 and copies its state dict).

Each runs in its own process, ``--repeats`` times (default 2; the fastest run counts, the
same for every variant); peak RSS is that process's maximum resident set size. Prints a
table and the ratios bitquant/floor and bitquant/onebitllms.

    python bench/make_checkpoint.py llama2-7b /tmp/llama2-7b
    python bench/convert_speed.py /tmp/llama2-7b
    python bench/make_checkpoint.py qwen3-8b /tmp/qwen3-8b
    python bench/convert_speed.py /tmp/llama2-7b /tmp/qwen3-8b   # both shapes in one run, ratios to the first
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = """
import os, sys
files, out, nbytes = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
buf = bytearray(64 << 20)
view = memoryview(buf)
for name in files:
    with open(name, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
with open(out, "wb", buffering=0) as f:
    left = nbytes
    while left:
        n = min(left, len(buf))
        f.write(view[:n])
        left -= n
    os.fsync(f.fileno())
"""


def best(cmd: list[str], repeats: int, files: list[Path], cleanup: Path) -> tuple[float, int, int]:
    """Fastest of ``repeats`` warm-cache runs (and the largest peak RSS seen)."""
    results = []
    for _ in range(repeats):
        warm(files)
        results.append(run(cmd))
        if cleanup.is_dir():
            shutil.rmtree(cleanup)
        elif cleanup.exists():
            cleanup.unlink()
    return min(r[0] for r in results), max(r[1] for r in results), max(r[2] for r in results)


def run(cmd: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (bytes) and exit code of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"  {cmd[0]} ... exited {code}: {err.strip().splitlines()[-1] if err.strip() else ''}", file=sys.stderr)
    return wall, usage.ru_maxrss * 1024, code


def available_memory() -> int:
    """MemAvailable: free memory plus what the page cache can give back."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def warm(files: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def measure(src: Path, args) -> tuple[list[tuple[str, float, int]], int, int]:
    """The rows of one input: (variant, wall s, peak RSS), its input and output bytes."""
    files = sorted(src.glob("*.safetensors"))
    in_bytes = sum(f.stat().st_size for f in files)
    work = Path(tempfile.mkdtemp(prefix="bitquant-bench-", dir=args.work or src.parent))
    bitquant = [sys.executable, "-m", "bitquant.cli.main"]
    rows = []
    try:
        warm(files)
        run([*bitquant, "convert", str(src), "-o", str(work / "bitquant")])  # learns the output size
        out_bytes = sum(f.stat().st_size for f in (work / "bitquant").glob("*.safetensors"))
        shutil.rmtree(work / "bitquant")
        floor = [sys.executable, "-c", FLOOR, *map(str, files), str(work / "floor.bin"), str(out_bytes)]
        wall, rss, _ = best(floor, args.repeats, files, work / "floor.bin")
        rows.append(("I/O floor (read input, write output bytes)", wall, rss))
        wall, rss, _ = best([*bitquant, "convert", str(src), "-o", str(work / "bitquant")], args.repeats, files, work / "bitquant")
        rows.append(("bitquant convert", wall, rss))
        obl = shutil.which("onebitllms") or shutil.which("onebitllms", path=str(Path(sys.executable).parent))
        avail = available_memory()
        if args.skip_onebitllms or not obl:
            print("onebitllms: skipped" + ("" if obl else " (not installed: pip install onebitllms==0.0.4 triton)"))
        elif 2.2 * in_bytes > avail:  # the bf16 model plus a copy of its state dict
            print(f"onebitllms: skipped, needs about {2.2 * in_bytes / 2**30:.0f} GiB of memory")
        else:
            wall, rss, code = best([obl, "convert", str(src), str(work / "onebitllms")], args.repeats, files, work / "onebitllms")
            if code == 0:
                rows.append(("onebitllms 0.0.4 convert", wall, rss))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"input {src} ({in_bytes / 1e9:.2f} GB in {len(files)} files), output {out_bytes / 1e9:.2f} GB, "
          f"{os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'variant':44s} {'wall s':>8s} {'input GB/s':>11s} {'peak RSS MiB':>13s}")
    for label, wall, rss in rows:
        print(f"{label:44s} {wall:8.2f} {in_bytes / 1e9 / wall:11.2f} {rss / 2**20:13.0f}")
    by = {label.split(" ")[0]: (wall, rss) for label, wall, rss in rows}
    b_wall, b_rss = by["bitquant"]
    print(f"ratio bitquant / I/O floor, wall time: {b_wall / by['I/O'][0]:.2f}")
    if "onebitllms" in by:
        o_wall, o_rss = by["onebitllms"]
        print(f"ratio onebitllms / bitquant: wall time {o_wall / b_wall:.2f}x, peak RSS {o_rss / b_rss:.2f}x")
    return rows, in_bytes, out_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", type=Path, nargs="+", help="one or more inputs; the first is the baseline")
    ap.add_argument("--work", type=Path, default=None, help="where outputs go (default: beside the checkpoint)")
    ap.add_argument("--skip-onebitllms", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    results = []
    for src in args.checkpoints:
        rows, in_bytes, _ = measure(src, args)
        by = {label.split(" ")[0]: (wall, rss) for label, wall, rss in rows}
        results.append((src.name, in_bytes / 1e9 / by["bitquant"][0], by["bitquant"][1], by["bitquant"][0] / by["I/O"][0]))
        print()
    if len(results) > 1:
        base = results[0]
        print(f"{'input':24s} {'bitquant GB/s':>14s} {'x floor':>8s} {'peak RSS MiB':>13s} {'GB/s vs first':>14s}")
        for name, gbs, rss, floor in results:
            print(f"{name:24s} {gbs:14.2f} {floor:8.2f} {rss / 2**20:13.0f} {gbs / base[1]:14.2f}")


if __name__ == "__main__":
    main()
