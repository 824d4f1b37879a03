"""BitNet b1.58 "absmean" ternarization: tensor in, tensor out.

Scale convention (used everywhere in bitquant):

    s  = max(mean(|W|), eps)              computed in float32 whatever W's dtype
    Wq = clamp(round(W / s), -1, 1)       int8 codes in {-1, 0, +1}, round half to even
    W  ~ s * Wq                           the dequantized weight

``s`` is the *multiplier* that takes codes back to weights. The transformers BitNet layout
stores its reciprocal (``weight_scale = 1/s``, because ``BitLinear`` divides by it); that
inversion happens only in :mod:`bitquant.formats.hf_bitnet`, never here.

No I/O, no printing: everything here is a pure function of its tensor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitquant.errors import TensorError

#: Lower bound on the scale, as in transformers and onebitllms. An all-zero matrix gets
#: s = eps (its codes are all zero either way) and the report says it was clamped.
DEFAULT_EPS = 1e-5

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class TernaryTensor:
    """The result of ternarizing one matrix."""

    codes: torch.Tensor  # int8, same shape as the input, values in {-1, 0, 1}
    scale: float  # s, the float32 absmean (after the eps clamp), as a Python float
    scale_clamped: bool  # True when mean|W| < eps and s was raised to eps
    zero_fraction: float  # share of codes that are 0
    relative_error: float  # ||W - s*Wq|| / ||W|| (0.0 for an all-zero W)


def check_float(w: torch.Tensor, name: str) -> None:
    """Raise a :class:`TensorError` unless ``w`` is a floating-point tensor."""
    if w.dtype not in _FLOAT_DTYPES:
        raise TensorError(
            f"tensor {name!r} has dtype {str(w.dtype).replace('torch.', '')}, not a float type; "
            "bitquant quantizes FP16/BF16/FP32 checkpoints only"
        )


def mean_abs(w: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Return mean|W| as a 0-d float32 tensor (no eps clamp).

    The mean is accumulated in float32 (see FORMATS.md section 4: a float32 L1 norm via
    ``linalg.vector_norm`` is off by several percent on large matrices; this is not).
    A NaN or Inf anywhere in ``w`` makes the mean non-finite, so one check on the result
    detects bad weights without another pass over the matrix.
    """
    check_float(w, name)
    if w.numel() == 0:
        raise TensorError(f"tensor {name!r} is empty; nothing to quantize")
    mean = _mean_abs(w)
    if not torch.isfinite(mean):
        raise TensorError(
            f"tensor {name!r} contains NaN or Inf values; fix or re-export the checkpoint"
        )
    return mean


def _mean_abs(w: torch.Tensor) -> torch.Tensor:
    return w.abs().mean(dtype=torch.float32)


def absmean_scale(w: torch.Tensor, eps: float = DEFAULT_EPS, name: str = "weight") -> torch.Tensor:
    """Return s = max(mean|W|, eps) as a 0-d float32 tensor (checked: see :func:`mean_abs`)."""
    return torch.clamp(mean_abs(w, name), min=eps)


def absmean(w: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """s = max(mean|W|, eps) as a 0-d float32 tensor on ``w``'s device: :func:`absmean_scale`
    without its checks, so it never waits for the device (training calls it every step)."""
    return torch.clamp(_mean_abs(w), min=eps)


def inverse_scale(scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """1/s rounded to ``dtype`` (through float64), as layouts that divide by their
    ``weight_scale`` store it. Same shape as ``scale``."""
    return torch.as_tensor(scale, dtype=torch.float64).reciprocal().to(dtype)


#: 8-bit per-token activation quantization (W1.58A8): q = clamp(round(x * 127 / max|x|), -128, 127).
ACT_QMAX = 127.0
ACT_EPS = 1e-5


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax 8-bit quantization over the last dimension, in ``x``'s dtype.

    Returns ``(q, scale)``: ``q`` holds integers in [-128, 127] and ``x ~ q / scale`` with
    ``scale = 127 / max(max|x|, 1e-5)``, as transformers' ``BitLinear`` computes it.
    """
    scale = ACT_QMAX / x.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)
    q = (x * scale).round().clamp(-ACT_QMAX - 1, ACT_QMAX)
    return q, scale


def ternarize(w: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Return int8 codes clamp(round(W / s), -1, 1), with the division done in float32."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    return torch.round(w.to(torch.float32) / s).clamp_(-1, 1).to(torch.int8)


def relative_error(w: torch.Tensor, codes: torch.Tensor, scale: float) -> float:
    """||W - s*Wq|| / ||W||, accumulated in float64 to stay accurate on large matrices."""
    w64 = w.to(torch.float64)
    norm = torch.linalg.vector_norm(w64)
    if norm == 0:
        return 0.0
    diff = w64 - scale * codes.to(torch.float64)
    return float(torch.linalg.vector_norm(diff) / norm)


def relative_error_from_sums(w_norm2: float, w_dot_codes: float, nnz: float, scale: float) -> float:
    """||W - s*Q|| / ||W|| from ||W||^2, <W,Q> and nnz(Q) (= ||Q||^2 for ternary Q):
    ||W - sQ||^2 = ||W||^2 - 2s<W,Q> + s^2 nnz(Q). 0.0 for an all-zero W."""
    if w_norm2 <= 0:
        return 0.0
    err2 = w_norm2 - 2 * scale * w_dot_codes + scale * scale * nnz
    return (max(err2, 0.0) / w_norm2) ** 0.5


def zero_fraction(codes: torch.Tensor) -> float:
    """Share of zero codes."""
    return float((codes == 0).sum()) / codes.numel()


def quantize_absmean(w: torch.Tensor, eps: float = DEFAULT_EPS, name: str = "weight") -> TernaryTensor:
    """Ternarize one weight matrix with the BitNet b1.58 absmean recipe.

    The reference implementation (the fast path for FP16/BF16 is :mod:`bitquant.kernels`).
    The reconstruction error comes from float64 dot products,
    ||W - sQ||^2 = ||W||^2 - 2s<W,Q> + s^2 nnz(Q), so no error matrix is materialized.
    """
    check_float(w, name)
    w32 = w.to(torch.float32)
    mean = mean_abs(w32, name)
    s = torch.clamp(mean, min=eps)
    q = torch.round(w32 / s).clamp_(-1, 1)
    flat_q = q.reshape(-1)
    nnz = int(torch.count_nonzero(flat_q))
    w64 = w32.reshape(-1).to(torch.float64)  # statistics in float64, like the fused kernel
    scale = float(s)
    rel = relative_error_from_sums(float(torch.dot(w64, w64)), float(torch.dot(w64, flat_q.to(torch.float64))), nnz, scale)
    return TernaryTensor(
        codes=q.to(torch.int8),
        scale=scale,
        scale_clamped=bool(mean < eps),
        zero_fraction=1.0 - nnz / q.numel(),
        relative_error=rel,
    )


def absmean_roundtrip(w: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``s * clamp(round(W / s), -1, 1)`` with s the absmean scale, in float32: what the
    default recipe turns ``w`` into (for measuring its effect, not for storing)."""
    s = absmean_scale(w, eps)
    return s * ternarize(w, s).to(torch.float32)


def dequantize(codes: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s * Wq in ``dtype``."""
    return (codes.to(torch.float32) * scale).to(dtype)


def ternary_values(w: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """``(codes, c)`` when every value of ``w`` is -c, 0 or +c for one c > 0 (a matrix that
    is already ternary, e.g. dequantized codes), else ``None``.

    absmean would give such a matrix the scale c x (share of non-zeros), not c; the codes
    are ``sign(w)`` and c is kept exactly. The first 4,096 values are checked before the
    whole matrix, so an ordinary weight costs one short test.
    """
    if w.numel() == 0 or not w.is_floating_point():
        return None
    flat = w.reshape(-1)
    head = flat[:4096].abs()
    c = head.amax()
    if c == 0:  # the first values are all zero: c comes from the rest
        c = flat.abs().amax()
    if c == 0 or not torch.isfinite(c) or not bool(((head == 0) | (head == c)).all()):
        return None
    a = flat.abs()
    if not bool(((a == 0) | (a == c)).all()):
        return None
    return torch.sign(w).to(torch.int8), float(c)
