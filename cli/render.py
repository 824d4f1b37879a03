"""Rich rendering of progress and reports. Reads report objects; computes nothing."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:  # importing them would import torch, which `bitquant --help` must not wait for
    from bitquant.evaluate import EvalResult
    from bitquant.report import ConvertReport

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


#: Plain progress (stderr not a live terminal): at most one line a step every this many seconds,
#: and a line naming the current step when nothing was printed for this long.
PLAIN_EVERY = 10.0
#: An ETA is shown once a counted step has run this long and counted something: it is the
#: rest at the rate measured since the step began (never a guess from a burst of updates).
ETA_AFTER = 3.0


class Reporter:
    """Progress on stderr for one command. On a terminal that can redraw, a live bar for
    each counted step and a spinner for the current step; elsewhere (a log, a pipe, a dumb
    terminal) plain lines, and none for what ends within ``PLAIN_EVERY`` seconds (so a quick
    failure shows only its error): a counted step prints its count, rate and an ETA measured
    from its own start every ``PLAIN_EVERY`` seconds (and a last line when it ends, once it
    has printed), and whenever nothing was printed for ``PLAIN_EVERY`` seconds a line names
    the step running and how long it has run. A new step ends the spinners of the steps
    before it; ETAs come from the step's own measured rate (or the caller's, e.g. heal's
    training), and none is shown before there is one."""

    def __init__(self, enabled: bool = True):
        import threading
        import time

        self._time = time.monotonic
        self.enabled = enabled
        self.live = enabled and err.is_terminal and not err.is_dumb_terminal
        self.current, self.since, self.last_line = "starting", self._time(), self._time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._printed: dict[str, float] = {}

    def __enter__(self) -> "Reporter":
        import threading

        from bitquant import activity

        if not self.enabled:
            return self
        if self.live:
            self._bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[label]}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                                 TextColumn("{task.description}"), console=err, transient=True)
            self._bar.__enter__()
        else:
            threading.Thread(target=self._heartbeat, daemon=True).start()
        self._listening = activity.listening(self.step)
        self._listening.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop showing progress (idempotent), e.g. before a command writes to the terminal."""
        if not self.enabled:
            return
        self.enabled = False
        self._listening.__exit__(None, None, None)
        self._stop.set()
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def _say(self, text: str) -> None:
        with self._lock:
            self.last_line = self._time()
            (self._bar.console if self._bar is not None else err).print(text, highlight=False)

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, PLAIN_EVERY / 4))):
            self.tick()

    def tick(self) -> None:
        """Name the running step if nothing was printed for ``PLAIN_EVERY`` seconds (called by
        the heartbeat thread a few times an interval)."""
        now = self._time()
        if self.enabled and self.current and now - self.last_line >= PLAIN_EVERY:
            self._say(f"{self.current} ({_duration(now - self.since)})")

    def note(self, message: str) -> None:
        self._say(f"note: {message}")

    def step(self, label: str) -> None:
        """A step without a count of its own begins (and the steps before it end)."""
        if not self.enabled:
            return
        self.current, self.since = label, self._time()
        if self._bar is not None:
            for key in [k for k in self._tasks if k != " "]:
                self._bar.remove_task(self._tasks.pop(key))
            self._task(" ", label=label, total=None)

    def _task(self, key: str, **fields) -> int:
        if key not in self._tasks:
            self._tasks[key] = self._bar.add_task("", total=None, label=fields.get("label", key), eta="")
        self._bar.update(self._tasks[key], **fields)
        return self._tasks[key]

    def count(self, label: str, unit: str, done: int, total: int, detail: str = "", eta: float | None = None) -> None:
        """A counted step's progress: ``done`` of ``total`` ``unit``; ``eta``: seconds left as the
        caller measures them (default: the rest at the rate measured since the step began)."""
        if not self.enabled:
            return
        now = self._time()
        started = self._started.setdefault(label, now)
        self.current, self.since = label, started
        rate = done / (now - started) if now > started else 0.0
        if eta is None and 0 < done < total and rate > 0 and now - started >= ETA_AFTER:
            eta = (total - done) / rate
        left = f"ETA {_duration(eta)}" if eta is not None and done < total else ""
        if self._bar is not None:
            if " " in self._tasks:  # the spinner of the step that led here ends
                self._bar.remove_task(self._tasks.pop(" "))
            self._task(label, label=label, completed=done, total=total, description=detail or unit, eta=left)
            return
        shown = label in self._printed
        if now - self._printed.get(label, started) < PLAIN_EVERY and not (done >= total and shown):
            return
        self._printed[label] = now
        extra = f", {detail}" if detail else ""
        self._say(f"{label}: {done:,}/{total:,} {unit}{extra}, {rate:,.1f} {unit}/s{', ' + left if left else ''}")

    def counter(self, label: str, unit: str) -> Callable[..., None]:
        """A callback ``(done, total, *anything)`` for :meth:`count`."""
        return lambda done, total, *_: self.count(label, unit, done, total)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextmanager
def tensor_progress(enabled: bool = True, label: str = "quantizing") -> Iterator[Callable[[int, int, str], None] | None]:
    """Progress over tensors (and the steps around them)."""
    with Reporter(enabled) as r:
        yield r.counter(label, "tensors") if enabled else None


@contextmanager
def window_progress(enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """Progress over evaluation windows (streamed: decoder blocks, then windows)."""
    with Reporter(enabled) as r:
        yield r.counter("evaluating", "windows") if enabled else None


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
    else:
        if report.gguf:
            t.add_row("gguf", f"{report.gguf['file']}: " + ", ".join(f"{k} {_bytes(v)}" for k, v in report.gguf["bytes_by_type"].items()))
            if report.gguf["not_tq"]:
                t.add_row("not TQ", f"{len(report.gguf['not_tq'])} matrices with rows not a multiple of 256, stored exactly as "
                          + "/".join(sorted({e["stored_as"] for e in report.gguf["not_tq"]})))
        t.add_row("perplexity", report.unmeasured_perplexity())
    for finding in report.heal_findings():
        t.add_row("[yellow]warning", finding)
    if report.generation:
        g = report.generation["models"]
        t.add_row("distinct 4-grams", f"{_fmt(g['healed']['distinct_4grams'])}{_se(g['healed'])} healed, "
                  f"{_fmt(g['source']['distinct_4grams'])}{_se(g['source'])} source ({len(report.generation['prompts'])} greedy "
                  "completions; 1 = no repetition)")
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
    """Progress callbacks for heal: every step, with counts for sampling, training, writing,
    evaluating and the completions."""
    from bitquant.heal import HealHooks

    with Reporter(enabled) as r:
        if not enabled:
            yield HealHooks(note=note)
            return

        def train(p: dict) -> None:  # heal measures its own rate (compilation excluded once it is over)
            r.count("training", "steps", p["step"], p["steps"],
                    f"{p['tokens']:,} tokens, loss {p['loss']:.4g}, {p['tokens_per_second']:,.0f} tokens/s",
                    eta=p.get("eta_seconds"))

        yield HealHooks(sample=r.counter("sampling from the teacher", "tokens"), train=train,
                        tensors=r.counter("writing", "tensors"), windows=r.counter("evaluating", "windows"),
                        completions=r.counter("greedy completions", "prompts"), note=r.note)


def _data_source(d: dict) -> str:
    if d["kind"] == "teacher samples":
        how = "cached" if d.get("cached") else f"sampled at {d['tokens_per_second']:,.0f} tokens/s"
        return f"{d['share']:.0%} teacher samples ({d['tokens']:,} tokens, {how})"
    if d["kind"] == "text":
        names = [f"hf:{f['repo']}" if f.get("repo") else Path(f["path"]).name for f in d["files"]]
        return f"{d['share']:.0%} text ({', '.join(names)})"
    return f"{d['share']:.0%} {d['kind']}"


def heal_rows(report: ConvertReport, t: Table) -> None:
    """The heal section of the summary table."""
    h = report.heal
    data = "; ".join(_data_source(d) for d in h["data"])
    t.add_row("healed", f"{h['tokens']:,} tokens in {h['steps']} steps, lr {h['lr']:g}, trained {', '.join(h['trained'])}")
    t.add_row("data", data)
    gpu = f", peak GPU {h['peak_gpu_bytes'] / 2**30:.1f} GiB" if h.get("peak_gpu_bytes") else ""
    loss = (h.get("loss") or {}).get("kind", "forward_kl").replace("_", " ")
    t.add_row("training", f"{h['seconds']:.0f} s on {h['device']}, {h['tokens_per_second']:,.0f} tokens/s{gpu}; "
              f"final {loss} {h['final_loss']:.4g} nats")
    op = h.get("on_policy")
    if op:
        t.add_row("on-policy", f"{op['share']:.0%} of each batch written by the student ({op['tokens_written']:,} "
                  f"tokens at {op['tokens_per_second']:,.0f} tokens/s, every {op['every']} steps)"
                  + _repeats(op))
    ex = h.get("exactness")
    if ex:
        t.add_row("exactness", f"student vs output logits: relative error {ex['relative_error']:.2e}, "
                  f"top-1 agreement {ex['top1_agreement']:.1%}")


def _se(model: dict) -> str:
    se = model.get("distinct_4grams_se")
    return f" ± {_fmt(se)}" if se is not None else ""


def _repeats(op: dict) -> str:
    """The unlikelihood term, and how much the student's own text repeated at the first and last rollout."""
    from bitquant.report import own_repeats

    term = f"; unlikelihood weight {op['unlikelihood']:g}" if op.get("unlikelihood") else ""
    return term + own_repeats(op)


def generation_speed(result) -> None:
    """``bitquant generate``'s one line on stderr: tokens, time, tokens/s."""
    built = (f"; {result.decode_tokens_per_second:,.1f} tokens/s after {result.setup:.1f} s building the decoder"
             if result.setup >= 1 else "")
    err.print(f"{len(result.ids)} tokens in {result.seconds:.2f} s ({result.tokens_per_second:,.1f} tokens/s{built}; "
              f"prompt {result.prompt_tokens} tokens)", highlight=False)
