"""Where does a degraded model's repetition come from? SmolLM2-135M (FP), its decoder
projections changed in controlled ways, each measured by perplexity on alice29.txt and by
the distinct 4-grams of greedy completions over the 32 prompts of heal's report
(:data:`bitquant.generate.PROMPTS`, the figure issue 29 targets). Runs on the CPU in a few minutes.

    python bench/heal_repetition.py                     # fp, a8, and weight noise at three levels
    python bench/heal_repetition.py --noise 0.2 0.4 --int-bits 4 3 --json /tmp/rep.json

Variants (each from a fresh copy of the FP weights):
- ``fp``: the model as it is;
- ``a8``: every decoder projection's input quantized per token to 8 bits with absmax, with
  :func:`bitquant.ternary.quantize_activations` (the exported W1.58A8 arithmetic), FP weights;
- ``noise α``: Gaussian noise of α times each projection's own standard deviation added to its
  weights (seeded): a degradation with no structure, for a curve of repetition against
  perplexity;
- ``intN``: each projection's weights rounded to N bits per row (symmetric absmax), a
  standard quantizer's kind of damage;
- ``--healed DIR``: a model that ``bitquant heal`` wrote (W1.58A8 as exported), on the same
  curve (the GPU machine: ``--device cuda``, bf16).

The question it answers: is the healed student's looping specific to ternary weights or to
8-bit activations, or what any model at that perplexity does?
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heal_gpu import source_folder, wide_figures  # noqa: E402
from source_tree import REPO, use_source_tree  # noqa: E402

use_source_tree()

ALICE = REPO / "tests" / "data" / "alice29.txt"


def projections(model):
    """The decoder projections, by the family table's leaf names (as convert and heal find them)."""
    from bitquant.families import PROJECTIONS

    for name, module in model.model.layers.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            yield module


def act8(model) -> None:
    from bitquant.ternary import quantize_activations

    def pre(module, args):
        q, scale = quantize_activations(args[0])
        return (q / scale,) + tuple(args[1:])

    for m in projections(model):
        m.register_forward_pre_hook(pre)


def noise(model, alpha: float, seed: int = 0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in projections(model):
            w = m.weight
            w.add_(torch.randn(w.shape, generator=g).to(w) * (alpha * w.std()))


def int_round(model, bits: int) -> None:
    import torch

    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in projections(model):
            w = m.weight
            s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / qmax
            w.copy_((w / s).round().clamp(-qmax - 1, qmax) * s)


def measure(folder: Path, name: str, change, tokens, fp_ppl: float | None, device: str) -> dict:
    from bitquant import runtime
    from bitquant.evaluate import EvalSettings, perplexity_of

    started = time.monotonic()
    settings = EvalSettings(max_tokens=len(tokens.ids), device=device)
    model, _ = runtime.load_model(folder, settings.resolved_dtype(device), device)
    change(model)
    ppl = perplexity_of(model, tokens, settings, device)["perplexity"]
    wide = wide_figures(model, runtime.load_tokenizer(folder), keep=4)
    row = {"variant": name, "alice_ppl": round(ppl, 3), "alice_ratio": round(ppl / fp_ppl, 3) if fp_ppl else 1.0,
           "distinct4_wide": wide["distinct_4grams"], "se": wide["se"], "completions": wide["completions"],
           "seconds": round(time.monotonic() - started, 1)}
    print(f"{name:>10s}  alice {row['alice_ppl']:>10.3f} ({row['alice_ratio']:>7.3f}x FP)  "
          f"d4 over 32 prompts {row['distinct4_wide']:.4f} (se {row['se']})  {row['seconds']:.0f} s", flush=True)
    for text in row["completions"][:2]:
        print(f"{'':>12s}{text[:110]!r}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--noise", type=float, nargs="*", default=[0.1, 0.2, 0.3])
    p.add_argument("--int-bits", type=int, nargs="*", default=[])
    p.add_argument("--no-a8", action="store_true")
    p.add_argument("--healed", action="append", default=[], metavar="DIR", help="a heal output folder to place on the curve")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from bitquant.evaluate import EvalSettings, tokenize_for
    from bitquant.generate import PROMPTS

    folder = source_folder(args.model)
    tokens = tokenize_for(folder, ALICE, EvalSettings(max_tokens=args.eval_tokens))
    print(f"{args.model}: alice29.txt, {len(tokens.ids):,} tokens (windows of 512); greedy completions of 64 tokens "
          f"for {len(PROMPTS)} prompts", flush=True)
    dev = args.device
    rows = [measure(folder, "fp", lambda m: None, tokens, None, dev)]
    fp = rows[0]["alice_ppl"]
    if not args.no_a8:
        rows.append(measure(folder, "a8", act8, tokens, fp, dev))
    for bits in args.int_bits:
        rows.append(measure(folder, f"int{bits}", lambda m, b=bits: int_round(m, b), tokens, fp, dev))
    for alpha in args.noise:
        rows.append(measure(folder, f"noise {alpha:g}", lambda m, a=alpha: noise(m, a), tokens, fp, dev))
    for healed in args.healed:
        rows.append(measure(Path(healed), Path(healed).name, lambda m: None, tokens, fp, dev))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
