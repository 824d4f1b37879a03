"""heal ablation at an equal token count, the variants side by side on one GPU: each is a
whole ``bitquant heal`` run of SmolLM2-135M in a process of its own, all started at once
(SmolLM2 takes a fraction of an 80 GB GPU), with the same training tokens, the same batch
and the same cached teacher samples (drawn once before the variants start; a variant that
changes the sampling draws its own), measured on two held-out texts.

    python bench/heal_ablate.py --tokens 6553600 --variant base: --variant op50:on_policy=0.5 \\
        --variant jsd:on_policy=0.5,loss=jsd --json /tmp/ablate.json

Each ``--variant NAME:field=value,field=value`` overrides fields of the bundled heal recipe
(nothing: the recipe as it is); ``data=paradise-lost`` adds the bundled Paradise Lost as
``--data`` (its own held-out figure is then not held out); ``data=PATH`` adds a text,
JSON Lines or Parquet file of your own. Prints one row per variant:
perplexity on alice29.txt (16,384 tokens) and on Paradise Lost (16,384 tokens), each over
FP; the greedy completions' distinct 4-grams against the FP model's, over the report's 32
prompts (until 2026-12-08 the report had four, and the 32 were completed here besides);
tokens, training and on-policy writing speed; and each variant's completions.

``--deadline`` (seconds) stops variants still running then, so that a command with a time
limit still prints what finished. ``--jobs N`` runs at most N variants at once (processes
on one GPU take turns on it rather than sharing it, so more at once mostly adds memory;
two or three overlap one variant's compiling and evaluation with another's training; with more
than two at once the variants do not hold the teacher's states, whose memory rule each process
applies alone: four holding them at once ran an H100 out of memory). On
the GPU machine ``--gguf`` points at the staged SmolLM2 GGUF (bench/heal_gpu.py);
``--model`` replaces SmolLM2 (e.g. a tiny test model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heal_gpu import parse_set, source_folder, wide_distinct  # noqa: E402
from source_tree import REPO, stand_in_package, use_source_tree  # noqa: E402

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
    from bitquant.text import bos_token
    from bitquant.training import data

    source = resolve_source(model)
    ckpt = open_checkpoint(source.path)
    cuda = torch.cuda.is_available()
    teacher = runtime.load_fp(ckpt.path, torch.bfloat16 if cuda else torch.float32, "cuda" if cuda else "cpu")
    settings = data.SampleSettings(recipe.sample_tokens, recipe.seq_len, recipe.sample_temperature, recipe.seed,
                                   recipe.sample_batch, None, recipe.sample_top_p, recipe.sample_greedy_tokens,
                                   recipe.sample_min_distinct)
    bos = bos_token(runtime.load_tokenizer(ckpt.path))
    eos = ckpt.config.get("eos_token_id")
    _, info = data.cached_samples(teacher, settings, settings.key(source_fingerprint(source, ckpt), "cuda" if cuda else "cpu"),
                                  embedded.cache_root() / "heal-data", bos if bos is not None else ckpt.config["bos_token_id"],
                                  [eos] if isinstance(eos, int) else list(eos or []), ckpt.config["vocab_size"])
    del teacher
    return info


def child(args) -> None:
    """One variant, in its own process: heal, then Paradise Lost; prints one JSON line."""
    import torch

    from bitquant.evaluate import EvalSettings, evaluate
    from bitquant.heal import HealHooks, heal
    from bitquant.training.recipe import load_heal_recipe

    name, fields = parse_variant(args.child)
    data = fields.pop("data", None)
    data_files = () if data is None else (MILTON,) if data == "paradise-lost" else (Path(data),)
    recipe = load_heal_recipe().replace(**{**parse_set(args.set), **fields, "tokens": args.tokens})
    out = Path(args.work) / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    notes: list[str] = []
    started = time.monotonic()
    report = heal(args.model, out, recipe=recipe, eval_text=ALICE, data_files=data_files,
                  hooks=HealHooks(note=notes.append))
    wall = time.monotonic() - started
    settings = EvalSettings(max_tokens=16384)
    milton = evaluate(str(out), MILTON, settings=settings).perplexity
    h, ppl, g = report.heal, report.perplexity, report.generation["models"]
    samples = next((d for d in h["data"] if d["kind"] == "teacher samples"), {})
    row = {"variant": name, "fields": fields, "data": [str(f) for f in data_files], "tokens": h["tokens"],
           "steps": h["steps"], "wall_seconds": round(wall, 1), "train_seconds": h["seconds"],
           "tokens_per_second": h["tokens_per_second"], "steady_tokens_per_second": h["steady_tokens_per_second"],
           "alice": ppl["quantized"], "alice_fp": ppl["baseline"], "alice_ratio": ppl["ratio"], "kl": ppl["kl_mean"],
           "top1": ppl["top1_agreement"], "milton": milton, "final_loss": h["final_loss"],
           "distinct4_healed": g["healed"]["distinct_4grams"], "distinct4_healed_se": g["healed"]["distinct_4grams_se"],
           "distinct4_source": g["source"]["distinct_4grams"], "samples_distinct4": samples.get("distinct_4grams"),
           "on_policy": h.get("on_policy"),
           "loss": h.get("loss"), "completions": g["healed"]["completions"], "curve": h["curve"], "notes": notes,
           "peak_gpu_gib": round((h["peak_gpu_bytes"] or 0) / 2**30, 2), "exactness": h.get("exactness")}
    print("RESULT " + json.dumps(row), flush=True)
    del torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, required=True, help="training tokens of every variant")
    p.add_argument("--variant", action="append", default=[], help="NAME:field=value,...")
    p.add_argument("--set", action="append", default=[], help="recipe field=value for every variant")
    p.add_argument("--gguf", default="/root/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--json", default=None, help="write every variant's figures here")
    p.add_argument("--work", default="/tmp/bq-ablate")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which unfinished variants are stopped")
    p.add_argument("--jobs", type=int, default=None, help="variants running at once (default: all); the others wait")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if Path(args.gguf).is_file():
        stand_in_package(Path(args.gguf), Path("/tmp/bq-site"))
    use_source_tree()
    if args.child:
        return child(args)

    import torch

    from bitquant.evaluate import EvalSettings, evaluate
    from bitquant.training.recipe import load_heal_recipe

    began = time.monotonic()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    base = load_heal_recipe().replace(**parse_set(args.set))
    sampled = presample(args.model, base)
    print(f"samples: {sampled['tokens']:,} tokens, {sampled.get('tokens_per_second', 0):,.0f} tokens/s, distinct 4-grams "
          f"{sampled.get('distinct_4grams')} ({'cached' if sampled.get('cached') else f'{time.monotonic() - began:.0f} s'})",
          flush=True)
    fp_milton = evaluate(args.model, MILTON, settings=EvalSettings(max_tokens=16384)).perplexity
    fp_wide = wide_distinct(source_folder(args.model))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the sampler's cache would stay reserved here while the variants train
    print(f"device {device}, torch {torch.__version__}; {args.tokens:,} tokens a variant; FP Paradise Lost "
          f"{fp_milton:.3f}; FP distinct 4-grams over {fp_wide['prompts']} prompts {fp_wide['distinct_4grams']} "
          f"(se {fp_wide['se']}); {len(args.variant)} variants, {args.jobs or len(args.variant)} at once", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if (args.jobs or len(args.variant)) > 2:
        # each child decides to hold the teacher's states (4.8 GB for SmolLM2) from the free memory
        # it sees when it starts, before its siblings allocate theirs: four at once ran an H100
        # out of memory, so more than two at once run the teacher every step (quality is unchanged)
        env.setdefault("BITQUANT_TEACHER_STATES", "0")
    procs, waiting = {}, list(args.variant)

    def start_next() -> None:
        while waiting and len(procs) < (args.jobs or len(args.variant)):
            spec = waiting.pop(0)
            name = spec.partition(":")[0]
            log = open(Path(args.work) / f"{name}.log", "w")
            cmd = [sys.executable, __file__, "--child", spec, "--tokens", str(args.tokens), "--gguf", args.gguf,
                   "--model", args.model, "--work", args.work, *sum((["--set", s] for s in args.set), [])]
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env), log)
            print(f"{name:14s} started at {time.monotonic() - began:.0f} s", flush=True)

    start_next()
    rows = []
    print(f"{'variant':14s} {'tokens':>10s} {'wall s':>6s} {'alice':>8s} {'x FP':>6s} {'milton':>8s} {'x FP':>6s} "
          f"{'d4 healed/FP':>13s} {'d4 se':>7s} {'train tok/s':>11s} {'written tok/s':>13s}", flush=True)
    while procs:
        for name, (proc, log) in list(procs.items()):
            if proc.poll() is None:
                if args.deadline and time.monotonic() - began > args.deadline:
                    waiting.clear()
                    proc.terminate()
                    print(f"{name:14s} stopped at the deadline", flush=True)
                else:
                    continue
            proc.wait()
            log.close()
            del procs[name]
            start_next()
            lines = (Path(args.work) / f"{name}.log").read_text(errors="replace").splitlines()
            result = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), None)
            if result is None:
                tail = [line for line in lines if line.strip()][-3:]
                print(f"{name:14s} failed (exit {proc.returncode}): {' | '.join(tail)[:300]}", flush=True)
                continue
            result["milton_ratio"] = result["milton"] / fp_milton
            rows.append(result)
            op = result.get("on_policy") or {}
            print(f"{name:14s} {result['tokens']:>10,} {result['wall_seconds']:>6.0f} {result['alice']:>8.2f} "
                  f"{result['alice_ratio']:>6.2f} {result['milton']:>8.2f} {result['milton_ratio']:>6.2f} "
                  f"{result['distinct4_healed']:>6.3f}/{result['distinct4_source']:<6.3f} {result['distinct4_healed_se']:>7.3f} "
                  f"{result['steady_tokens_per_second']:>11,.0f} {op.get('tokens_per_second', 0):>13,.0f}", flush=True)
            for c in result["completions"][:4]:
                print(f"    {c[:110]!r}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"device": device, "tokens": args.tokens, "fp_milton": fp_milton,
                                                       "fp_wide": fp_wide,
                                                       "samples": sampled, "rows": rows}, indent=1))
        time.sleep(2)
    print(f"all done in {time.monotonic() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
