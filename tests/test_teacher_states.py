"""The teacher's hidden states, held: the same values as the teacher's forward pass, the
same trained weights as a run whose teacher runs every step, and held only where they fit."""

from __future__ import annotations

import torch

from bitquant.heal import heal
from bitquant.training import teacher_states
from bitquant.training.data import Batches
from test_heal import recipe, sha, source  # noqa: F401 (the fixture)
from conftest import tiny_config


def test_held_rows_are_the_teachers_forward_pass():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    g = torch.Generator().manual_seed(0)
    pools = [torch.randint(0, 96, (7, 16), generator=g), torch.randint(0, 96, (5, 16), generator=g)]
    batches = Batches(pools, [3, 2], seed=1)
    held = teacher_states.TeacherStates(model.get_decoder(), pools, 4, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert held.nbytes == 12 * 16 * model.config.hidden_size * 4
    for step in (0, 3):
        ids = batches.batch(step)
        with torch.no_grad():
            want = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        got = held.rows(batches.picks(step))
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_held_states_train_the_same_weights_as_the_teacher_every_step(source, tmp_path, monkeypatch):  # noqa: F811
    held = heal(str(source), tmp_path / "held", recipe=recipe(), device="cpu")
    assert held.heal["teacher_states"]["held"] is True and held.heal["teacher_states"]["bytes"] > 0
    monkeypatch.setenv("BITQUANT_TEACHER_STATES", "0")
    every = heal(str(source), tmp_path / "every", recipe=recipe(), device="cpu")
    assert every.heal["teacher_states"] == {"held": False, "bytes": held.heal["teacher_states"]["bytes"],
                                           "why": "BITQUANT_TEACHER_STATES=0"}
    a = [c["loss"] for c in held.heal["curve"]]
    b = [c["loss"] for c in every.heal["curve"]]
    assert len(a) == len(b) and all(abs(x - y) <= 1e-4 * abs(y) for x, y in zip(a, b))
    assert a[-1] < a[0]


def test_states_are_held_only_where_they_fit(monkeypatch):
    pools = [torch.zeros(64, 512, dtype=torch.long)]
    fits = teacher_states.plan(pools, 576, torch.device("cpu"), False)
    assert fits == {"held": True, "bytes": 64 * 512 * 576 * 4, "why": None}
    monkeypatch.setattr(teacher_states, "CPU_BYTES", 1 << 20)
    refused = teacher_states.plan(pools, 576, torch.device("cpu"), False)
    assert not refused["held"] and "would exceed the CPU's cap" in refused["why"]
    assert teacher_states.plan(pools, 576, torch.device("cpu"), True)["bytes"] == 64 * 512 * 576 * 2  # bf16 on CUDA
    assert not teacher_states.plan([], 576, torch.device("cpu"), False)["held"]
    once = teacher_states.plan(pools, 576, torch.device("cpu"), False, passes=[0.5])
    assert not once["held"] and "reads its data 0.5 times over" in once["why"]
    monkeypatch.setattr(teacher_states, "CPU_BYTES", 1 << 30)
    assert teacher_states.plan(pools, 576, torch.device("cpu"), False, passes=[1.0])["held"]
    on = teacher_states.plan(pools, 576, torch.device("cpu"), False, on_policy=True)
    assert on == {"held": False, "bytes": 0, "why": "on-policy rows go through the teacher every step"}
    low = teacher_states.plan(pools, 576, torch.device("cpu"), False, low_memory=True)
    assert not low["held"] and low["why"] == "the low-memory road keeps the memory for training"
    monkeypatch.setattr(teacher_states, "CPU_BYTES", 1 << 20)  # too big too: the road's own reason is the one given
    low = teacher_states.plan(pools, 576, torch.device("cpu"), False, low_memory=True)
    assert low["why"] == "the low-memory road keeps the memory for training"
