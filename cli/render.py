"""Rich rendering of progress and reports. Reads report objects; computes nothing."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bitquant.evaluate import EvalResult
from bitquant.report import ConvertReport

out = Console(soft_wrap=True)
err = Console(stderr=True)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@contextmanager
def tensor_progress(enabled: bool = True, label: str = "quantizing") -> Iterator[Callable[[int, int, str], None] | None]:
    """A progress callback drawing a bar on a terminal; nothing when stderr is not a terminal."""
    if not enabled or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=err, transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        yield update


@contextmanager
def window_progress(enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar over evaluation windows, on a terminal only."""
    if not enabled or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=err, transient=True
    ) as bar:
        task = bar.add_task("windows", total=None)  # streamed: decoder blocks, then windows
        yield lambda done, total: bar.update(task, completed=done, total=total)


def eval_summary(r: EvalResult) -> None:
    t = Table(title=f"bitquant eval {r.model}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("perplexity", f"{_fmt(r.perplexity)} ± {_fmt(r.stderr)}")
    t.add_row("model", f"{r.model} ({r.mode})")
    t.add_row("text", f"{r.text} ({r.text_tokens:,} tokens{', truncated by --max-tokens' if r.truncated else ''}; sha256 {r.text_sha256[:12]})")
    t.add_row("scored tokens", f"{r.tokens:,} in {r.windows} windows (context {r.context}, stride {r.stride})")
    how = ", streamed one decoder block at a time" if r.streamed else ""
    t.add_row("speed", f"{r.tokens_per_second:,.0f} tokens/s, {r.seconds:.1f} s ({r.device}, {r.dtype}{how})")
    out.print(t)


def gate_line(g: dict) -> str:
    what = "perplexity ratio" if g["gate"] == "max_ppl_ratio" else "mean KL"
    if g["passed"]:
        return f"{what} {_fmt(g['value'])} <= {_fmt(g['limit'])} ({g['option']}) passed"
    return f"{what} {_fmt(g['value'])} > {_fmt(g['limit'])} ({g['option']}), {_fmt(g['value'] / g['limit'])}x the limit"


def input_line(info: dict) -> str:
    """What the source held, and whether converting it added quantization error."""
    layout = f", {info['source_linear_class']}" if info.get("source_linear_class") else ""
    target = f"; written as {info['output_linear_class']}" if info.get("output_linear_class") else ""
    if info["quantization_error_added"]:
        how = "absmean"
        if info["copied_matrices"]:
            how += f" ({info['copied_matrices']} already-ternary matrices copied)"
    elif info["kind"] == "master":
        how = "lossless: absmean is the master's own quantizer"
    else:
        how = f"lossless: {info['copied_matrices']} matrices copied code for code"
    return f"{info['label']}{layout}; {how}{target}"


def convert_summary(report: ConvertReport, out_dir: Path) -> None:
    if report.up_to_date:
        out.print(f"{out_dir} is up to date (same source, recipe {report.recipe_sha256[:12]}, bitquant "
                  f"{report.bitquant_version}); nothing to do. Use --force to convert again.")
        return
    size = report.size
    s = report.summary()
    command = "heal" if report.heal else "convert"
    t = Table(title=f"bitquant {command} -> {out_dir}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    src = report.source
    t.add_row("source", f"{src['id']} ({src['kind']}{', ' + src['commit_sha'][:12] if src.get('commit_sha') else ''})")
    t.add_row("architecture", report.architecture)
    if report.input:
        t.add_row("input", input_line(report.input))
    t.add_row("recipe", f"{report.recipe['name']} (sha256 {report.recipe_sha256[:12]})")
    if report.heal:
        heal_rows(report, t)
    t.add_row("ternary matrices", f"{s['matrices']} ({size.quantized_params:,} weights)")
    t.add_row("kept full precision", str(len(report.kept_full_precision)))
    cal = report.calibration
    if cal:
        t.add_row("calibration", f"{cal['method']}{' + equalize' if cal['equalize'] else ''}, {cal['tokens']:,} tokens of "
                  f"{Path(cal['text']).name}, {cal['seconds']:.0f} s on {cal['device']}")
        mp = cal.get("mixed_precision")
        if mp:
            t.add_row("mixed precision", f"{_fmt(mp['bits_per_projection_weight'])} bits per projection weight "
                      f"(target {_fmt(mp['target_bits_per_weight'])}); kept: {', '.join(mp['kept_units']) or 'none'}")
    t.add_row("size", f"{_bytes(size.source_bytes)} -> {_bytes(size.output_bytes)} ({_fmt(size.compression_ratio)}x)")
    t.add_row("bits/weight", f"{_fmt(size.bits_per_weight_quantized)} ternary matrices, {_fmt(size.bits_per_weight_model)} whole model")
    t.add_row("zeros", f"{s['mean_zero_fraction']:.1%} of ternary codes")
    t.add_row("weight error", f"{_fmt(s['mean_relative_error'])} mean ‖W − sWq‖/‖W‖")
    ppl = report.perplexity
    if ppl:
        before = ppl.get("before_heal")
        if before:
            t.add_row("perplexity", f"{_fmt(ppl['baseline'])} source; {_fmt(before['perplexity'])} ternary before healing -> "
                      f"{_fmt(ppl['quantized'])} after (x{_fmt(ppl['ratio'])} the source)")
        else:
            t.add_row("perplexity", f"{_fmt(ppl['baseline'])} -> {_fmt(ppl['quantized'])} (x{_fmt(ppl['ratio'])})")
        t.add_row("KL / top-1", f"{_fmt(ppl['kl_mean'])} nats, {ppl['top1_agreement']:.1%} agreement"
                  + (" (evaluated one decoder block at a time)" if ppl.get("streamed") else ""))
    elif report.gguf:
        t.add_row("gguf", f"{report.gguf['file']}: " + ", ".join(f"{k} {_bytes(v)}" for k, v in report.gguf["bytes_by_type"].items()))
        if report.gguf["not_tq"]:
            t.add_row("not TQ", f"{len(report.gguf['not_tq'])} matrices with rows not a multiple of 256, stored exactly as "
                      + "/".join(sorted({e["stored_as"] for e in report.gguf["not_tq"]})))
        t.add_row("perplexity", "not measured here: measure the GGUF with llama.cpp (see README)")
    else:
        t.add_row("perplexity", "not measured (add --eval-text FILE)")
    for g in report.gates or []:
        t.add_row("gate", ("[green]" if g["passed"] else "[red]") + gate_line(g))
    if report.published:
        t.add_row("published", report.published["url"])
    t.add_row("elapsed", f"{report.elapsed_seconds:.1f} s")
    out.print(t)
    for note in report.notes:
        out.print(f"note: {note}")
    out.print(f"report: {out_dir / 'report.json'}")


def note(message: str) -> None:
    """A one-line note from the library (e.g. the expected time of a CPU run), on stderr."""
    err.print(f"note: {message}", highlight=False)


@contextmanager
def heal_progress(enabled: bool = True):
    """Progress callbacks for heal: sampling (tokens), training (steps, tokens/s, loss, ETA),
    writing and evaluating. A live bar on a terminal; elsewhere a plain line now and then."""
    from bitquant.heal import HealHooks

    if not enabled:
        yield HealHooks(note=note)
        return
    if not err.is_terminal:
        yield HealHooks(sample=_plain_sampling(), train=_plain_training(), note=note)
        return
    with Progress(TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def task(label: str) -> int:
            if label not in tasks:
                tasks[label] = bar.add_task("", total=None, label=label)
            return tasks[label]

        def sample(done: int, total: int) -> None:
            bar.update(task("sampling from the teacher"), completed=done, total=total, description="tokens")

        def train(p: dict) -> None:
            bar.update(task("healing"), completed=p["step"], total=p["steps"],
                       description=f"loss {p['loss']:.4g}  {p['tokens_per_second']:,.0f} tokens/s  ETA {_eta(p['eta_seconds'])}")

        def tensors(done: int, total: int, name: str) -> None:
            bar.update(task("writing"), completed=done, total=total, description=name)

        def windows(done: int, total: int) -> None:
            bar.update(task("evaluating"), completed=done, total=total, description="windows")

        def say(message: str) -> None:
            bar.console.print(f"note: {message}", highlight=False)

        yield HealHooks(sample=sample, train=train, tensors=tensors, windows=windows, note=say)


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _plain_sampling():
    shown = [0.0]

    def sample(done: int, total: int) -> None:
        if done == total or done / total >= shown[0] + 0.1:
            shown[0] = done / total
            err.print(f"sampling from the teacher: {done:,}/{total:,} tokens", highlight=False)

    return sample


def _plain_training():
    import time

    last = [0.0]

    def train(p: dict) -> None:
        now = time.monotonic()
        if p["step"] == p["steps"] or now - last[0] >= 30:
            last[0] = now
            err.print(f"healing: step {p['step']}/{p['steps']}, {p['tokens']:,} tokens, loss {p['loss']:.4g}, "
                      f"{p['tokens_per_second']:,.0f} tokens/s, ETA {_eta(p['eta_seconds'])}", highlight=False)

    return train


def _data_source(d: dict) -> str:
    if d["kind"] == "teacher samples":
        how = "cached" if d.get("cached") else f"sampled at {d['tokens_per_second']:,.0f} tokens/s"
        return f"{d['share']:.0%} teacher samples ({d['tokens']:,} tokens, {how})"
    return f"{d['share']:.0%} text ({', '.join(Path(f['path']).name for f in d['files'])})"


def heal_rows(report: ConvertReport, t: Table) -> None:
    """The heal section of the summary table."""
    h = report.heal
    data = "; ".join(_data_source(d) for d in h["data"])
    t.add_row("healed", f"{h['tokens']:,} tokens in {h['steps']} steps, lr {h['lr']:g}, trained {', '.join(h['trained'])}")
    t.add_row("data", data)
    gpu = f", peak GPU {h['peak_gpu_bytes'] / 2**30:.1f} GiB" if h.get("peak_gpu_bytes") else ""
    t.add_row("training", f"{h['seconds']:.0f} s on {h['device']}, {h['tokens_per_second']:,.0f} tokens/s{gpu}; "
              f"final KL {h['final_loss']:.4g} nats")
    ex = h.get("exactness")
    if ex:
        t.add_row("exactness", f"student vs output logits: relative error {ex['relative_error']:.2e}, "
                  f"top-1 agreement {ex['top1_agreement']:.1%}")
