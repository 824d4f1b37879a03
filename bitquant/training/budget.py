"""heal's time budget (recipe ``time_budget``, ``--time``): how many training steps fit
before a deadline, from a short probe of the training step as it will run (compiled, with
the on-policy writing it will do), kept in the state folder so that a resumed run trains
the same count; and the message for a budget too short for one step."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bitquant.errors import UsageError
from bitquant.training.distributed import World
from bitquant.training.on_policy import Rollouts
from bitquant.training.recipe import HealRecipe

#: Forward and backward passes timed (after a first one that compiles) to fit a time budget.
PROBE_STEPS = 3
#: The chosen token count, in the state folder (a resumed run keeps it).
BUDGET = "budget.json"


def fit_to_deadline(deadline: float, saved: Path, run_batch: Callable[[int], torch.Tensor], optimizer,
                     r: HealRecipe, world: World, rollouts: Rollouts | None = None) -> dict:
    """The token count that fits before ``deadline``: from ``saved`` (a resumed run), or
    from a probe of ``PROBE_STEPS`` forward and backward passes whose gradients are thrown
    away (the first one compiles; the others are timed). With on-policy steps, the first
    rollout (which step 0 trains on) is timed too and its share added to each step; when
    on-policy steps start later (``on_policy_start``), a rollout written only to be timed,
    its share spread over the steps that will have one."""
    if saved.is_file():
        return json.loads(saved.read_text(encoding="utf-8"))
    left = deadline - time.monotonic()
    if left <= 0:
        raise UsageError(no_time(r, -left))
    rollout = 0.0
    if rollouts is not None and r.on_policy_start > 0:  # the first rollout comes later: time one, keep none
        rollout = rollouts.warm_up(PROBE_STEPS) / r.on_policy_every * (1 - r.on_policy_start)
    elif rollouts is not None:
        rollouts.batch(0)  # builds the writer (its graph) and writes rollout 0 with the untrained weights
        rollout = rollouts.seconds / r.on_policy_every
    times = []
    for k in range(PROBE_STEPS):
        began = time.perf_counter()
        loss = world.mean(run_batch(k))
        float(loss)  # waits for the device
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    per_step = max(min(times[1:]), 1e-6) + rollout
    fits = torch.tensor((deadline - time.monotonic()) / per_step, dtype=torch.float64, device=loss.device)
    steps = int(world.mean(fits))  # under a launcher every process takes the same count
    if steps < 1:
        raise UsageError(no_time(r, per_step - (deadline - time.monotonic())))
    budget = {"seconds": r.time_budget, "probe_seconds_per_step": round(per_step, 4),
              "probe_tokens_per_second": round(r.batch_tokens / per_step, 1), "steps": steps,
              "tokens": steps * r.batch_tokens}
    if world.main:
        saved.write_text(json.dumps(budget), encoding="utf-8")
    return budget


def no_time(r: HealRecipe, short: float) -> str:
    """The message for a time budget that cannot fit one training step."""
    return (f"--time {r.time_budget:g}s leaves no time to train: one step of {r.batch_tokens:,} tokens does not fit "
            f"(about {short:.0f} s short, after loading, sampling and the time kept for export and evaluation); "
            f"give a longer --time or a --tokens count")
