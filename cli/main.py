"""The ``bitquant`` command: parse options, call one library function, render, set the exit code.

User errors (``bitquant.errors.BitquantError``) become one line on stderr and their exit
code; anything unexpected becomes one line and exit code 1. ``--debug`` shows tracebacks.
The group and the shared options are in :mod:`bitquant.cli.app`; ``heal``, the command
with the most options, in :mod:`bitquant.cli.heal_command`.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from bitquant.errors import UsageError

from bitquant.cli import heal_command, render  # noqa: F401  (heal_command registers ``heal``)
from bitquant.cli.app import (EXIT_INTERRUPTED, STREAM_OPTION, Terminated, begin, cli, debug_option, output_options,
                              quiet_option, show_progress, show_report, threads_option)


@cli.command(short_help="Convert a checkpoint into a packed ternary model.")
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist unless --overwrite).")
@click.option("--config", "config", default=None, metavar="NAME|FILE",
              help="Recipe: a bundled name (absmean, gptq, gptq-mixed, ...; see README) or a YAML file. Default: absmean.")
@click.option("--calib-text", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE",
              help="Calibrated recipes: UTF-8 calibration text (default: the bundled Paradise Lost).")
@click.option("--calib-tokens", type=click.IntRange(min=2), default=None, help="Calibrated recipes: tokens of calibration text (recipe default 16384).")
@click.option("--target-bits-per-weight", type=click.FloatRange(2, 16), default=None,
              help="Mixed precision: keep the most damaging projections in full precision within this average (bits per projection weight).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Calibrated recipes: where calibration runs (auto: cuda when torch sees a GPU).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Keep modules matching this shell pattern in full precision (repeatable), e.g. 'model.layers.0.*'.")
@click.option("--linear-class", type=click.Choice(["auto", "bitlinear", "autobitlinear"]), default=None,
              help="transformers BitNet class to write for: bitlinear (weight_scale = 1/s) or autobitlinear "
                   "(weight_scale = s, float32). Default auto: a packed input keeps its own, BitNetForCausalLM gets "
                   "autobitlinear (the 2B-4T release layout), others bitlinear.")
@click.option("--force", is_flag=True, help="Convert even when OUT is already up to date (implies --overwrite).")
@output_options
@quiet_option
@threads_option
@debug_option
def convert(model, out, config, calib_text, calib_tokens, target_bits_per_weight, device, exclude, linear_class, revision, token, overwrite, force, max_shard_size, fmt, strict, eval_text, eval_max_tokens,
            eval_context, eval_stride, max_ppl_ratio, max_kl, push_to_hub, private, push_revision, create_pr, as_json, stream):
    """Convert MODEL (Hub id, local folder, or embedded:smollm2-135m) into a packed ternary model.

    FP models are ternarized with absmean. Ternary-trained masters (BitNetForCausalLM,
    autobitlinear online), already-packed checkpoints (either weight_scale convention) and
    already-ternary dense weights are converted without loss.

    Exit codes: 0 done (or already up to date), 1 runtime failure, 2 bad input, 3 quality gate failed
    (the output is still written).

    \b
    Examples:
      bitquant convert embedded:smollm2-135m -o smollm2-ternary
      bitquant convert ./my-llama-fp16 -o ./my-llama-ternary --eval-text book.txt --max-ppl-ratio 1.5
      bitquant convert HuggingFaceTB/SmolLM2-135M --revision main -o smollm2-ternary
      bitquant convert embedded:smollm2-135m -o smollm2-gguf --format gguf-tq2_0
      bitquant convert embedded:smollm2-135m -o smollm2-gptq --config gptq
      bitquant convert embedded:smollm2-135m -o smollm2-mixed --config gptq-mixed --target-bits-per-weight 3
      bitquant convert ./bitnet-2b-master-bf16 -o ./bitnet-2b-packed
      bitquant convert ./bitnet-2b-packed -o ./bitnet-2b-bitlinear --linear-class bitlinear
    """
    begin()
    from bitquant.convert import convert as run_convert
    from bitquant.recipe import load_recipe

    recipe = load_recipe(config)
    recipe = recipe.replace(
        exclude=tuple(recipe.exclude) + tuple(exclude) if exclude else None,
        eval_max_tokens=eval_max_tokens, eval_context=eval_context, eval_stride=eval_stride,
        max_ppl_ratio=max_ppl_ratio, max_kl=max_kl, format=fmt, calib_tokens=calib_tokens,
        target_bits_per_weight=target_bits_per_weight, linear_class=linear_class,
    )
    with render.tensor_progress(enabled=show_progress(as_json)) as progress, render.window_progress(enabled=show_progress(as_json)) as eval_progress:
        report = run_convert(
            model, out, recipe=recipe, revision=revision, token=token, overwrite=overwrite, force=force,
            max_shard_size=max_shard_size, strict=strict, progress=progress, eval_text=eval_text, eval_progress=eval_progress,
            push_to_hub=push_to_hub, push_private=private, push_revision=push_revision, push_create_pr=create_pr,
            calib_text=calib_text, device=device, stream_eval=stream,
        )
    show_report(report, out, as_json)


@cli.command("eval", short_help="Measure a model's perplexity on a text.")
@click.argument("model")
@click.argument("text_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--context", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per window.")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Tokens between window starts (default: --context).")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Use only the first N tokens (read in a stream).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Compute dtype (auto: float32 on CPU, bfloat16 on CUDA).")
@click.option("--weights-only", is_flag=True, help="Ternary models: skip the 8-bit activation quantization.")
@STREAM_OPTION
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub ids only).")
@click.option("--token", default=None, envvar="HF_TOKEN", show_envvar=True, help="Hugging Face token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@quiet_option
@threads_option
@debug_option
def eval_cmd(model, text_file, context, stride, max_tokens, device, dtype, weights_only, stream, revision, token, as_json):
    """Perplexity of MODEL (FP16/BF16 checkpoint, bitquant output, Hub id or embedded:NAME) on TEXT_FILE.

    Ternary models run as deployed: ternary weights and 8-bit per-token activations (W1.58A8).

    \b
    Examples:
      bitquant eval embedded:smollm2-135m book.txt
      bitquant eval ./smollm2-ternary book.txt --json
      bitquant eval ./smollm2-ternary book.txt --weights-only --max-tokens 4096
    """
    begin()
    from bitquant.evaluate import EvalSettings, evaluate

    settings = EvalSettings(context=context, stride=stride, max_tokens=max_tokens, device=device, dtype=dtype, stream=stream)
    with render.window_progress(enabled=show_progress(as_json)) as progress:
        result = evaluate(model, text_file, settings=settings, act_quant=not weights_only, revision=revision,
                          token=token, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        render.eval_summary(result)


@cli.command(short_help="Complete a prompt with an FP or ternary model.")
@click.argument("model")
@click.argument("prompt", required=False)
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; above 0: sample at this temperature.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Sampling: keep the smallest set of tokens whose probability reaches this.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling.")
@click.option("--chat", is_flag=True, help="Wrap PROMPT in the tokenizer's chat template as one user turn.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Compute dtype (auto: float32 on CPU, bfloat16 on CUDA).")
@click.option("--compile", "compile_step", is_flag=True,
              help="CUDA: compile the decode step with torch.compile first (about 30 s; faster decode after).")
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub ids only).")
@click.option("--token", default=None, envvar="HF_TOKEN", show_envvar=True, help="Hugging Face token.")
@quiet_option
@threads_option
@debug_option
def generate(model, prompt, max_new_tokens, temperature, top_p, seed, chat, device, dtype, compile_step, revision,
             token):
    """Complete PROMPT with MODEL (FP checkpoint, bitquant output, Hub id or embedded:NAME).

    The text streams to stdout as it is generated; the speed goes to stderr. Ternary models
    run as deployed (W1.58A8). Without PROMPT the prompt is read from stdin.

    \b
    Examples:
      bitquant generate ./smollm2-healed "The capital of France is"
      bitquant generate embedded:smollm2-135m "Write a haiku about tea" --chat --temperature 0.7 --seed 1
      echo "Once upon a time" | bitquant generate ./smollm2-ternary --max-new-tokens 64
      bitquant generate ./llama-ternary "Once upon a time" --max-new-tokens 512 --compile
    """
    begin()
    from bitquant.generate import Sampling, run_generate

    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt: give PROMPT or pipe text on stdin")
        prompt = sys.stdin.read()
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    with render.Reporter(enabled=show_progress()) as reporter:
        def show(text: str) -> None:
            reporter.stop()  # the completion owns the terminal from its first piece on
            click.echo(text, nl=False)
            sys.stdout.flush()

        result = run_generate(model, prompt, sampling, chat=chat, device=device, dtype=dtype, revision=revision,
                              token=token, on_text=show, compile=compile_step)
    click.echo()
    render.generation_speed(result)


def main() -> None:
    """Console-script entry point."""

    def on_sigterm(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = cli.main(prog_name="bitquant", standalone_mode=False)
    except click.exceptions.UsageError as e:  # click's own: bad option value, missing option, wrong argument
        where = e.ctx.command_path if e.ctx is not None else "bitquant"
        click.echo(f"error: {_one_line(e.format_message())} (see '{where} --help')", err=True)
        code = e.exit_code
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except click.ClickException as e:
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        code = e.exit_code
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(message: str) -> str:
    """click's message as one line, starting lower-case and without its final full stop."""
    text = " ".join(message.split()).rstrip(".")
    return text[:1].lower() + text[1:]


if __name__ == "__main__":
    main()
