"""Perplexity of a model on a text, and how far a ternary model strays from its source.

Sliding-window causal-LM perplexity: windows of ``context`` tokens start every ``stride``
tokens; each token is scored once, by the first window that has it as a target beyond
the previous window's end (the usual transformers recipe). Where the model's tokenizer
adds BOS, every window starts with it and its first text token is scored after it
(:func:`bitquant.text.windows`); where it adds none, the first token of every window has
no context inside it and is not scored. ``stderr`` is the standard error of the mean
token NLL carried to perplexity (ppl × se); tokens are correlated, so it is a lower bound.

On a GPU the first forward pass compiles and tunes kernels (Triton's W2A8 kernels, cuBLAS's
choices): one window is run first, timed apart as ``setup_seconds``, and
``tokens_per_second`` counts the evaluation alone.

``compare`` runs a baseline and a quantized model over the same windows and adds the mean
KL divergence KL(P_baseline ‖ P_quantized) of the next-token distributions and the top-1
agreement rate, which stay informative where perplexity explodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from bitquant import activity, runtime, scoring, streaming
from bitquant.errors import UsageError
from bitquant.scoring import Head
from bitquant.source import open_checkpoint, resolve_source
from bitquant.text import Tokens, scored_rows, tokenize_file, window_input, windows  # noqa: F401  (windows: re-exported)

#: Called after each window: (windows done, windows in all).
WindowProgress = Callable[[int, int], None]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Tokens per forward pass on the CPU. Measured on SmolLM2, 2 cores (bench/eval_speed.py):
#: windows of 128 run 1.35x (ternary) and 1.07x (FP) faster four at a time, but windows of
#: 512 already fill the cores and ran 13% slower (ternary) four at a time.
CPU_BATCH_TOKENS = 512
#: On a GPU: the share of free memory a batch's activations may take, and a ceiling.
GPU_BATCH_SHARE = 0.25
GPU_BATCH_TOKENS = 1 << 17


@dataclass(frozen=True)
class EvalSettings:
    context: int = 512
    stride: int | None = None  # None: the window length (non-overlapping windows)
    max_tokens: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    stream: bool | None = None  # run one decoder block at a time; None: when the models do not fit comfortably

    def __post_init__(self) -> None:
        if self.stride is None:
            object.__setattr__(self, "stride", self.context)
        if self.context < 2:
            raise UsageError(f"--context must be at least 2 tokens, got {self.context}")
        if not 1 <= self.stride <= self.context:
            raise UsageError(f"--stride must be between 1 and --context ({self.context}), got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < self.context:
            raise UsageError(f"--max-tokens ({self.max_tokens}) must be at least --context ({self.context})")

    def resolved_device(self) -> str:
        return runtime.resolve_device(self.device)

    def resolved_dtype(self, device: str) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if device == "cpu" else torch.bfloat16
        return DTYPES[self.dtype]


@dataclass
class EvalResult:
    model: str
    mode: str  # "full precision", "ternary W1.58A8" or "ternary weights-only"
    perplexity: float
    stderr: float
    nll_mean: float
    tokens: int  # scored tokens
    windows: int
    text: str
    text_sha256: str
    text_tokens: int  # tokens of text used (after --max-tokens)
    truncated: bool
    context: int
    stride: int
    device: str
    dtype: str
    seconds: float  # forward passes only (streamed: block loading included), after the set-up
    tokens_per_second: float  # tokens through the model per second, after the set-up
    streamed: bool = False  # True: evaluated one decoder block at a time (bounded memory)
    bos: str = "none"  # "per_window": every window starts with BOS (the tokenizer adds one); "none"
    setup_seconds: float = 0.0  # GPU: the first forward pass of one window (compiling and tuning kernels)

    def to_dict(self) -> dict:
        return asdict(self)


def batch_windows(config, context: int, device: str, dtype: torch.dtype) -> int:
    """Windows per forward pass: on a GPU as many as a share of its free memory holds
    (activations of about 8 hidden and 4 MLP widths per token), on the CPU
    :data:`CPU_BATCH_TOKENS` tokens' worth; one at least."""
    if device == "cpu":
        tokens = CPU_BATCH_TOKENS
    else:
        size = torch.empty((), dtype=dtype).element_size()
        per_token = size * (8 * config.hidden_size + 4 * config.intermediate_size)
        tokens = min(GPU_BATCH_TOKENS, int(GPU_BATCH_SHARE * torch.cuda.mem_get_info()[0] / per_token))
    return max(1, tokens // context)


def _groups(spans: list[tuple[int, int, int]], batch: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows of one length, ``batch`` at most per group, in window order."""
    group: list[tuple[int, int, int]] = []
    for span in spans:
        if group and (len(group) == batch or span[1] - span[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def window_rows(model, ids: torch.Tensor, spans: list[tuple[int, int, int]], batch: int,
                bos: int | None = None) -> Iterator[torch.Tensor]:
    """Each window's final hidden states at the positions that predict tokens first..end-1,
    in window order, from forward passes of ``batch`` windows through the decoder (each
    after ``bos`` where there is one; the head is applied by :mod:`bitquant.scoring`, a
    block of vocabulary at a time)."""
    body = model.get_decoder()
    for group in _groups(spans, batch):
        h = body(input_ids=torch.stack([window_input(ids, span, bos) for span in group])).last_hidden_state
        for row, span in enumerate(group):
            yield h[row, scored_rows(span, bos)]


def warm_up(model, ids: torch.Tensor, spans: list[tuple[int, int, int]], bos: int | None, device: str) -> float:
    """On a GPU, the first window through the model and the scoring, once (kernels compiled,
    loaded and tuned, as the first batch would have them); its seconds. Nothing on the CPU,
    where nothing is compiled. A fresh process on an H200 evaluated ternary SmolLM2 at 52k
    tokens/s with only the forward pass warmed (bench/eval_cli.py): the scoring's first calls
    were still in the timed part."""
    if not spans or not str(device).startswith("cuda"):
        return 0.0
    began = time.perf_counter()
    with torch.inference_mode():
        t = ids.to(device)
        for x in window_rows(model, t, spans[:1], 1, bos):
            scoring.nll(x, model_head(model), t[spans[0][2] : spans[0][1]])
    torch.cuda.synchronize(device)
    return time.perf_counter() - began


def model_head(model) -> Head:
    """The output head of an in-memory model, in its dtype, with the family's soft-capping."""
    weight = model.get_output_embeddings().weight
    return Head(weight, weight.dtype, getattr(model.config, "final_logit_softcapping", None))


def _summary(nll: torch.Tensor) -> tuple[float, float, float]:
    mean = float(nll.mean())
    se = float(nll.std() / math.sqrt(nll.numel())) if nll.numel() > 1 else 0.0
    ppl = math.exp(mean) if mean < 700 else math.inf
    return ppl, ppl * se, mean


@torch.inference_mode()
def token_nlls(model, ids: list[int], context: int, stride: int, device: str, progress: WindowProgress | None = None,
               batch: int | None = None, bos: int | None = None):
    """Per-token NLLs (float64) and the number of tokens run through the model; ``batch``
    windows per forward pass (default: :func:`batch_windows`); every window after ``bos``
    where there is one."""
    t = torch.tensor(ids, device=device)
    spans = windows(len(ids), context, stride, bos is not None)
    head = model_head(model)
    batch = batch or batch_windows(model.config, context, device, head.dtype)
    rows = window_rows(model, t, spans, batch, bos)
    return _nlls(rows, head, t, spans, progress), _forwarded(spans, bos)


def _forwarded(spans: list[tuple[int, int, int]], bos: int | None) -> int:
    """Positions run through the model (BOS included)."""
    return sum(end - begin + (bos is not None) for begin, end, _ in spans)


def _nlls(rows: Iterable[torch.Tensor], head: Head, t: torch.Tensor, spans: list[tuple[int, int, int]],
          progress: WindowProgress | None = None) -> torch.Tensor:
    """Per-token NLLs (float64, on the CPU) from each window's final hidden states, in window order."""
    out = []
    for i, (x, (_, end, first)) in enumerate(zip(rows, spans), start=1):
        out.append(scoring.nll(x, head, t[first:end].to(x.device)).cpu())
        if progress:
            progress(i, len(spans))
    return torch.cat(out)


def evaluate(
    model: str,
    text: str | Path,
    *,
    settings: EvalSettings = EvalSettings(),
    act_quant: bool = True,
    revision: str | None = None,
    token: str | None = None,
    progress: WindowProgress | None = None,
) -> EvalResult:
    """Perplexity of ``model`` (Hub id, folder, bitquant output, embedded:NAME) on a text file.

    In memory when the model fits comfortably (or ``settings.stream`` is False), else one
    decoder block at a time (:mod:`bitquant.streaming`); ``progress`` then counts blocks
    and windows."""
    activity.step(f"opening {model}")
    folder = resolve_source(model, revision=revision, token=token).path
    runtime.check_evaluable(folder)
    activity.step(f"reading {text}")
    tokens = tokenize_for(folder, text, settings)
    device = settings.resolved_device()
    dtype = settings.resolved_dtype(device)
    streamed = _streams(settings, [folder], dtype, device, act_quant)
    spans = windows(len(tokens.ids), settings.context, settings.stride, tokens.bos is not None)
    t = torch.tensor(tokens.ids)
    setup = 0.0
    started = time.perf_counter()
    if streamed:
        mode = runtime.mode_label(folder, act_quant)
        tick = _ticker(progress, open_checkpoint(folder).config["num_hidden_layers"] + len(spans))
        hidden = streaming.final_hidden(folder, t, spans, dtype, device, act_quant, tick, tokens.bos)
        nll = _nlls(streaming.window_rows(hidden, spans, tokens.bos), hidden.head, t, spans, lambda i, n: tick())
        forwarded = _forwarded(spans, tokens.bos)
    else:
        activity.step(f"loading {model}")
        lm, mode = runtime.load_model(folder, dtype, device, act_quant=act_quant)
        activity.step("compiling the GPU kernels (first window)" if device.startswith("cuda") else "evaluating")
        setup = warm_up(lm, t, spans, tokens.bos, device)
        started = time.perf_counter()
        nll, forwarded = token_nlls(lm, tokens.ids, settings.context, settings.stride, device, progress,
                                    bos=tokens.bos)
    seconds = time.perf_counter() - started
    ppl, se, mean = _summary(nll)
    return EvalResult(
        model=model, mode=mode, perplexity=ppl, stderr=se, nll_mean=mean, tokens=nll.numel(),
        windows=len(spans), text=str(text),
        text_sha256=tokens.sha256, text_tokens=len(tokens.ids), truncated=tokens.truncated,
        context=settings.context, stride=settings.stride, device=device, dtype=str(dtype).replace("torch.", ""),
        seconds=round(seconds, 3), tokens_per_second=round(forwarded / seconds, 2) if seconds else 0.0,
        streamed=streamed, bos=tokens.convention, setup_seconds=round(setup, 3),
    )


def _streams(settings: EvalSettings, folders: list[Path], dtype: torch.dtype, device: str, act_quant: bool) -> bool:
    if settings.stream is not None:
        return settings.stream
    return not streaming.fits(folders, dtype, device, act_quant)


def _ticker(progress: WindowProgress | None, total: int):
    """A callback that counts steps (blocks, then windows) into ``progress``."""
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    return tick


def perplexity_of(model, tokens: Tokens, settings: EvalSettings, device: str) -> dict:
    """Perplexity of an in-memory model (e.g. heal's student) on ``tokens``: ``perplexity``,
    ``stderr``, ``tokens`` (scored)."""
    nll, _ = token_nlls(model, tokens.ids, settings.context, settings.stride, device, bos=tokens.bos)
    ppl, se, _ = _summary(nll)
    return {"perplexity": ppl, "stderr": se, "tokens": nll.numel(), "bos": tokens.convention}


def tokenize_for(folder: Path, text: str | Path, settings: EvalSettings) -> Tokens:
    """Validate and tokenize ``text`` with the tokenizer of the model in ``folder``."""
    tokenizer = runtime.load_tokenizer(folder)
    return tokenize_file(text, tokenizer, min_tokens=settings.context, max_tokens=settings.max_tokens)


@torch.inference_mode()
def compare(
    baseline: Path,
    quantized: Path,
    tokens: Tokens,
    *,
    settings: EvalSettings = EvalSettings(),
    progress: WindowProgress | None = None,
) -> dict:
    """Perplexity of both models on the same tokens, plus KL and top-1 agreement.

    Both models are held in memory at once when they fit comfortably (window by window
    comparison keeps the per-token distributions out of memory); otherwise each runs one
    decoder block at a time and the windows' final hidden states are compared through
    the output heads window by window (``streamed`` in the result). Returns the
    ``perplexity`` object of a conversion report.
    """
    device = settings.resolved_device()
    dtype = settings.resolved_dtype(device)
    streamed = _streams(settings, [baseline, quantized], dtype, device, True)
    t = torch.tensor(tokens.ids)
    bos = tokens.bos
    spans = windows(len(tokens.ids), settings.context, settings.stride, bos is not None)
    started = time.perf_counter()
    if streamed:
        mode = runtime.mode_label(quantized, True)
        blocks = sum(open_checkpoint(f).config["num_hidden_layers"] for f in (baseline, quantized))
        tick = _ticker(progress, blocks + len(spans))
        hb = streaming.final_hidden(baseline, t, spans, dtype, device, True, tick, bos)
        hq = streaming.final_hidden(quantized, t, spans, dtype, device, True, tick, bos)
        pairs = zip(streaming.window_rows(hb, spans, bos), streaming.window_rows(hq, spans, bos))
        head_b, head_q = hb.head, hq.head
        window_progress = lambda i, n: tick()  # noqa: E731
    else:
        base, _ = runtime.load_model(baseline, dtype, device)
        quant, mode = runtime.load_model(quantized, dtype, device)
        t = t.to(device)
        warm_up(base, t, spans, bos, device)
        warm_up(quant, t, spans, bos, device)
        started = time.perf_counter()
        head_b, head_q = model_head(base), model_head(quant)
        batch = batch_windows(base.config, settings.context, device, dtype)
        pairs = zip(window_rows(base, t, spans, batch, bos), window_rows(quant, t, spans, batch, bos))
        window_progress = progress
    nll_b, nll_q, kl, agree = [], [], [], []
    for i, ((xb, xq), (begin, end, first)) in enumerate(zip(pairs, spans), start=1):
        scores = scoring.compare(xb, head_b, xq, head_q, t[first:end].to(xb.device))
        for out, value in zip((nll_b, nll_q, kl, agree), scores):
            out.append(value.cpu())
        if window_progress:
            window_progress(i, len(spans))
    seconds = time.perf_counter() - started
    ppl_b, se_b, _ = _summary(torch.cat(nll_b))
    ppl_q, se_q, _ = _summary(torch.cat(nll_q))
    return {
        "baseline": ppl_b,
        "baseline_stderr": se_b,
        "quantized": ppl_q,
        "quantized_stderr": se_q,
        "ratio": ppl_q / ppl_b,
        "delta": ppl_q - ppl_b,
        "kl_mean": float(torch.cat(kl).mean()),
        "top1_agreement": float(torch.cat(agree).float().mean()),
        "tokens": int(sum(e - f for _, e, f in spans)),
        "bos": tokens.convention,
        "text": tokens.path,
        "text_sha256": tokens.sha256,
        "text_tokens": len(tokens.ids),
        "context": settings.context,
        "stride": settings.stride,
        "max_tokens": settings.max_tokens,
        "quantized_mode": mode,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "seconds": round(seconds, 3),
        "streamed": streamed,
    }
