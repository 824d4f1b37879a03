"""The training loop of heal: AdamW on the student's trainable parameters, warm-up then
cosine (or constant) learning rate, micro-batches with gradient accumulation, bf16
autocast on CUDA, checkpoints for resuming, and a stop on a NaN or diverging loss.

Under a launcher (:mod:`bitquant.training.distributed`) every process takes an equal share
of each global batch and the student is wrapped in DDP or FSDP2; one process runs the same
code unwrapped, so the loss curve is the same up to float rounding.

A checkpoint (:mod:`bitquant.training.checkpoint`, replaced every ``checkpoint_every``
steps and on Ctrl-C/SIGTERM) holds the trainable parameters, the optimizer state, the
step and the loss curve, whatever the sharding. Batches are a function of the step (:class:`~bitquant.training.data.Batches`), so a
resumed run continues exactly where it stopped, on any number of processes. A diverging
run raises :class:`Diverged` and keeps the last good checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitquant import activity
from bitquant.errors import BitquantError, UsageError
from bitquant.training import checkpoint, distributed, teacher_states
from bitquant.training.budget import BUDGET, fit_to_deadline
from bitquant.training.data import Batches
from bitquant.training.distributed import World
from bitquant.training.loss import FORWARD_KL, Divergence, block_loss, divergence
from bitquant.training.on_policy import Rollouts
from bitquant.training.recipe import HealRecipe
from bitquant.training.student import block_states, run_blocks, uncompile


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
    parallel: str | None = None  # "ddp" or "fsdp" under a launcher
    on_policy: dict | None = None  # the rollouts' report (Rollouts.report)
    teacher_states: dict | None = None  # whether the teacher's hidden states were held (teacher_states)
    # with a time budget: the probe's speed and the token count chosen from it
    budget: dict | None = None
    # fsdp only: the trained parameters, gathered in full on the main process (module names
    # under StudentLoss, i.e. "student.<name>"); the student module itself stays sharded
    full_state: dict | None = field(default=None, repr=False)


def lr_at(step: int, r: HealRecipe) -> float:
    """Learning rate of optimizer step ``step`` (0-based). Each stage (the block-wise one,
    then the end-to-end one) has its own schedule: linear warm-up, then cosine decay to
    ``min_lr_ratio`` x ``lr`` at its last step (or constant)."""
    blocks = r.block_steps
    if step < blocks:
        return _schedule(step, blocks, r)
    return _schedule(step - blocks, r.steps - blocks, r)


def _schedule(step: int, steps: int, r: HealRecipe) -> float:
    warmup = min(r.warmup_steps, steps // 4)
    if step < warmup:
        return r.lr * (step + 1) / warmup
    if r.schedule == "constant":
        return r.lr
    span = max(1, steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    floor = r.min_lr_ratio * r.lr
    return floor + (r.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _decoder_and_head(model):
    return model.get_decoder(), model.get_output_embeddings().weight


class StudentLoss(torch.nn.Module):
    """The student and its loss as one module, so that DDP and FSDP2 see every trainable
    parameter used inside one forward pass (the output head included)."""

    def __init__(self, student: torch.nn.Module, div: Divergence = FORWARD_KL, unlikelihood: float = 0.0):
        super().__init__()
        self.student = student
        self.div = div
        self.unlikelihood = unlikelihood

    def forward(self, ids: torch.Tensor, h_t: torch.Tensor | list[torch.Tensor], t_head: torch.Tensor,
                weight: float, starts: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        """The divergence of the final hidden states ``h_t`` (end to end) at the positions from
        each row's ``starts`` on (all of them when None), plus the unlikelihood term where
        ``negatives`` ([rows, seq], -1: none) names a token, or, when ``h_t`` is the list of
        the teacher's block inputs and last output, the block-wise reconstruction loss."""
        body, head = _decoder_and_head(self.student)
        if isinstance(h_t, list):
            outputs = run_blocks(body, h_t[:-1])
            return block_loss(outputs, h_t[1:], h_t[:-1]) * weight
        h_s = body(input_ids=ids, use_cache=False).last_hidden_state
        if starts is None:
            return divergence(h_s.flatten(0, 1), head, h_t.flatten(0, 1), t_head, self.div) * weight
        keep = torch.arange(ids.shape[1], device=ids.device)[None, :] >= starts[:, None]
        negative = None if negatives is None else negatives[keep]
        return divergence(h_s[keep], head, h_t[keep], t_head, self.div, negative, self.unlikelihood) * weight


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def make_optimizer(params: list, r: HealRecipe, cuda: bool, low_memory: bool):
    """AdamW: torch's (fused on CUDA) for fp32 latent weights; for the low-memory road
    (bf16 latent weights) torchao's 8-bit AdamW with stochastic rounding into bf16, so that
    updates smaller than a bf16 step are not lost."""
    if not low_memory:
        return torch.optim.AdamW(params, lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay,
                                 **({"fused": True} if cuda else {}))
    import logging

    for name in ("torchao", "torch.utils._pytree"):  # kernels built for other GPUs, deprecated calls
        logging.getLogger(name).setLevel(logging.ERROR)
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay, bf16_stochastic_round=True)


def train(student, teacher, batches: Batches, r: HealRecipe, state_dir: Path, *, compiled: bool = False,
          progress: TrainProgress | None = None, note: Note | None = None, world: World = World(),
          parallel: str | None = None, low_memory: bool = False, deadline: float | None = None,
          rollouts: Rollouts | None = None) -> TrainResult:
    """Distil ``teacher`` into ``student`` for ``r.steps`` steps (resuming from
    ``state_dir`` when it holds a checkpoint of this run). Under a launcher, ``world`` is
    this process's place and ``parallel`` the wrapping (``ddp`` or ``fsdp``). With DDP the
    student ends with its full trained weights; with FSDP2 it stays sharded and the result's
    ``full_state`` holds them (on the main process).

    ``deadline`` (a ``time.monotonic()`` value) replaces ``r.tokens``: a probe of a few
    forward and backward passes (no update) measures the step time, and the run gets as
    many steps as fit before the deadline (:func:`bitquant.training.budget.fit_to_deadline`).
    The choice is kept in ``state_dir``, so a resumed run keeps it.

    ``rollouts`` writes the on-policy rows of every batch (the recipe's ``on_policy`` share;
    their loss is taken on the student's tokens only)."""
    device = next(student.parameters()).device
    cuda = device.type == "cuda"
    rows = distributed.rows_of(world, r.batch_sequences)
    if rollouts is not None and parallel == "fsdp":
        raise UsageError("on-policy steps (--on-policy) need the whole student in every process: use --parallel ddp, "
                         "or --on-policy 0 with FSDP2")
    model = distributed.wrap(StudentLoss(student, r.divergence, r.unlikelihood), list(student.get_decoder().layers), parallel,
                             str(device), unused_ok=r.block_stage > 0)
    params = _trainable(model)
    optimizer = make_optimizer(list(params.values()), r, cuda, low_memory)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / checkpoint.CHECKPOINT
    start, curve, extra = (checkpoint.load(path, model, optimizer) if (path / checkpoint.PROGRESS).is_file()
                           else (0, [], {}))
    if rollouts is not None:
        rollouts.restore(extra)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_body, t_head = _decoder_and_head(teacher)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    micro = max(1, r.micro_batch_tokens // r.seq_len)
    held = None
    # (with a time budget, the recipe's token count stands in for the one the probe chooses)
    states_report = teacher_states.plan(batches.pools, t_head.shape[1], device, cuda,
                                        batches.passes(r.steps) if batches.pools else None,
                                        on_policy=rollouts is not None, low_memory=low_memory)
    if states_report["held"]:
        activity.step("computing the teacher's hidden states of the data once")
        try:
            held = teacher_states.TeacherStates(t_body, batches.pools, micro, device, autocast)
        except Exception as e:  # a compiled teacher that fails on this device: as the loop below does
            if not compiled or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            uncompile(teacher)
            held = teacher_states.TeacherStates(t_body, batches.pools, micro, device, autocast)
        states_report = held.report()

    def batch_of(step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Step ``step``'s rows for this process (on the device), where each row's scored
        positions start (on the CPU; None: everywhere), and the unlikelihood term's tokens
        (on the CPU, -1: none; None: no term this step)."""
        ids = batches.batch(step) if batches.pools else torch.empty(0, r.seq_len, dtype=torch.long)
        if rollouts is None:
            return ids[rows].to(device, non_blocking=True), None, None
        written = rollouts.batch(step)
        starts = torch.cat([torch.zeros(len(ids), dtype=torch.long),
                            torch.full((len(written),), rollouts.scored_from(step), dtype=torch.long)])
        negatives = rollouts.negatives(step)
        if negatives is not None:
            negatives = torch.cat([torch.full_like(ids, -1), negatives])[rows]
        return torch.cat([ids, written])[rows].to(device, non_blocking=True), starts[rows], negatives

    def states_of(step: int) -> torch.Tensor | None:
        """The teacher's held hidden states of step ``step``'s rows for this process (None: not held)."""
        return None if held is None else held.rows(batches.picks(step)[rows])

    budget = None
    if deadline is not None:
        activity.step("measuring the training speed for the time budget")
        def probe(k: int) -> torch.Tensor:
            ids, starts, negatives = batch_of(k)
            return _accumulate(ids, starts, micro, model, t_body, t_head, autocast, False, negatives, states_of(k))

        budget = fit_to_deadline(deadline, state_dir / BUDGET, probe, optimizer, r, world, rollouts)
        r = r.replace(tokens=budget["tokens"])
        if note:
            note(f"time budget: {budget['steps']:,} steps of {r.batch_tokens:,} tokens fit "
                 f"({budget['tokens']:,} tokens at {budget['probe_tokens_per_second']:,.0f} tokens/s measured)")
    if rollouts is not None:
        rollouts.begin_at(r.steps)
        if rollouts.first >= r.steps and note:
            note(rollouts.never_message(r.steps))
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
                if isinstance(group["lr"], torch.Tensor):  # torchao keeps it as a tensor (no recompiles)
                    group["lr"].fill_(lr_at(step, r))
                else:
                    group["lr"] = lr_at(step, r)
            ids, starts, negatives = batch_of(step)
            blockwise = step < r.block_steps
            h_all = None if blockwise else states_of(step)
            try:
                loss = _accumulate(ids, starts, micro, model, t_body, t_head, autocast, blockwise, negatives, h_all)
            except Exception as e:  # a compiled projection that fails on this device: run eagerly
                if not compiled or isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                compiled = False
                uncompile(student)
                uncompile(teacher)
                optimizer.zero_grad(set_to_none=True)
                if note:
                    note(f"torch.compile failed here ({type(e).__name__}); training without it")
                loss = _accumulate(ids, starts, micro, model, t_body, t_head, autocast, blockwise, negatives, h_all)
            if r.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), r.grad_clip)
            loss_value = float(world.mean(loss))
            if not math.isfinite(loss_value):
                raise Diverged(_diverged_message(f"the loss became {loss_value} at step {step + 1}", path, r))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            ema = loss_value if ema is None else 0.9 * ema + 0.1 * loss_value
            if step == r.block_steps:  # the end-to-end stage's loss is another quantity
                ema = best_ema = None
            if step > r.block_steps + min(r.warmup_steps, (r.steps - r.block_steps) // 4) + 20:
                best_ema = ema if best_ema is None else min(best_ema, ema)
                if ema > 3 * best_ema:
                    raise Diverged(_diverged_message(f"the loss ran away at step {step} (smoothed {ema:.3g}, "
                                                     f"best {best_ema:.3g})", path, r))
            if step % every == 0 or step == r.steps or step == start + 1:
                curve.append({"step": step, "tokens": step * r.batch_tokens, "loss": float(f"{loss_value:.6g}"),
                              "stage": "blocks" if blockwise else "kl"})
            now = time.perf_counter()
            if step == start + 1 and note and not cuda:
                left = r.steps - step
                eta = (now - step_began) * left
                note(f"training on the CPU: one step of {r.batch_tokens:,} tokens took {now - step_began:.1f} s, "
                     f"so the remaining {left} step{'s' if left != 1 else ''} need{'s' if left == 1 else ''} about "
                     f"{_duration(eta)} (a GPU is far faster)")
            if steady_from is None and step - start >= min(3, r.steps - start):
                steady_from, steady_tokens = now, step * r.batch_tokens
            if progress:
                done_tokens = (step - start) * r.batch_tokens
                rate = done_tokens / (now - began)
                progress({"step": step, "steps": r.steps, "tokens": step * r.batch_tokens, "loss": loss_value,
                          "tokens_per_second": rate, "eta_seconds": (r.steps - step) * r.batch_tokens / rate})
            if step % r.checkpoint_every == 0 and step < r.steps:
                checkpoint.save(path, model, optimizer, step, curve, world, _extra(rollouts, step))
    except KeyboardInterrupt:
        if step > start:
            checkpoint.save(path, model, optimizer, step, curve, world, _extra(rollouts, step))  # a re-run resumes here
        raise
    seconds = time.perf_counter() - began
    tokens = (step - start) * r.batch_tokens
    steady_seconds = time.perf_counter() - steady_from if steady_from else 0.0
    steady = (step * r.batch_tokens - steady_tokens) / steady_seconds if steady_seconds > 0 else 0.0
    if step > start:
        checkpoint.save(path, model, optimizer, step, curve, world, _extra(rollouts, step))
    full_state = None
    if parallel == "fsdp":  # the sharded student cannot be exported: gather its trained weights on the main process
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                          ignore_frozen_params=True))
    student.eval()
    return TrainResult(
        steps=step, tokens=step * r.batch_tokens, seconds=round(seconds, 3),
        tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else 0.0,
        steady_tokens_per_second=round(steady, 1) if steady else round(tokens / seconds, 1) if seconds > 0 else 0.0,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        final_loss=round(loss_value, 6) if step > start else (curve[-1]["loss"] if curve else float("nan")),
        curve=curve, resumed_from_step=start, compiled=compiled, parallel=parallel, full_state=full_state,
        budget=budget, on_policy=rollouts.report() if rollouts is not None else None, teacher_states=states_report,
    )


def _extra(rollouts: Rollouts | None, step: int) -> dict:
    return rollouts.state(step) if rollouts is not None else {}


def _accumulate(ids, starts, micro: int, model, t_body, t_head, autocast, blockwise: bool = False,
                negatives=None, h_all: torch.Tensor | None = None) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of one batch; returns their
    mean loss (gradients are averaged over the processes on the last micro-batch).
    ``starts`` (on the CPU): each row's first scored position (None: all positions).
    ``negatives`` (on the CPU): the unlikelihood term's token at each position (-1: none).
    ``blockwise``: the block-wise reconstruction loss instead of the end-to-end divergence.
    ``h_all``: the teacher's final hidden states of ``ids``, held (None: the teacher runs)."""
    total = torch.zeros((), device=ids.device)
    n = ids.shape[0]
    firsts = list(range(0, n, micro))
    for b in firsts:
        chunk = ids[b : b + micro]
        part = None if starts is None else starts[b : b + micro]
        rows_start = part.to(ids.device, non_blocking=True) if part is not None and bool(part.any()) else None
        neg = None
        if negatives is not None and bool((negatives[b : b + micro] >= 0).any()):
            neg = negatives[b : b + micro].to(ids.device, non_blocking=True)
            if rows_start is None:
                rows_start = torch.zeros(chunk.shape[0], dtype=torch.long, device=ids.device)
        with distributed.no_sync(model, last=b == firsts[-1]):
            with autocast:
                with torch.no_grad():
                    if h_all is not None and not blockwise:
                        h_t = h_all[b : b + micro]
                    elif blockwise:
                        h_t = block_states(t_body, chunk)
                    else:
                        h_t = t_body(input_ids=chunk, use_cache=False).last_hidden_state
                loss = model(chunk, h_t, t_head, chunk.shape[0] / n, rows_start, neg)
            loss.backward()
        total += loss.detach()
    return total


def _diverged_message(what: str, path: Path, r: HealRecipe) -> str:
    kept = f"the last good checkpoint is kept in {path.parent}" if (path / checkpoint.PROGRESS).is_file() else "no checkpoint was written yet"
    return f"{what}; {kept}; lower --lr (now {r.lr:g}) and run again"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
