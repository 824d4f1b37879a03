"""Measure bundled recipes on a model and print the README's recipe table (markdown).

Each recipe is converted with ``bitquant convert`` (the library function) and evaluated on
held-out text (default: the vendored alice29.txt; calibration uses the bundled Paradise
Lost), so every row is measured in the same run on the same tokens.

    python bench/recipes_table.py embedded:smollm2-135m --recipes absmean gptq gptq-mixed
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from bitquant.convert import convert
from bitquant.recipe import load_recipe

ALICE = Path(__file__).resolve().parent.parent / "tests" / "data" / "alice29.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--recipes", nargs="+", default=["absmean", "gptq", "gptq-mixed"])
    ap.add_argument("--eval-text", type=Path, default=ALICE)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="RECIPE:FIELD=VALUE",
                    help="override a recipe field for one row, e.g. gptq-mixed:target_bits_per_weight=4")
    args = ap.parse_args()
    print("| recipe | bits/weight (projections) | bits/weight (model) | perplexity | ratio to FP16 | KL (nats) | top-1 | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.recipes:
        recipe = load_recipe(name)
        for s in args.set:
            target, _, assignment = s.partition(":")
            if target == name:
                field, _, value = assignment.partition("=")
                recipe = recipe.replace(**{field: yaml.safe_load(value)})
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            report = convert(args.model, Path(tmp) / "out", recipe=recipe, eval_text=args.eval_text, device=args.device)
            wall = time.monotonic() - started
        ppl = report.perplexity
        mp = (report.calibration or {}).get("mixed_precision")
        bits = mp["bits_per_projection_weight"] if mp else report.size.bits_per_weight_quantized
        label = name if not mp else f"{name} ({len(mp['kept'])} kept)"
        print(f"| {label} | {bits:.2f} | {report.size.bits_per_weight_model:.2f} | {ppl['quantized']:.4g} | "
              f"{ppl['ratio']:.4g} | {ppl['kl_mean']:.3f} | {ppl['top1_agreement']:.1%} | {wall:.0f} s |", flush=True)
    print(f"\nFP16 perplexity {ppl['baseline']:.4g} on {ppl['tokens']:,} tokens of {args.eval_text.name} "
          f"(context {ppl['context']}); calibration: {(report.calibration or {}).get('text', 'none')}")


if __name__ == "__main__":
    main()
