"""Calibrated conversion on a GPU: wall time, peak GPU and host memory, and a load check.

    python bench/make_checkpoint.py tinyllama-1b /tmp/tinyllama-synthetic
    python bench/cuda_convert_check.py /tmp/tinyllama-synthetic /tmp/tinyllama-gptq --config gptq

Prints one JSON object: seconds, peak CUDA memory allocated, peak resident host memory,
the calibration section's summary, and whether transformers loads the output (in a fresh
process that never imports bitquant) with finite logits.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bitquant.convert import convert
from bitquant.recipe import load_recipe

LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).to("cuda")
with torch.no_grad():
    logits = m(torch.arange(1, 65, device="cuda")[None]).logits.float()
kinds = sorted({type(mod).__name__ for n, mod in m.named_modules() if n.endswith("_proj")})
print(json.dumps({"finite": bool(torch.isfinite(logits).all()), "projection_classes": kinds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--config", default="gptq")
    ap.add_argument("--calib-tokens", type=int, default=None)
    args = ap.parse_args()
    recipe = load_recipe(args.config).replace(calib_tokens=args.calib_tokens)
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    report = convert(args.model, args.out, recipe=recipe, device="cuda", force=True)
    seconds = time.monotonic() - started
    cal = report.calibration
    loaded = subprocess.run([sys.executable, "-c", LOAD, str(args.out)], capture_output=True, text=True, check=False)
    print(json.dumps({
        "seconds": round(seconds, 1),
        "calibration_seconds": cal["seconds"],
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "source_bytes": report.size.source_bytes,
        "matrices": len(report.layers),
        "mean_output_error": sum(l.output_error for l in report.layers) / len(report.layers),
        "mean_absmean_output_error": sum(l.absmean_output_error for l in report.layers) / len(report.layers),
        "calibration_tokens": cal["tokens"],
        "load": json.loads(loaded.stdout.strip().splitlines()[-1]) if loaded.returncode == 0 else loaded.stderr[-800:],
    }, indent=1))


if __name__ == "__main__":
    main()
