"""Block output matching: after a decoder block's projections are ternarized, fit its
remaining continuous parameters (the two RMSNorm gains and each ternary matrix's one
scale; the codes stay fixed) so that the block's output on the *quantized* model's hidden
states matches the *FP* model's output on its own hidden states (mean squared error, Adam).

This is norm tweaking (Li et al., 2023) extended to the per-matrix scales. The result is
still the transformers BitNet layout: RMSNorm gains are ordinary weights, and each scale
is the one ``weight_scale`` of its matrix. Because the target is the FP model's output,
each block also corrects part of the drift that earlier quantized blocks left in its input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class ScaledTernary(torch.nn.Module):
    """``y = x @ (exp(log_scale) * codes)^T``: a ternary matrix with a trainable scale."""

    def __init__(self, codes: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("codes", codes.float())
        self.log_scale = torch.nn.Parameter(torch.tensor(float(scale)).log().to(codes.device))

    @property
    def scale(self) -> float:
        return float(self.log_scale.detach().exp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.codes * self.log_scale.exp())


@dataclass(frozen=True)
class TuneResult:
    loss_before: float  # relative MSE of the block output before tuning
    loss_after: float
    steps: int


def tune(forward: Callable[[torch.Tensor], torch.Tensor], params: list[torch.nn.Parameter], inputs: torch.Tensor,
         targets: torch.Tensor, *, steps: int, lr: float = 1e-3, batch: int = 4, seed: int = 0) -> TuneResult:
    """Adam on ``params`` to minimize mean ||forward(inputs[b]) - targets[b]||^2 over
    mini-batches of sequences; returns the relative MSE on all data before and after.
    If the fit ends worse than it started, the starting parameters are restored."""
    gen = torch.Generator().manual_seed(seed)
    norm = float(targets.pow(2).mean())

    def full_loss() -> float:
        with torch.no_grad():
            return sum(float((forward(inputs[b : b + batch]) - targets[b : b + batch]).pow(2).sum())
                       for b in range(0, inputs.shape[0], batch)) / targets.numel() / norm

    before = full_loss()
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    n = inputs.shape[0]
    done = 0
    while done < steps:
        for idx in torch.randperm(n, generator=gen).split(batch):
            if done == steps:
                break
            with torch.enable_grad():
                loss = (forward(inputs[idx]) - targets[idx]).pow(2).mean() / norm
                opt.zero_grad()
                loss.backward()
            opt.step()
            done += 1
    after = full_loss()
    if after >= before:  # never make a block worse on its own data
        with torch.no_grad():
            for p, v in zip(params, start):
                p.copy_(v)
        after = before
    return TuneResult(before, after, done)
