"""``bitquant heal``: parse its options, build the recipe, call :func:`bitquant.heal.heal`, render."""

from __future__ import annotations

import re
from pathlib import Path

import click

from bitquant.errors import UsageError

from bitquant.cli import render
from bitquant.cli.app import begin, cli, debug_option, output_options, quiet_option, show_progress, show_report, threads_option


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
    begin()
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
    with render.heal_progress(enabled=show_progress(as_json) and main_process) as hooks:
        report = run_heal(
            model, out, recipe=recipe, revision=revision, token=token, overwrite=overwrite, force=force,
            data_files=data_specs, eval_text=eval_text, save_master=save_master, device=device,
            max_shard_size=max_shard_size, strict=strict, hooks=hooks, push_to_hub=push_to_hub, push_private=private,
            push_revision=push_revision, push_create_pr=create_pr, stream_eval=stream, parallel=parallel,
            low_memory=low_memory,
        )
    if main_process:
        show_report(report, out, as_json)
    elif report is None:
        raise click.exceptions.Exit(1)  # the main process failed and said why
