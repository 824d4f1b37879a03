"""The training loop of heal: AdamW on the student's trainable parameters, warm-up then
cosine (or constant) learning rate, micro-batches with gradient accumulation, bf16
autocast on CUDA, checkpoints for resuming, and a stop on a NaN or diverging loss.

A checkpoint (``checkpoint.pt`` in the state folder, written atomically every
``checkpoint_every`` steps and on Ctrl-C/SIGTERM) holds the trainable parameters, the
optimizer state, the step and the loss curve; batches are a function of the step
(:class:`~bitquant.training.data.Batches`), so a resumed run continues exactly where it
stopped. A diverging run raises :class:`Diverged` and keeps the last good checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitquant.errors import BitquantError
from bitquant.training.data import Batches
from bitquant.training.loss import kl_loss
from bitquant.training.recipe import HealRecipe
from bitquant.training.student import uncompile

CHECKPOINT = "checkpoint.pt"

#: Called after each optimizer step with ``step``, ``steps``, ``tokens``, ``loss``,
#: ``tokens_per_second`` and ``eta_seconds``.
TrainProgress = Callable[[dict], None]
#: Called with a one-line note for the user (e.g. the expected time on a CPU).
Note = Callable[[str], None]

#: The loss curve keeps about this many points (every step for short runs).
CURVE_POINTS = 200


class Diverged(BitquantError):
    """The loss became NaN/Inf or ran away; the last good checkpoint is kept."""

    exit_code = 1


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float  # training time in this process (compilation included)
    tokens_per_second: float  # tokens / seconds
    steady_tokens_per_second: float  # after the first steps (compilation, warm-up) are over
    peak_gpu_bytes: int | None
    final_loss: float
    curve: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0
    compiled: bool = False


def lr_at(step: int, r: HealRecipe) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine
    decay to ``min_lr_ratio`` x ``lr`` at the last step (or constant)."""
    warmup = min(r.warmup_steps, r.steps // 4)
    if step < warmup:
        return r.lr * (step + 1) / warmup
    if r.schedule == "constant":
        return r.lr
    span = max(1, r.steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    floor = r.min_lr_ratio * r.lr
    return floor + (r.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _decoder_and_head(model):
    return model.get_decoder(), model.get_output_embeddings().weight


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def _save(path: Path, params: dict, optimizer, step: int, curve: list[dict]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"step": step, "curve": curve, "params": {k: v.detach() for k, v in params.items()},
                "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, path)


def _load(path: Path, params: dict, optimizer) -> tuple[int, list[dict]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if set(state["params"]) != set(params):
        return 0, []  # another set of trainable parameters: start over
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["params"][k])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["curve"])


def train(student, teacher, batches: Batches, r: HealRecipe, state_dir: Path, *, compiled: bool = False,
          progress: TrainProgress | None = None, note: Note | None = None) -> TrainResult:
    """Distil ``teacher`` into ``student`` for ``r.steps`` steps (resuming from
    ``state_dir`` when it holds a checkpoint of this run)."""
    device = next(student.parameters()).device
    cuda = device.type == "cuda"
    params = _trainable(student)
    optimizer = torch.optim.AdamW(list(params.values()), lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay,
                                  **({"fused": True} if cuda else {}))
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / CHECKPOINT
    start, curve = _load(path, params, optimizer) if path.is_file() else (0, [])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    s_body, s_head = _decoder_and_head(student)
    t_body, t_head = _decoder_and_head(teacher)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    micro = max(1, r.micro_batch_tokens // r.seq_len)
    every = max(1, r.steps // CURVE_POINTS)
    student.train()
    began = time.perf_counter()
    steady_from, steady_tokens = None, 0
    ema = best_ema = None
    step = start
    loss_value = float("nan")
    try:
        while step < r.steps:
            step_began = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, r)
            ids = batches.batch(step).to(device, non_blocking=True)
            try:
                loss = _accumulate(ids, micro, s_body, s_head, t_body, t_head, autocast)
            except Exception as e:  # a compiled projection that fails on this device: run eagerly
                if not compiled or isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                compiled = False
                uncompile(student)
                uncompile(teacher)
                optimizer.zero_grad(set_to_none=True)
                if note:
                    note(f"torch.compile failed here ({type(e).__name__}); training without it")
                loss = _accumulate(ids, micro, s_body, s_head, t_body, t_head, autocast)
            if r.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), r.grad_clip)
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise Diverged(_diverged_message(f"the loss became {loss_value} at step {step + 1}", path, r))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            ema = loss_value if ema is None else 0.9 * ema + 0.1 * loss_value
            if step > min(r.warmup_steps, r.steps // 4) + 20:
                best_ema = ema if best_ema is None else min(best_ema, ema)
                if ema > 3 * best_ema:
                    raise Diverged(_diverged_message(f"the loss ran away at step {step} (smoothed {ema:.3g}, "
                                                     f"best {best_ema:.3g})", path, r))
            if step % every == 0 or step == r.steps or step == start + 1:
                curve.append({"step": step, "tokens": step * r.batch_tokens, "loss": round(loss_value, 5)})
            now = time.perf_counter()
            if step == start + 1 and note and not cuda:
                eta = (now - step_began) * (r.steps - step)
                note(f"training on the CPU: one step of {r.batch_tokens:,} tokens took {now - step_began:.1f} s, "
                     f"so the remaining {r.steps - step} steps need about {_duration(eta)} (a GPU is far faster)")
            if steady_from is None and step - start >= min(3, r.steps - start):
                steady_from, steady_tokens = now, step * r.batch_tokens
            if progress:
                done_tokens = (step - start) * r.batch_tokens
                rate = done_tokens / (now - began)
                progress({"step": step, "steps": r.steps, "tokens": step * r.batch_tokens, "loss": loss_value,
                          "tokens_per_second": rate, "eta_seconds": (r.steps - step) * r.batch_tokens / rate})
            if step % r.checkpoint_every == 0 and step < r.steps:
                _save(path, params, optimizer, step, curve)
    except KeyboardInterrupt:
        if step > start:
            _save(path, params, optimizer, step, curve)  # a re-run resumes from here
        raise
    seconds = time.perf_counter() - began
    tokens = (step - start) * r.batch_tokens
    steady_seconds = time.perf_counter() - steady_from if steady_from else 0.0
    steady = (step * r.batch_tokens - steady_tokens) / steady_seconds if steady_seconds > 0 else 0.0
    if step > start:
        _save(path, params, optimizer, step, curve)
    student.eval()
    return TrainResult(
        steps=step, tokens=step * r.batch_tokens, seconds=round(seconds, 3),
        tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else 0.0,
        steady_tokens_per_second=round(steady, 1) if steady else round(tokens / seconds, 1) if seconds > 0 else 0.0,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        final_loss=round(loss_value, 6) if step > start else (curve[-1]["loss"] if curve else float("nan")),
        curve=curve, resumed_from_step=start, compiled=compiled,
    )


def _accumulate(ids, micro: int, s_body, s_head, t_body, t_head, autocast) -> torch.Tensor:
    """Forward and backward over the micro-batches of one batch; returns the mean loss."""
    total = torch.zeros((), device=ids.device)
    n = ids.shape[0]
    for b in range(0, n, micro):
        chunk = ids[b : b + micro]
        with autocast:
            with torch.no_grad():
                h_t = t_body(input_ids=chunk, use_cache=False).last_hidden_state
            h_s = s_body(input_ids=chunk, use_cache=False).last_hidden_state
            loss = kl_loss(h_s.flatten(0, 1), s_head, h_t.flatten(0, 1), t_head) * (chunk.shape[0] / n)
        loss.backward()
        total += loss.detach()
    return total


def _diverged_message(what: str, path: Path, r: HealRecipe) -> str:
    kept = f"the last good checkpoint is kept in {path.parent}" if path.is_file() else "no checkpoint was written yet"
    return f"{what}; {kept}; lower --lr (now {r.lr:g}) and run again"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
