"""The ``bitquant`` command: parse options, call one library function, render, set the exit code.

User errors (``bitquant.errors.BitquantError``) become one line on stderr and their exit
code; anything unexpected becomes one line and exit code 1. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import traceback
from pathlib import Path

import click

from bitquant import __version__
from bitquant.errors import EXIT_GATE, EXIT_RUNTIME, BitquantError, UsageError, describe

from bitquant.cli import render

EXIT_INTERRUPTED = 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that staged outputs are cleaned up."""


class _Group(click.Group):
    """Turns library errors into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BitquantError as e:
            _fail(ctx, e.message, e.exit_code, e)
        except KeyboardInterrupt as e:
            what = "terminated" if isinstance(e, Terminated) else "interrupted"
            if ctx.invoked_subcommand == "convert":
                what += "; nothing was written under the output name, and a re-run resumes from the finished shards"
            elif ctx.invoked_subcommand == "heal":
                what += "; nothing was written under the output name, and the same command resumes from the last checkpoint"
            _fail(ctx, what, EXIT_INTERRUPTED, e)
        except Exception as e:  # an internal failure: still one line, unless --debug
            _fail(ctx, f"internal error: {describe(e)} (rerun with --debug for the traceback)", EXIT_RUNTIME, e)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug")) or bool((ctx.obj or {}).get("debug"))


def _fail(ctx: click.Context, message: str, code: int, exc: BaseException) -> None:
    if _debug(ctx):
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: {message}", err=True)
    ctx.exit(code)


def _remember(key: str):
    """A click callback that records a flag given to a subcommand in ``ctx.obj[key]``."""

    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.ensure_object(dict)[key] = True
        return value

    return callback


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, callback=_remember("debug"), is_eager=True,
    help="Show full tracebacks on errors.",
)

quiet_option = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_remember("quiet"),
                            help="Show no progress on stderr (errors and the result still show).")

THREADS_HELP = ("CPU threads for torch and numba (default: all cores). On a runner shared with another job, a number "
                "that leaves it its cores avoids OpenMP oversubscription.")


def _set_threads(threads: int | None) -> None:
    if threads:
        import os

        import torch

        os.environ["NUMBA_NUM_THREADS"] = str(threads)  # read when the kernels load numba
        torch.set_num_threads(threads)


def _threads_callback(ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
    _set_threads(value)
    return value


#: ``--threads`` after the subcommand (``bitquant eval ... --threads 1``), as before it.
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N", expose_value=False,
                              is_eager=True, callback=_threads_callback, help=THREADS_HELP)


def _progress(as_json: bool = False) -> bool:
    """Whether to show progress on stderr: always, unless --quiet (with --json too: stdout
    holds the one JSON document, stderr the progress)."""
    return not (click.get_current_context().obj or {}).get("quiet")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class ByteSize(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = _SIZE_RE.match(str(value))
        unit = (m.group(2) or "").lower() if m else None
        if not m or unit not in _UNITS or float(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a size; use e.g. 5GB, 500MB or 2GiB", param, ctx)
        return int(float(m.group(1)) * _UNITS[unit])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bitquant")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N", help=THREADS_HELP)
@click.pass_context
def cli(ctx: click.Context, debug: bool, threads: int | None) -> None:
    """Ternary (BitNet b1.58) models from LLaMA-family checkpoints: convert, heal, evaluate, generate."""
    _set_threads(threads)
    ctx.ensure_object(dict)
    ctx.obj["debug"] = ctx.obj.get("debug") or debug


def _begin() -> None:
    """What every command does before its work (not before --help, which imports nothing heavy)."""
    _quiet_transformers(show_warnings=_debug(click.get_current_context()))


def _quiet_transformers(show_warnings: bool = False) -> None:
    """transformers' own progress bars ("Loading weights", "Converting and de-quantizing
    GGUF tensors") would appear beside bitquant's; Hub download bars stay. Import-time
    log noise of optional libraries, and warnings a user cannot act on, are silenced too
    (``--debug`` shows the warnings)."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    enable_progress_bars()
    import logging

    # torchao (heal's low-memory road), which transformers imports when it is installed, logs
    # every kernel library built for other GPUs, and torch logs torchao's deprecated calls.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not show_warnings:
        import warnings

        # inductor's advice to use TF32 for float32 matrix products: heal keeps float32
        # exact on purpose (the student must compute what the output computes)
        warnings.filterwarnings("ignore", message=".*TensorFloat32 tensor cores.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def output_options(command):
    """The options ``convert`` and ``heal`` share: the source, the output, its evaluation and
    gates, and publishing."""
    for option in reversed(_OUTPUT_OPTIONS):
        command = option(command)
    return command


_STREAM_OPTION = click.option(
    "--stream/--no-stream", "stream", default=None,
    help="Evaluate one decoder block at a time (bounded memory), or all in memory. Default: stream when the "
         "models do not fit comfortably.")

_OUTPUT_OPTIONS = [
    _STREAM_OPTION,
    click.option("--revision", default=None, help="Hub branch, tag or commit of MODEL (Hub ids only)."),
    click.option("--token", default=None, envvar="HF_TOKEN", show_envvar=True, help="Hugging Face token for private or gated models, and for --push-to-hub."),
    click.option("--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete)."),
    click.option("--max-shard-size", type=ByteSize(), default="5GB", show_default=True, help="Largest output shard."),
    click.option("--format", "fmt", type=click.Choice(["hf-bitnet", "gguf-tq2_0", "gguf-tq1_0"]), default=None,
                  help="Output format: transformers BitNet layout (default) or a llama.cpp GGUF with TQ2_0/TQ1_0 projections."),
    click.option("--strict", is_flag=True, help="GGUF: refuse a projection that cannot be TQ (rows not a multiple of 256) instead of storing it as Q8_0."),
    click.option("--eval-text", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE",
                  help="Measure perplexity, KL and top-1 agreement of source and result on this UTF-8 text (heal: also before healing; never trained on)."),
    click.option("--eval-max-tokens", type=click.IntRange(min=2), default=None, help="Tokens of --eval-text to use (recipe default 16384)."),
    click.option("--eval-context", type=click.IntRange(min=2), default=None, help="Window length for --eval-text (recipe default 512)."),
    click.option("--eval-stride", type=click.IntRange(min=1), default=None, help="Window step for --eval-text (default: the window length)."),
    click.option("--max-ppl-ratio", type=click.FloatRange(min=0, min_open=True), default=None, help="Quality gate: fail (exit 3) if output/source perplexity exceeds this."),
    click.option("--max-kl", type=click.FloatRange(min=0, min_open=True), default=None, help="Quality gate: fail (exit 3) if the mean KL (nats) exceeds this."),
    click.option("--push-to-hub", default=None, metavar="REPO_ID", help="Upload OUT to this Hub repo when done (not when a gate failed)."),
    click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
    click.option("--push-revision", default=None, metavar="BRANCH", help="With --push-to-hub: branch to commit to (created if needed)."),
    click.option("--create-pr", is_flag=True, help="With --push-to-hub: open a pull request instead of committing."),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of tables."),
]


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
    _begin()
    from bitquant.convert import convert as run_convert
    from bitquant.recipe import load_recipe

    recipe = load_recipe(config)
    recipe = recipe.replace(
        exclude=tuple(recipe.exclude) + tuple(exclude) if exclude else None,
        eval_max_tokens=eval_max_tokens, eval_context=eval_context, eval_stride=eval_stride,
        max_ppl_ratio=max_ppl_ratio, max_kl=max_kl, format=fmt, calib_tokens=calib_tokens,
        target_bits_per_weight=target_bits_per_weight, linear_class=linear_class,
    )
    with render.tensor_progress(enabled=_progress(as_json)) as progress, render.window_progress(enabled=_progress(as_json)) as eval_progress:
        report = run_convert(
            model, out, recipe=recipe, revision=revision, token=token, overwrite=overwrite, force=force,
            max_shard_size=max_shard_size, strict=strict, progress=progress, eval_text=eval_text, eval_progress=eval_progress,
            push_to_hub=push_to_hub, push_private=private, push_revision=push_revision, push_create_pr=create_pr,
            calib_text=calib_text, device=device, stream_eval=stream,
        )
    _show(report, out, as_json)


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
@_STREAM_OPTION
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
    _begin()
    from bitquant.evaluate import EvalSettings, evaluate

    settings = EvalSettings(context=context, stride=stride, max_tokens=max_tokens, device=device, dtype=dtype, stream=stream)
    with render.window_progress(enabled=_progress(as_json)) as progress:
        result = evaluate(model, text_file, settings=settings, act_quant=not weights_only, revision=revision,
                          token=token, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        render.eval_summary(result)


def _bundled_heal() -> dict:
    """The bundled heal recipe's fields, read as YAML (no torch import: for --help)."""
    from importlib import resources

    import yaml

    try:
        return yaml.safe_load(resources.files("bitquant.configs").joinpath("heal.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, ImportError):
        return {}


_HEAL = _bundled_heal()


def _rd(field: str, unit: str = "") -> str:
    """`` (bundled recipe: VALUE)`` for a heal option's help."""
    value = _HEAL.get(field)
    if value is None:
        return ""
    shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
    return f" (bundled recipe: {shown}{unit})"


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


class Duration(click.ParamType):
    """``90``, ``90s``, ``15m``, ``1.5h``: seconds as a float."""

    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        m = _DURATION_RE.match(str(value))
        if not m or float(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a duration; use e.g. 15m, 900s or 1.5h", param, ctx)
        return float(m.group(1)) * _SECONDS[(m.group(2) or "").lower()]


@cli.command(short_help="Distil an FP model into its own ternary version.")
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist unless --overwrite).")
@click.option("--config", "config", default=None, metavar="NAME|FILE", help="Heal recipe: a bundled name (heal) or a YAML file. Default: heal.")
@click.option("--time", "time_budget", type=Duration(), default=None, metavar="DURATION",
              help="Wall-time budget for the whole run (e.g. 15m): the training tokens are chosen from the speed "
                   "measured in a short probe, instead of --tokens; the report says how many" + _rd("time_budget", " s") + ".")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help="Training tokens in all, instead of --time (the bundled recipe sets a time budget).")
@click.option("--block-stage", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Share of the steps spent training each decoder block on its own against the teacher's block, "
                   "before the end-to-end stage" + _rd("block_stage") + ".")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak learning rate" + _rd("lr") + ".")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=None, help="Tokens per optimizer step, a multiple of the sequence length" + _rd("batch_tokens") + ".")
@click.option("--micro-batch-tokens", type=click.IntRange(min=1), default=None, help="Tokens per forward pass; lower it to save GPU memory" + _rd("micro_batch_tokens") + ".")
@click.option("--data", "data_files", multiple=True, metavar="SOURCE",
              help="Train on this text instead of teacher samples (repeatable): a UTF-8 text file, a .jsonl or .parquet "
                   "file, or hf:ORG/NAME (a Hub data set, streamed); see --data-share.")
@click.option("--data-field", default="text", show_default=True, help="The text column of .jsonl, .parquet and Hub data sets.")
@click.option("--data-config", default=None, help="Hub data set: its configuration (subset) name.")
@click.option("--data-split", default="train", show_default=True, help="Hub data set: the split to read.")
@click.option("--data-share", type=click.FloatRange(0, 1), default=None, help="With --data: share of each batch from the text (rest: teacher samples). Default 1.")
@click.option("--on-policy", "on_policy", type=float, default=None, metavar="X",
              help="Share of each batch written by the student itself from prompts of the data, scored by the "
                   "teacher (on-policy distillation), between 0 and 1" + _rd("on_policy") + ".")
@click.option("--on-policy-start", "on_policy_start", type=float, default=None, metavar="X",
              help="Share of the steps trained on the data alone before the student's own text joins the batches, "
                   "at least 0 and below 1" + _rd("on_policy_start") + ".")
@click.option("--unlikelihood", "unlikelihood", type=float, default=None, metavar="A",
              help="Weight of the unlikelihood term on the tokens that repeat a 4-gram of the student's own "
                   "on-policy text (needs --on-policy), 0 or more" + _rd("unlikelihood") + ".")
@click.option("--loss", "loss", default=None, metavar="NAME",
              help="Divergence: forward_kl (teacher to student), reverse_kl or jsd (recipe field loss_beta)" + _rd("loss") + ".")
@click.option("--sample-tokens", type=click.IntRange(min=2), default=None, help="Tokens to sample from the teacher, at most (cached)" + _rd("sample_tokens") + ".")
@click.option("--sample-batch", type=click.IntRange(min=1), default=None, help="Sequences sampled at once; lower it to save GPU memory" + _rd("sample_batch") + ".")
@click.option("--seed", type=int, default=None, help="Seed of sampling and batch order" + _rd("seed") + ".")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Steps between resume checkpoints" + _rd("checkpoint_every") + ".")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--parallel", type=click.Choice(["auto", "ddp", "fsdp"]), default="auto", show_default=True,
              help="Under torchrun/accelerate launch: DDP (a full copy per GPU) or FSDP2 (sharded); auto shards when "
                   "training would not fit one GPU. Ignored in a single process.")
@click.option("--low-memory/--no-low-memory", "low_memory", default=None,
              help="One-GPU road for large models: bf16 latent weights with stochastic rounding and torchao's 8-bit "
                   "AdamW (8 instead of 18 bytes per parameter). Default: on when one GPU would not hold fp32 training.")
@click.option("--save-master", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Also write the trained latent weights as an ordinary checkpoint (bitquant convert DIR reproduces OUT).")
@click.option("--force", is_flag=True, help="Heal even when OUT is already up to date (implies --overwrite).")
@output_options
@quiet_option
@threads_option
@debug_option
def heal(model, out, config, time_budget, tokens, block_stage, lr, batch_tokens, micro_batch_tokens, data_files, data_field,
         data_config, data_split, data_share, on_policy, on_policy_start, unlikelihood, loss, sample_tokens, sample_batch,
         seed, checkpoint_every, device, parallel, low_memory, save_master, fmt, strict, eval_text, eval_max_tokens, eval_context, eval_stride,
         max_ppl_ratio, max_kl, revision, token, overwrite, force, max_shard_size, push_to_hub, private, push_revision,
         create_pr, as_json, stream):
    """Distil the FP MODEL into its own ternary version, to recover part of the quality that ternarization destroys.

    The student is exactly what is exported (same quantizer, W1.58A8); by default it learns
    from text sampled from the FP model itself, so no data set is needed; half real text
    (--data FILE --data-share 0.5) gave 1.6x lower perplexity at an equal token count
    (SmolLM2 on alice29.txt, docs/heal.md).
    OUT has the layout convert writes. Re-running the same command resumes an interrupted run.

    Exit codes: 0 done (or already up to date), 1 runtime failure (incl. out of GPU memory,
    diverged training), 2 bad input, 3 quality gate failed (the output is still written).

    \b
    Examples:
      bitquant heal embedded:smollm2-135m -o smollm2-healed --eval-text tests/data/alice29.txt
      bitquant heal embedded:smollm2-135m -o smollm2-healed --time 15m
      bitquant heal embedded:smollm2-135m -o smollm2-healed --data corpus.jsonl --data-share 0.5 --time 15m
      bitquant heal embedded:smollm2-135m -o smollm2-healed --device cpu --tokens 32768 --data book.txt
      bitquant heal ./my-llama -o ./my-llama-healed --tokens 100000000 --save-master ./my-llama-master
      torchrun --nproc-per-node 8 -m bitquant heal ./my-llama -o ./my-llama-healed
    """
    _begin()
    from bitquant.heal import heal as run_heal
    from bitquant.training.distributed import world_from_env
    from bitquant.training.recipe import load_heal_recipe
    from bitquant.training.texts import DataSpec

    if tokens is not None and time_budget is not None:
        raise UsageError("--time and --tokens both set the length of training; give one of them")
    if tokens is not None and batch_tokens is not None and tokens < batch_tokens:
        raise UsageError(f"a token budget of {tokens:,} (--tokens) is smaller than one batch of {batch_tokens:,} "
                         "(--batch-tokens); raise --tokens or lower --batch-tokens")
    if data_share is not None and not data_files:
        raise UsageError("--data-share is the share of --data text in each batch; pass --data FILE too")
    recipe = load_heal_recipe(config).replace(
        tokens=tokens, time_budget=time_budget, block_stage=block_stage, lr=lr, batch_tokens=batch_tokens, micro_batch_tokens=micro_batch_tokens, data_share=data_share,
        sample_tokens=sample_tokens, sample_batch=sample_batch, seed=seed, checkpoint_every=checkpoint_every, format=fmt,
        eval_max_tokens=eval_max_tokens, eval_context=eval_context, eval_stride=eval_stride,
        max_ppl_ratio=max_ppl_ratio, max_kl=max_kl, on_policy=on_policy, on_policy_start=on_policy_start, loss=loss,
        unlikelihood=unlikelihood,
    )
    data_specs = tuple(DataSpec(d, data_field, data_config, data_split) for d in data_files)
    main_process = world_from_env().main  # under a launcher only the main process shows progress and the report
    with render.heal_progress(enabled=_progress(as_json) and main_process) as hooks:
        report = run_heal(
            model, out, recipe=recipe, revision=revision, token=token, overwrite=overwrite, force=force,
            data_files=data_specs, eval_text=eval_text, save_master=save_master, device=device,
            max_shard_size=max_shard_size, strict=strict, hooks=hooks, push_to_hub=push_to_hub, push_private=private,
            push_revision=push_revision, push_create_pr=create_pr, stream_eval=stream, parallel=parallel,
            low_memory=low_memory,
        )
    if main_process:
        _show(report, out, as_json)
    elif report is None:
        raise click.exceptions.Exit(1)  # the main process failed and said why


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
    _begin()
    from bitquant.generate import Sampling, run_generate

    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt: give PROMPT or pipe text on stdin")
        prompt = sys.stdin.read()
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    with render.Reporter(enabled=_progress()) as reporter:
        def show(text: str) -> None:
            reporter.stop()  # the completion owns the terminal from its first piece on
            click.echo(text, nl=False)
            sys.stdout.flush()

        result = run_generate(model, prompt, sampling, chat=chat, device=device, dtype=dtype, revision=revision,
                              token=token, on_text=show, compile=compile_step)
    click.echo()
    render.generation_speed(result)


def _show(report, out: Path, as_json: bool) -> None:
    """Print the report (a table, or JSON), and exit with 3 when a quality gate failed."""
    if as_json:
        click.echo(report.to_json(), nl=False)
    else:
        render.convert_summary(report, out)
    failed = report.gates_failed()
    if failed:
        click.echo(f"error: quality gate failed: {'; '.join(render.gate_line(g) for g in failed)}; output written to {out}", err=True)
        click.get_current_context().exit(EXIT_GATE)


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
