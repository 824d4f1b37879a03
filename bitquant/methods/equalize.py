"""Equivalence transforms: per-channel scales that leave the FP model's function unchanged
but make its weights easier to ternarize (in the spirit of SmoothQuant and AWQ).

For a linear layer fed by ``X`` (``[n, in]``), multiplying weight column ``j`` by ``c_j``
and dividing input channel ``j`` by ``c_j`` computes the same output. The division is
folded into whatever produced ``X``, so the output stays in the transformers layout:

* the RMSNorm gain before q/k/v (one ``c`` shared by the three) and before gate/up;
* the rows of v_proj before o_proj (attention is linear in v; with grouped-query attention
  one ``c`` per v row is repeated over the query heads of its group);
* the rows of up_proj before down_proj (``act(gate) * up`` is linear in up).

Only the grid moves: ternarizing ``W diag(c)`` with one scale is ternarizing ``W`` with a
per-column step ``s / c_j`` (see :func:`search` for how ``c`` is parameterized). The
parameters are chosen from a grid to minimize the summed output error
(:func:`bitquant.methods.gptq.output_error`) of every matrix the scale touches, rounded
with absmean. ``c = 1`` (no transform) is always a candidate, so a transform is only
applied when it lowers that error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitquant.methods.gptq import output_error
from bitquant.ternary import absmean_roundtrip

ALPHAS = (0.0, 0.25, 0.5, 0.75)
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Scales:
    c: torch.Tensor  # float32 [channels]; consumers' columns are multiplied by it
    alpha: float
    beta: float
    error: float  # summed output error with these scales (absmean rounding)
    error_before: float  # the same with c = 1


def expand(c: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """One scale per v row -> one per o_proj input column (grouped-query attention: each kv
    head's scales repeated for the ``groups`` query heads that read it)."""
    if groups == 1:
        return c
    return c.view(-1, 1, head_dim).expand(-1, groups, head_dim).reshape(-1)


def reduce(stat: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`expand` for statistics: the mean over each kv head's query heads."""
    if groups == 1:
        return stat
    return stat.view(-1, groups, head_dim).mean(dim=1).reshape(-1)


def _column_magnitude(consumers, producers, groups: int, head_dim: int) -> torch.Tensor:
    """Mean |w| of each channel's consumer columns divided by its producer rows' (in the
    producers' row space), geometric-mean normalized."""
    cols = torch.stack([w.float().abs().mean(0) for w, _ in consumers]).mean(0) if consumers else None
    if cols is not None and head_dim and groups > 1:
        cols = reduce(cols, groups, head_dim)
    rows = torch.stack([w.float().abs().mean(1) for w, _ in producers]).mean(0) if producers else None
    mag = cols if rows is None else (rows.reciprocal() if cols is None else cols / rows)
    mag = mag.clamp(min=1e-12)
    return mag / mag.log().mean().exp()


def search(stat: torch.Tensor, consumers: list[tuple[torch.Tensor, torch.Tensor]],
           producers: list[tuple[torch.Tensor, torch.Tensor]] = (), *, groups: int = 1, head_dim: int = 0,
           alphas: tuple[float, ...] = ALPHAS, betas: tuple[float, ...] = BETAS) -> Scales:
    """Choose per-channel scales ``c`` for the shared input of ``consumers``.

    ``c = stat^alpha / m^beta`` (geometric mean 1), where ``stat`` is the mean |x| per
    channel, in the producers' row space (for v -> o: one per v row), and ``m`` the mean
    |w| of the channel's consumer columns over that of its producer rows: ``beta = 1``
    evens out the weights the one per-matrix scale must serve, ``alpha`` favours the
    channels the output depends on most. ``consumers``: ``(W, H)`` pairs whose columns
    are multiplied by ``c`` (expanded for grouped-query attention); ``producers``:
    ``(W, H)`` pairs whose rows are divided by ``c`` (v_proj, up_proj; none when the
    producer is an RMSNorm gain). ``H`` is each matrix's own input Hessian, and each
    matrix's error is relative to its own output, so the terms are comparable.
    """
    stat = stat.float().clamp(min=1e-8)
    mag = _column_magnitude(consumers, producers, groups, head_dim)
    best: Scales | None = None
    before = None
    for alpha in alphas:
        for beta in betas:
            c = stat.pow(alpha) / mag.pow(beta)
            c = c / c.log().mean().exp()
            cc = expand(c, groups, head_dim) if head_dim else c
            err = sum(output_error(w, absmean_roundtrip(w.float() * cc) / cc, h) for w, h in consumers)
            err += sum(output_error(w, absmean_roundtrip(w.float() / c[:, None]) * c[:, None], h) for w, h in producers)
            if alpha == 0 and beta == 0:
                before = err
            if best is None or err < best.error:
                best = Scales(c, alpha, beta, err, 0.0)
    return Scales(best.c, best.alpha, best.beta, best.error, before)


def scale_columns(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``W diag(c)``, in ``w``'s dtype (computed in float32)."""
    return (w.float() * c).to(w.dtype)


def scale_rows(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``diag(1/c) W`` (also for a bias or an RMSNorm gain: a 1-D ``w``), in ``w``'s dtype."""
    return (w.float() / (c[:, None] if w.dim() == 2 else c)).to(w.dtype)
