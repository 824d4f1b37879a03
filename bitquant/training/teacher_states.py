"""The teacher's final hidden states of heal's data, computed once and held.

heal reads its data pools (teacher samples, text) many times over: the bundled run makes
22.8 passes over 4,194,304 sampled tokens. The teacher is frozen, so its final hidden
states for a sequence are the same at every pass, and computing them is the teacher's
whole forward pass through its decoder, every step. Held on the device (bf16 under CUDA
autocast: 4.8 GB for SmolLM2's 4.2M tokens), they replace that pass by a gather; the
teacher's head is applied in the loss as before, so the loss is the same quantity.

They are computed in micro-batches of the run's own size, in pool order, before the first
step (and again, identically, by a resumed run). Built only where they fit
(:func:`plan`): at most :data:`GPU_SHARE` of the free GPU memory, :data:`CPU_BYTES` on the
CPU, and only when the run reads every pool at least once over.
``BITQUANT_TEACHER_STATES=0`` turns them off (the teacher then runs every step, as
before); on-policy rows, which are new every rollout, always go through the teacher.
"""

from __future__ import annotations

import os
import time

import torch

#: At most this share of the GPU's free memory (measured after loading both models) is held.
GPU_SHARE = 0.25
#: At most this many bytes on the CPU.
CPU_BYTES = 1 << 30


def plan(pools: list[torch.Tensor], hidden: int, device: torch.device, cuda_autocast: bool,
         passes: list[float] | None = None, *, on_policy: bool = False, low_memory: bool = False) -> dict:
    """Whether the states of ``pools`` ([sequences, seq_len] each) are held, and why not:
    ``{"held": bool, "bytes": int, "why": str | None}``. ``passes``: how many times the run
    reads each pool; below one pass, computing a whole pool costs more than it saves.
    ``on_policy``: the run writes rows of its own, which the teacher must see every step;
    ``low_memory``: the low-memory road, taken because memory is short, keeps it for training."""
    if on_policy:
        return {"held": False, "bytes": 0, "why": "on-policy rows go through the teacher every step"}
    tokens = sum(p.numel() for p in pools)
    nbytes = tokens * hidden * (2 if cuda_autocast else 4)
    if os.environ.get("BITQUANT_TEACHER_STATES", "auto") == "0":
        return {"held": False, "bytes": nbytes, "why": "BITQUANT_TEACHER_STATES=0"}
    if not tokens:
        return {"held": False, "bytes": 0, "why": "no data pools (every row is written on-policy)"}
    if passes and min(passes) < 1:
        return {"held": False, "bytes": nbytes, "why": f"the run reads its data {min(passes):.2g} times over: "
                                                       "computing every sequence's states once would cost more than it saves"}
    if low_memory:
        return {"held": False, "bytes": nbytes, "why": "the low-memory road keeps the memory for training"}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cap, where = int(GPU_SHARE * free), f"{GPU_SHARE:.0%} of the GPU's free memory"
    else:
        cap, where = CPU_BYTES, "the CPU's cap"
    if nbytes > cap:
        return {"held": False, "bytes": nbytes, "why": f"{nbytes / 2**30:.1f} GiB would exceed {where} "
                                                       f"({cap / 2**30:.1f} GiB); the teacher runs every step"}
    return {"held": True, "bytes": nbytes, "why": None}


class TeacherStates:
    """The teacher's final hidden states of every sequence of ``pools``, on ``device``."""

    def __init__(self, body, pools: list[torch.Tensor], micro: int, device: torch.device, autocast):
        began = time.perf_counter()
        self.states: list[torch.Tensor] = []
        with torch.no_grad():
            for pool in pools:  # each written into one tensor in place: never held twice
                held = None
                for b in range(0, len(pool), micro):
                    ids = pool[b : b + micro].to(device, non_blocking=True)
                    with autocast:
                        h = body(input_ids=ids, use_cache=False).last_hidden_state
                    if held is None:
                        held = torch.empty((len(pool), *h.shape[1:]), dtype=h.dtype, device=h.device)
                    held[b : b + len(h)] = h
                self.states.append(held if held is not None else torch.empty(0))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds = time.perf_counter() - began
        self.nbytes = sum(s.numel() * s.element_size() for s in self.states)

    def rows(self, picks: list[tuple[int, int]]) -> torch.Tensor:
        """[len(picks), seq_len, hidden]: the states of the (pool, row) ``picks``, in order."""
        by_pool: dict[int, list[int]] = {}
        for k, (pool, _) in enumerate(picks):
            by_pool.setdefault(pool, []).append(k)
        first = self.states[picks[0][0]]
        out = torch.empty((len(picks), *first.shape[1:]), dtype=first.dtype, device=first.device)
        for pool, where in by_pool.items():
            index = torch.tensor([picks[k][1] for k in where], device=first.device)
            out[torch.tensor(where, device=first.device)] = self.states[pool].index_select(0, index)
        return out

    def report(self) -> dict:
        return {"held": True, "bytes": self.nbytes, "seconds": round(self.seconds, 2)}
