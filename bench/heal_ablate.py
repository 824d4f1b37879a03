"""heal ablation at equal wall time: each variant is a whole `bitquant heal` run of
SmolLM2-135M with the same `--time` budget (loading, training, export, evaluation; the
teacher samples are drawn once, before the first variant, and shared), measured on two
held-out texts that heal never trains on.

    python bench/heal_ablate.py --time 150 --variant base: --variant blocks:block_stage=0.3 \\
        --variant emb:train=[projections,norms,embeddings] --json /tmp/ablate.json

Each ``--variant NAME:field=value,field=value`` overrides fields of the bundled heal recipe
(an empty list: the recipe as it is). Prints one row per variant as it finishes:
perplexity on alice29.txt (16,384 tokens) and on the bundled Paradise Lost (16,384
tokens; heal's default data is teacher samples, so both are held out), each over FP,
distinct 4-grams of the greedy completions against the FP model's, and tokens trained.
On the GPU machine ``--gguf`` points at the staged SmolLM2 GGUF (bench/heal_gpu.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heal_gpu import parse_set  # noqa: E402
from source_tree import REPO, stand_in_package  # noqa: E402

ALICE = REPO / "tests" / "data" / "alice29.txt"
MILTON = REPO / "bitquant" / "data" / "paradise-lost.txt"


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, fields = spec.partition(":")
    items, depth, cur = [], 0, ""
    for ch in fields:  # split on commas outside [...]
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        items.append(cur)
    fixed = []
    for item in items:
        key, _, value = item.partition("=")
        if value.startswith("[") and '"' not in value:
            value = json.dumps([v.strip() for v in value.strip("[]").split(",") if v.strip()])
        fixed.append(f"{key}={value}")
    return name, parse_set(fixed)


def presample(model: str, recipe) -> dict:
    """Draw (or find cached) the teacher samples every variant shares, as heal would."""
    import torch

    from bitquant import embedded, runtime
    from bitquant.fingerprint import source_fingerprint
    from bitquant.source import open_checkpoint, resolve_source
    from bitquant.training import data

    source = resolve_source(model)
    ckpt = open_checkpoint(source.path)
    cuda = torch.cuda.is_available()
    teacher = runtime.load_fp(ckpt.path, torch.bfloat16 if cuda else torch.float32, "cuda" if cuda else "cpu")
    settings = data.SampleSettings(recipe.sample_tokens, recipe.seq_len, recipe.sample_temperature, recipe.seed,
                                   recipe.sample_batch, data.SAMPLE_SHARE * recipe.time_budget)
    eos = ckpt.config.get("eos_token_id")
    _, info = data.cached_samples(teacher, settings, settings.key(source_fingerprint(source, ckpt), "cuda" if cuda else "cpu"),
                                  embedded.cache_root() / "heal-data", ckpt.config["bos_token_id"],
                                  [eos] if isinstance(eos, int) else list(eos or []), ckpt.config["vocab_size"])
    del teacher
    return info


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--time", type=float, required=True, help="seconds per variant (the heal --time budget)")
    p.add_argument("--variant", action="append", required=True, help="NAME:field=value,...")
    p.add_argument("--gguf", default="/root/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--json", default=None, help="write every variant's figures here")
    p.add_argument("--keep", default=None, help="copy each variant's report.json into this folder")
    args = p.parse_args()

    import torch

    from bitquant.evaluate import EvalSettings, evaluate
    from bitquant.heal import HealHooks, heal
    from bitquant.training.recipe import load_heal_recipe

    if Path(args.gguf).is_file():
        stand_in_package(Path(args.gguf), Path("/tmp/bq-site"))
    model = "embedded:smollm2-135m"
    base = load_heal_recipe().replace(time_budget=args.time)
    began = time.monotonic()
    sampled = presample(model, base)
    print(f"samples: {sampled['tokens']:,} tokens, {sampled.get('tokens_per_second', 0):,.0f} tokens/s "
          f"({'cached' if sampled.get('cached') else f'{time.monotonic() - began:.0f} s'})", flush=True)
    settings = EvalSettings(max_tokens=16384)
    fp_milton = evaluate(model, MILTON, settings=settings).perplexity
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}; budget {args.time:.0f} s a variant; FP Paradise Lost {fp_milton:.3f}")
    print(f"{'variant':24s} {'tokens':>11s} {'wall s':>7s} {'alice ppl':>10s} {'x FP':>6s} {'milton ppl':>10s} {'x FP':>6s} "
          f"{'d4 healed/FP':>13s} {'tok/s':>8s}", flush=True)
    rows = []
    for spec in args.variant:
        name, fields = parse_variant(spec)
        recipe = base.replace(**fields)
        out = Path(f"/tmp/bq-ablate-{name}")
        shutil.rmtree(out, ignore_errors=True)
        started = time.monotonic()
        notes: list[str] = []
        report = heal(model, out, recipe=recipe, eval_text=ALICE, hooks=HealHooks(note=notes.append))
        wall = time.monotonic() - started
        milton = evaluate(str(out), MILTON, settings=settings).perplexity
        h, ppl, g = report.heal, report.perplexity, report.generation["models"]
        row = {"variant": name, "fields": fields, "tokens": h["tokens"], "steps": h["steps"], "wall_seconds": round(wall, 1),
               "train_seconds": h["seconds"], "steady_tokens_per_second": h["steady_tokens_per_second"],
               "alice": ppl["quantized"], "alice_fp": ppl["baseline"], "alice_ratio": ppl["ratio"], "kl": ppl["kl_mean"],
               "top1": ppl["top1_agreement"], "milton": milton, "milton_ratio": milton / fp_milton,
               "distinct4_healed": g["healed"]["distinct_4grams"], "distinct4_source": g["source"]["distinct_4grams"],
               "completions": g["healed"]["completions"], "curve": h["curve"], "time_budget": h["time_budget"],
               "notes": notes, "peak_gpu_gib": round((h["peak_gpu_bytes"] or 0) / 2**30, 2)}
        rows.append(row)
        print(f"{name:24s} {h['tokens']:>11,} {wall:>7.0f} {ppl['quantized']:>10.2f} {ppl['ratio']:>6.2f} {milton:>10.2f} "
              f"{row['milton_ratio']:>6.2f} {row['distinct4_healed']:>6.3f}/{row['distinct4_source']:<6.3f} "
              f"{h['steady_tokens_per_second']:>8,.0f}", flush=True)
        print(f"    {g['healed']['completions'][0][:100]!r}", flush=True)
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(out / "report.json", Path(args.keep) / f"report-{name}.json")
        shutil.rmtree(out, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": device, "budget_seconds": args.time, "fp_milton": fp_milton,
                                                   "samples": sampled, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
