"""The model card (``OUT/README.md``) written with every conversion.

It says plainly what was done and what was measured, including when the numbers are bad:
absmean applied to a model that was not trained for ternary weights destroys it.
"""

from __future__ import annotations

from pathlib import Path

from bitquant.report import ConvertReport, own_repeats
from bitquant.source import ModelSource

#: Greedy completions a healed model's card shows side by side (``report.json`` has them all).
CARD_COMPLETIONS = 4


def _base_model(source: ModelSource) -> str:
    if source.kind == "hub":
        return source.spec
    if source.kind == "embedded":
        from bitquant import embedded

        return embedded.lookup(source.spec[len(embedded.PREFIX) :]).base_model
    return source.path.name


def _weights(source: ModelSource) -> str:
    """What the source's weights are, where the spec alone does not say (embedded models)."""
    if source.kind == "embedded":
        from bitquant import embedded

        return embedded.lookup(source.spec[len(embedded.PREFIX) :]).weights
    return ""


def _load_transformers() -> list[str]:
    return [
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")  # needs accelerate',
        "```",
        "",
    ]


def _load_gguf(gguf: dict) -> list[str]:
    lines = [
        "## Run with llama.cpp",
        "",
        f"`{gguf['file']}` is a llama-architecture GGUF whose ternary projections are {gguf['type']} "
        "(llama.cpp runs TQ types on CPU, Metal and Vulkan).",
        "",
        "```bash",
        f"llama-cli -m {gguf['file']} -p \"Once upon a time\"",
        "```",
        "",
    ]
    if gguf["not_tq"]:
        lines += [
            f"{len(gguf['not_tq'])} ternary matrices have rows that are not a multiple of 256 and are stored "
            f"exactly as {', '.join(sorted({e['stored_as'] for e in gguf['not_tq']}))} (same values, more bytes).",
            "",
        ]
    return lines


def _fmt(x: float) -> str:
    return f"{x:.4g}"


#: What each input kind means for the quality of the output (see bitquant.inputs).
_LOSSLESS = {
    "master": "**Lossless.** The source is a ternary-trained master: its forward pass ternarizes its latent weights "
              "with absmean (s = mean|W| in float32) on the fly, and these are exactly those codes and scales, so this "
              "model computes what the master was trained as.",
    "packed": "**Lossless.** The source was already packed ternary: every code and every scale was copied (the scale "
              "converted between transformers' two conventions where needed); no quantization error was added.",
    "ternary-dense": "**Lossless.** Every projection of the source already held only the values {-c, 0, +c}; their "
                     "codes and c were kept (absmean would have shrunk c by the share of non-zeros).",
}


def _quality(report: ConvertReport) -> list[str]:
    """The paragraph on what the conversion did to quality, from the input kind."""
    if report.heal:
        ppl = report.perplexity
        if ppl:
            text = (f"**Quality.** Measured on {Path(ppl['text']).name}: perplexity {_fmt(ppl['quantized'])} against "
                    f"{_fmt(ppl['baseline'])} for the source ({_fmt(ppl['ratio'])}x), and "
                    f"{_fmt(ppl['before_heal']['perplexity'])} for plain ternarization before healing.")
        else:
            text = f"**Quality.** Perplexity {report.unmeasured_perplexity()}."
        findings = report.heal_findings()
        if findings:
            text += " " + " ".join(f[0].upper() + f[1:] + "." for f in findings)
        return [text, ""]
    kind = (report.input or {}).get("kind", "fp")
    if kind in _LOSSLESS:
        return [_LOSSLESS[kind], ""]
    check = ("Check the perplexity below before use." if report.perplexity else
             "Nothing was measured here: measure it before use (`bitquant convert --eval-text FILE`, or "
             "`bitquant eval OUT TEXT`).")
    return ["**Quality warning.** This post-training recipe is exact for checkpoints trained with ternary "
            "quantization-aware training. Applied to an ordinary FP16/BF16 model it usually destroys it "
            f"(SmolLM2-135M: perplexity 23.6 becomes about 6.4e7). {check}", ""]


def _method(report: ConvertReport) -> str:
    """One sentence on how the ternary weights were made."""
    recipe = report.recipe
    kind = (report.input or {}).get("kind", "fp")
    if kind in ("packed", "ternary-dense"):
        return "every ternary matrix's codes and scale were taken over from the source; norms are unchanged."
    if report.heal:
        h = report.heal
        loss = h.get("loss") or {"kind": "forward_kl"}
        what = {"forward_kl": "KL(FP ‖ student)", "reverse_kl": "KL(student ‖ FP)"}.get(
            loss["kind"], f"generalized JSD (beta {loss.get('beta')})")
        on = h.get("on_policy")
        written = (f"; {on['share']:.0%} of every batch written by the student itself and scored by the FP model "
                   f"(on-policy)" if on else "")
        return (f"the model was distilled into its own ternary version for {h['tokens']:,} tokens "
                f"({what} of the next-token distributions{written}), every selected decoder projection "
                "ternarized in the forward pass exactly as it is stored here (absmean s * clamp(round(W / s), -1, 1), "
                "8-bit activations, straight-through gradients); trained: " + ", ".join(h["trained"]) + ".")
    if recipe["method"] == "absmean" and not report.calibration:
        return ("every selected linear weight W of the decoder blocks was replaced by s * clamp(round(W / s), -1, 1) "
                "with s = mean|W| per matrix (BitNet b1.58 absmean); norms are unchanged.")
    parts = ["GPTQ error feedback on calibration text, one fitted scale per matrix"
             if recipe["method"] == "gptq" else "absmean rounding"]
    if recipe.get("equalize"):
        parts.append("per-channel scales folded into the RMSNorm gains and between v/o and up/down")
    if recipe.get("tune_steps"):
        parts.append("RMSNorm gains and scales fitted to the FP blocks' outputs")
    if recipe.get("target_bits_per_weight") is not None:
        parts.append(f"the most damaging projections kept in full precision within {recipe['target_bits_per_weight']:g} "
                     "bits per projection weight")
    return "the decoder projections were ternarized ({}).".format("; ".join(parts))


def _data(d: dict) -> str:
    if d["kind"] == "teacher samples":
        extra = "".join([f", top-p {d['top_p']:g}" if d.get("top_p", 1) != 1 else "",
                         f", {d['greedy_tokens']} greedy tokens after a random one" if d.get("greedy_tokens") else "",
                         f", {d['dropped_sequences']:,} repetitive sequences dropped" if d.get("dropped_sequences") else ""])
        distinct = f"; distinct 4-grams {d['distinct_4grams']:.3f}" if "distinct_4grams" in d else ""
        return (f"{d['share']:.0%}: {d['tokens']:,} tokens sampled from the FP model (temperature {d['temperature']:g}"
                f"{extra}, seed {d['seed']}{distinct}; sha256 `{d['sha256'][:16]}`)")
    if d["kind"] != "text":
        return f"{d['share']:.0%}: {d['kind']}"
    return f"{d['share']:.0%}: " + ", ".join(_text_source(f) for f in d["files"])


def _text_source(f: dict) -> str:
    if f.get("repo"):
        where = f"hf:{f['repo']}" + (f" ({f['config']})" if f.get("config") else "") + f", {f['split']}"
        return f"{where}, {f['tokens']:,} tokens (sha256 `{f['sha256'][:16]}`)"
    return f"{Path(f['path']).name} (sha256 `{f['sha256'][:16]}`)"


def _heal(h: dict) -> list[str]:
    gpu = f"{h['peak_gpu_bytes'] / 2**30:.2f} GiB" if h.get("peak_gpu_bytes") else "–"
    lines = [
        "",
        "## Healing",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| tokens, steps | {h['tokens']:,} tokens in {h['steps']} steps of {h['batch_tokens']:,} |",
        f"| peak learning rate | {h['lr']:g} |",
        *(f"| data | {_data(d)} |" for d in h["data"]),
        *_on_policy(h.get("on_policy")),
        f"| wall time, speed | {h['seconds']:.0f} s on {h['device']}, {h['tokens_per_second']:,.0f} tokens/s |",
        f"| peak GPU memory | {gpu} |",
        f"| final loss ({_loss_name(h)}) | {h['final_loss']:.4g} nats |",
    ]
    ex = h.get("exactness")
    if ex:
        lines.append(f"| student vs this model's logits | relative error {ex['relative_error']:.2e}, "
                     f"top-1 agreement {ex['top1_agreement']:.1%} |")
    curve = h["curve"]
    if curve:
        pick = sorted({round(i * (len(curve) - 1) / 9) for i in range(10)})
        lines += ["", f"Loss curve ({_loss_name(h)} per token, nats):", "", "| step | tokens | loss |", "|---|---|---|"]
        lines += [f"| {curve[i]['step']} | {curve[i]['tokens']:,} | {curve[i]['loss']:.4g} |" for i in pick]
    return lines


def _loss_name(h: dict) -> str:
    loss = h.get("loss") or {"kind": "forward_kl", "temperature": 1}
    name = {"forward_kl": "KL(FP ‖ student)", "reverse_kl": "KL(student ‖ FP)"}.get(loss["kind"], f"JSD({loss.get('beta')})")
    return name + (f" at temperature {loss['temperature']:g}" if loss.get("temperature", 1) != 1 else "")


def _on_policy(on: dict | None) -> list[str]:
    if not on:
        return []
    return [f"| on-policy | {on['share']:.0%} of every batch written by the student from {on['prompt_tokens']}-token "
            f"prompts at temperature {on['temperature']:g}, rewritten every {on['every']} steps, each sequence trained "
            f"on {on['reuse']}x; {on['tokens_written']:,} tokens written at {on['tokens_per_second']:,.0f} tokens/s"
            + _unlikelihood(on) + " |"]


def _unlikelihood(on: dict) -> str:
    n = on.get("unlikelihood_n", 4)
    term = (f"; unlikelihood term (weight {on['unlikelihood']:g}) on the tokens that repeat a {n}-gram of the "
            f"student's own text" if on.get("unlikelihood") else "")
    return term + own_repeats(on, 1)


def _generation(g: dict) -> list[str]:
    """Both models' first greedy completions side by side (``report.json`` holds them all), and
    their share of distinct 4-grams over every prompt."""
    src, healed = g["models"]["source"], g["models"]["healed"]
    n = len(g["prompts"])
    shown = min(n, CARD_COMPLETIONS)
    lines = ["", f"Greedy completions ({g['max_new_tokens']} new tokens at most), FP source vs this model"
             + (f" ({shown} of {n}; `report.json` has every one):" if shown < n else ":"), "",
             "| prompt | source | healed |", "|---|---|---|"]
    for prompt, a, b in list(zip(g["prompts"], src["completions"], healed["completions"]))[:shown]:
        lines.append(f"| {_cell(prompt)} | {_cell(a)} | {_cell(b)} |")
    lines.append(f"| distinct 4-grams over the {n} completions (1 = no repetition) | {_fmt(src['distinct_4grams'])} "
                 f"| {_fmt(healed['distinct_4grams'])} |")
    if src.get("distinct_4grams_se") is not None and healed.get("distinct_4grams_se") is not None:
        lines.append(f"| its standard error over {len(g['prompts'])} completions | {_fmt(src['distinct_4grams_se'])} "
                     f"| {_fmt(healed['distinct_4grams_se'])} |")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def render(report: ConvertReport, source: ModelSource) -> str:
    size = report.size
    summary = report.summary()
    gguf = report.gguf
    lines = [
        "---",
        f"base_model: {_base_model(source)}",
        *(["base_model_relation: quantized"] if source.kind == "embedded" else []),
        *(["tags:"] if gguf else ["library_name: transformers", "tags:"]),
        "- bitnet",
        "- ternary",
        "- bitquant",
        f"- bitquant-{report.bitquant_version}",
        *(["- gguf", "- llama.cpp"] if gguf else []),
        "---",
        "",
        f"# {'Healed ternary' if report.heal else 'Ternary'} (1.58-bit) {'version' if report.heal else 'conversion'} of {source.spec}",
        "",
        f"Converted with bitquant {report.bitquant_version}, recipe `{report.recipe['name']}` "
        f"(sha256 `{report.recipe_sha256[:16]}`): {_method(report)} "
        "Embeddings, biases and the output head are unchanged.",
        "",
        *_quality(report),
        *(_load_gguf(gguf) if gguf else _load_transformers()),
        "## Measured",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| source | {source.spec} ({source.kind}{', commit ' + source.commit_sha if source.commit_sha else ''}) |",
        *([f"| source weights | {_weights(source)} |"] if _weights(source) else []),
        *([f"| input kind | {report.input['label']} |"] if report.input else []),
        f"| ternary matrices | {summary['matrices']} ({size.quantized_params:,} weights) |",
        f"| kept in full precision | {len(report.kept_full_precision)} projections |",
        f"| bits per weight, ternary matrices | {_fmt(size.bits_per_weight_quantized)} |",
        f"| bits per weight, whole model | {_fmt(size.bits_per_weight_model)} |",
        f"| size | {size.source_bytes:,} -> {size.output_bytes:,} bytes ({_fmt(size.compression_ratio)}x smaller) |",
        f"| mean zero fraction | {_fmt(summary['mean_zero_fraction'])} |",
        f"| mean relative weight error ‖W − sWq‖/‖W‖ | {_fmt(summary['mean_relative_error'])} |",
    ]
    cal = report.calibration
    if cal:
        lines.append(f"| calibration | {cal['tokens']:,} tokens of {Path(cal['text']).name}, {cal['seconds']:.0f} s on {cal['device']} |")
    ppl = report.perplexity
    if ppl and ppl.get("before_heal"):
        lines.append(f"| perplexity, plain ternary before healing | {_fmt(ppl['before_heal']['perplexity'])} |")
    if ppl:
        lines += [
            f"| perplexity, source | {_fmt(ppl['baseline'])} |",
            f"| perplexity, ternary | {_fmt(ppl['quantized'])} (ratio {_fmt(ppl['ratio'])}) |",
            f"| mean KL(source ‖ ternary) per token | {_fmt(ppl['kl_mean'])} nats |",
            f"| top-1 agreement with source | {ppl['top1_agreement']:.1%} |",
            f"| evaluated on | {ppl['text']} ({ppl['tokens']:,} tokens, context {ppl['context']}) |",
        ]
    else:
        lines.append(f"| perplexity | {report.unmeasured_perplexity()} |")
    if report.heal:
        lines += _heal(report.heal)
    if report.generation:
        lines += _generation(report.generation)
    lines += [
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in report.versions.items())}. "
        "Per-matrix scales and errors are in `report.json`.",
        "",
    ]
    return "\n".join(lines)
