"""Check a conversion of a large checkpoint the way the tests check small ones.

1. Code level: for every ternarized matrix, the packed codes equal clamp(round(W/s), -1, 1)
   computed independently with numpy from the source (tests/reference.py), and
   weight_scale is 1/s to the precision of the model dtype.
2. It loads with transformers' AutoModelForCausalLM.from_pretrained in a separate
   process that never imports bitquant (BitLinear modules, packed uint8 weights), and a
   forward pass on a few tokens gives finite logits.

    python bench/verify_output.py /tmp/llama2-7b /tmp/llama2-7b-ternary
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from reference import absmean_reference, unpack_reference  # noqa: E402  (independent of bitquant)

from bitquant.tensorfile import SafetensorsReader  # noqa: E402


def open_all(folder: Path) -> dict[str, SafetensorsReader]:
    readers = {}
    for f in sorted(folder.glob("*.safetensors")):
        r = SafetensorsReader(f)
        readers.update({name: r for name in r.names()})
    return readers


def check_codes(src: Path, out: Path) -> int:
    source, result = open_all(src), open_all(out)
    checked = 0
    for name, reader in result.items():
        if not name.endswith(".weight_scale"):
            continue
        weight = name.removesuffix("_scale")
        w = source[weight].get(weight)
        codes, s = absmean_reference(w)
        packed = result[weight].get(weight).numpy()
        if not np.array_equal(unpack_reference(packed), codes):
            raise SystemExit(f"codes differ in {weight}")
        ws = reader.get(name)
        if abs(float(ws) * float(s) - 1) > 2 * torch.finfo(ws.dtype).eps:
            raise SystemExit(f"weight_scale of {weight} is {float(ws)}, expected 1/{float(s)}")
        source[weight].release(weight)
        checked += 1
    return checked


LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
kinds = {type(mod).__name__ for n, mod in m.named_modules() if n.endswith("_proj")}
packed = {str(b.dtype) for n, b in m.named_buffers() if n.endswith("proj.weight")}
with torch.no_grad():
    logits = m(torch.tensor([[1, 306, 4966, 304, 2041]])).logits
assert "bitquant" not in sys.modules
print(json.dumps({"kinds": sorted(kinds), "packed": sorted(packed), "finite": bool(torch.isfinite(logits).all()), "shape": list(logits.shape)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("output", type=Path)
    args = ap.parse_args()
    start = time.perf_counter()
    n = check_codes(args.source, args.output)
    print(f"code level: {n} matrices, every code and weight_scale as the independent reference ({time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", LOAD, str(args.output)], capture_output=True, text=True, env=env, cwd="/")
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    print(f"transformers load + forward ({time.perf_counter() - start:.0f} s): {json.loads(proc.stdout.splitlines()[-1])}")


if __name__ == "__main__":
    main()
