"""heal's time budget (bitquant/training/budget.py): the step count a probe says fits, kept
for a resumed run, and a one-line refusal when not one step fits. A fake clock, so that
nothing here depends on how fast this machine is."""

import json
from types import SimpleNamespace

import pytest
import torch

from bitquant.errors import UsageError
from bitquant.training import budget
from bitquant.training.distributed import World
from bitquant.training.recipe import load_heal_recipe


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(budget, "time", SimpleNamespace(monotonic=c, perf_counter=c))
    return c


def probe(clock, seconds):
    """A training step that takes ``seconds[k]`` on the fake clock at its k-th call."""
    calls = []

    def run_batch(k):
        calls.append(k)
        clock.now += seconds[k]
        return torch.tensor(1.0)

    return run_batch, calls


OPTIMIZER = SimpleNamespace(zero_grad=lambda set_to_none=True: None)


def test_the_probe_sizes_the_run_and_the_count_is_kept(clock, tmp_path):
    r = load_heal_recipe().replace(time_budget=120, batch_tokens=4096)
    run_batch, calls = probe(clock, [5.0, 2.0, 2.5])  # the first step compiles; the fastest other one counts
    saved = tmp_path / budget.BUDGET
    got = budget.fit_to_deadline(clock.now + 100, saved, run_batch, OPTIMIZER, r, World())
    assert calls == list(range(budget.PROBE_STEPS))
    assert got["steps"] == 45  # (100 - 9.5 s of probing) / 2 s a step
    assert got["tokens"] == 45 * 4096 and got["probe_tokens_per_second"] == 2048.0
    assert json.loads(saved.read_text()) == got
    # a resumed run takes the kept count, whatever the clock says now
    run_again, again = probe(clock, [100.0] * 3)
    assert budget.fit_to_deadline(clock.now + 1, saved, run_again, OPTIMIZER, r, World()) == got and not again


def test_a_budget_without_room_for_one_step_is_one_line(clock, tmp_path):
    r = load_heal_recipe().replace(time_budget=30)
    run_batch, calls = probe(clock, [1.0, 8.0, 8.0])
    with pytest.raises(UsageError, match=r"^--time 30s leaves no time to train: .* give a longer --time or a --tokens count$"):
        budget.fit_to_deadline(clock.now + 20, tmp_path / budget.BUDGET, run_batch, OPTIMIZER, r, World())
    assert not (tmp_path / budget.BUDGET).exists()
    with pytest.raises(UsageError, match="about 5 s short"):  # the deadline passed before the probe
        budget.fit_to_deadline(clock.now - 5, tmp_path / budget.BUDGET, run_batch, OPTIMIZER, r, World())
    assert len(calls) == 3
