"""Error feedback while rounding onto the ternary grid (GPTQ, Frantar et al. 2022).

Columns of ``W [out, in]`` are rounded one at a time to ``s * {-1, 0, +1}``; the rounding
error of each column is spread over the columns not yet rounded, weighted by the inverse
of the calibration Hessian ``H = X^T X / n``, so that the layer's *output* on the
calibration inputs moves as little as possible (the optimal-brain-surgeon update).

Scale convention: as :mod:`bitquant.ternary`, ``W ~ s * codes`` with one float32 ``s``
per matrix, so the result packs into the transformers BitNet layout unchanged. ``s`` is
not the absmean here: a few candidate scales are tried, and the one kept is refitted in
closed form to the final codes, ``s = <W H, Q> / <Q H, Q>`` (the least-squares scale of
the layer output), then the rounding is repeated with it.

Pure functions of tensors; they run on whatever device the tensors are on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitquant.ternary import ternarize

#: Multiples of mean|W| tried as the starting scale.
SCALE_FACTORS = (0.8, 1.0, 1.25, 1.5)


@dataclass(frozen=True)
class GptqResult:
    codes: torch.Tensor  # int8 [out, in], values in {-1, 0, 1}
    scale: float  # s: W ~ s * codes
    output_error: float  # tr(dW H dW^T) / tr(W H W^T) on the calibration Hessian
    absmean_output_error: float  # the same for plain absmean rounding, for the report


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Relative squared error of the layer output, tr(dW H dW^T) / tr(W H W^T)."""
    w = w.float()
    d = w - w_hat.float()
    den = float(((w @ h) * w).sum())
    return float(((d @ h) * d).sum()) / den if den > 0 else 0.0


def fit_scale(w: torch.Tensor, codes: torch.Tensor, h: torch.Tensor) -> float:
    """The s minimizing tr((W - sQ) H (W - sQ)^T): <W H, Q> / <Q H, Q> (> 0)."""
    q = codes.float()
    qh = q @ h
    den = float((qh * q).sum())
    if den <= 0:
        return float(w.float().abs().mean().clamp(min=1e-8))
    s = float((qh * w.float()).sum()) / den
    return s if s > 0 else float(w.float().abs().mean().clamp(min=1e-8))


def dampen(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I, with dead inputs (zero diagonal) given a unit diagonal."""
    h = h.float().clone()
    diag = torch.diagonal(h)
    diag[diag <= 0] = 1.0
    diag += damp * float(diag.mean())
    return h


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, as GPTQ uses it."""
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def round_with_feedback(w: torch.Tensor, hinv_u: torch.Tensor, scale: float, block: int = 128) -> torch.Tensor:
    """GPTQ rounding of ``w`` (float32, in the Hessian's column order) to ``scale * {-1,0,1}``.
    ``hinv_u`` is the upper Cholesky factor of the damped H^-1. Returns int8 codes."""
    w = w.clone()
    out, cols = w.shape
    codes = torch.empty((out, cols), dtype=torch.int8, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2]
        err1 = torch.empty_like(w1)
        hb = hinv_u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.round(col / scale).clamp_(-1, 1)
            codes[:, i1 + i] = q.to(torch.int8)
            e = (col - scale * q) / hb[i, i]
            w1[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv_u[i1:i2, i2:]
    return codes


def ternary_gptq(w: torch.Tensor, h: torch.Tensor, *, damp: float = 0.01, eps: float = 1e-5,
                 refits: int = 2, block: int = 128) -> GptqResult:
    """Ternarize ``w [out, in]`` with error feedback against the Hessian ``h [in, in]``.

    Columns are processed in order of decreasing ``diag(H)`` (GPTQ's "act order"). Each
    candidate scale in :data:`SCALE_FACTORS` x mean|W| is rounded once; the best is then
    refitted to its codes and rounded again ``refits`` times. The result never has a
    larger output error than plain absmean rounding: if it would, absmean's is returned.
    """
    w32 = w.float()
    h = h.float().to(w32.device)
    hd = dampen(h, damp)
    perm = torch.argsort(torch.diagonal(hd), descending=True)
    inv = torch.argsort(perm)
    hinv_u = _inverse_cholesky(hd[perm][:, perm])
    wp = w32[:, perm]
    base = max(float(w32.abs().mean()), eps)

    absmean_codes = ternarize(w32, base)
    absmean_err = output_error(w32, base * absmean_codes.float(), h)

    def attempt(s: float) -> tuple[float, torch.Tensor, float]:
        codes = round_with_feedback(wp, hinv_u, s, block)[:, inv]
        s_fit = max(fit_scale(w32, codes, h), eps)
        return output_error(w32, s_fit * codes.float(), h), codes, s_fit

    best = min((attempt(f * base) for f in SCALE_FACTORS), key=lambda r: r[0])
    for _ in range(refits):
        trial = attempt(best[2])
        if trial[0] >= best[0]:
            break
        best = trial
    err, codes, s = best
    if err > absmean_err:
        err, codes, s = absmean_err, absmean_codes, base
    return GptqResult(codes.contiguous(), float(s), err, absmean_err)
