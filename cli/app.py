"""What every ``bitquant`` command shares: the command group (library errors become one line
on stderr and their exit code; ``--debug`` shows tracebacks), the options common to several
commands, and the report's rendering and exit code for ``convert`` and ``heal``.
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

import click

from bitquant import __version__
from bitquant.errors import EXIT_GATE, EXIT_RUNTIME, BitquantError, describe

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


def show_progress(as_json: bool = False) -> bool:
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


def begin() -> None:
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


STREAM_OPTION = click.option(
    "--stream/--no-stream", "stream", default=None,
    help="Evaluate one decoder block at a time (bounded memory), or all in memory. Default: stream when the "
         "models do not fit comfortably.")

_OUTPUT_OPTIONS = [
    STREAM_OPTION,
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


def show_report(report, out: Path, as_json: bool) -> None:
    """Print the report (a table, or JSON), and exit with 3 when a quality gate failed."""
    if as_json:
        click.echo(report.to_json(), nl=False)
    else:
        render.convert_summary(report, out)
    failed = report.gates_failed()
    if failed:
        click.echo(f"error: quality gate failed: {'; '.join(render.gate_line(g) for g in failed)}; output written to {out}", err=True)
        click.get_current_context().exit(EXIT_GATE)
