"""heal's divergences between the teacher's and the student's next-token distributions,
from final hidden states and output heads, without ever holding a batch's logits whole.

Three divergences (recipe ``loss``), each at a ``temperature`` T (both models' logits
divided by T), with p the teacher's distribution and q the student's:

* ``forward_kl``: KL(p ‖ q), mass-covering (today's default);
* ``reverse_kl``: KL(q ‖ p), mode-seeking (MiniLLM);
* ``jsd``: the generalized Jensen-Shannon divergence of GKD with weight β:
  β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = β p + (1 − β) q, for 0 < β < 1.

These are liger-kernel's and TRL's conventions (β = 0 and β = 1 are named as the two KLs).

An optional **unlikelihood** term (Welleck et al., arXiv 1908.04319) is added on the rows
given a ``negative`` token: α · −log(1 − q(negative)), the student pushed away from a
token it should not have written (on-policy rows: the token that repeats an n-gram its own
text already holds, :func:`repeated`). It is summed with the divergence and averaged over
all rows alike; only :func:`chunked` computes it.

Two implementations of the same quantity:

* :func:`chunked` (pure torch, any device): rows are taken ``chunk`` at a time, both
  models' logits are formed for those rows, the chunk's divergence is summed and its
  gradient with respect to the student's logits is formed on the spot and pushed through
  the student's head; the backward pass only scales those stored gradients. Rows per chunk
  keep a chunk's float32 logits near ``budget`` values whatever the vocabulary. On CUDA each
  chunk's softmaxes, divergence and gradient are one ``torch.compile``d function
  (:func:`_logit_terms`) over the bf16 logits, with no float32 copies; a trained head
  (``train: [..., embeddings]``) takes the same road, its gradient formed from each chunk's
  (only the unlikelihood term keeps the eager chunks).
* liger-kernel's ``LigerFusedLinearJSD`` (Triton, CUDA only, when ``liger-kernel`` is
  installed): the same computation with the per-element divergence and gradient fused in
  one kernel. ``bench/heal_loss.py`` on an H100 (SmolLM2's head, 32,768 rows, the head not
  trained), milliseconds per forward and backward: eager chunks 95.9 / 88.0 / 160.7
  (forward KL / reverse KL / JSD), compiled chunks 30.9 / 27.0 / 28.0, liger 105.7 / 105.9 /
  106.7. So :func:`divergence` takes the compiled chunks for all three, and liger only with
  ``BITQUANT_FUSED_LOSS=1`` (on an H200 before the chunks were compiled, liger had been
  1.30x the eager chunks for the JSD, and heal took it there).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from bitquant.errors import describe

#: Float32 logits held per chunk (per model): 2^26 values = 256 MiB.
DEFAULT_BUDGET = 1 << 26

KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class Divergence:
    """Which divergence, its JSD weight ``beta`` (``jsd`` only) and its ``temperature``."""

    kind: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0

    @property
    def mix(self) -> float:
        """β in liger-kernel's convention: 0 is the forward KL, 1 the reverse KL."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.kind, self.beta)

    def label(self) -> str:
        what = f"jsd(beta={self.beta:g})" if self.kind == "jsd" else self.kind
        return what + (f", T={self.temperature:g}" if self.temperature != 1 else "")


FORWARD_KL = Divergence()


def _rows_terms(logp: torch.Tensor, logq: torch.Tensor, mix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence (float64 sum over the chunk) and d(divergence)/d(student logits at
    temperature 1), from float32 log-probabilities of teacher (``logp``) and student
    (``logq``). Overwrites ``logq``'s memory where it can."""
    if mix == 0.0:  # forward KL: sum p (log p - log q); gradient q - p
        p = logp.exp()
        total = (p * (logp - logq)).sum(dtype=torch.float64)
        return total, logq.exp_().sub_(p)
    q = logq.exp()
    if mix == 1.0:  # reverse KL: sum q (log q - log p); gradient q (f - sum q f), f = log q - log p
        f = logq.sub_(logp)
        row = (q * f).sum(-1, keepdim=True)
        return row.sum(dtype=torch.float64), f.sub_(row).mul_(q)
    # generalized JSD: m = mix p + (1 - mix) q, in log space
    logm = torch.logaddexp(logp + math.log(mix), logq + math.log1p(-mix))
    p = logp.exp()
    total = (mix * (p * (logp - logm)).sum(dtype=torch.float64)
             + (1 - mix) * (q * (logq - logm)).sum(dtype=torch.float64))
    g = logq.sub_(logm).mul_(1 - mix)  # d/dq, up to a constant the softmax removes
    return total, g.sub_((q * g).sum(-1, keepdim=True)).mul_(q)


#: 1 − q is held at least this far from 0 in the unlikelihood term (as in Welleck et al.'s code).
UL_FLOOR = 1e-5


def _unlikelihood(logq: torch.Tensor, negative: torch.Tensor, alpha: float):
    """For the rows with a negative token (≥ 0): the rows, α · −log(1 − q_c) summed (float64),
    and d/d(logits) of it, α q_c / (1 − q_c) · (e_c − q). None when no row has one. Reads
    ``logq`` (before :func:`_rows_terms` overwrites it)."""
    sel = (negative >= 0).nonzero().squeeze(1)
    if not len(sel):
        return None
    c = negative[sel]
    q = logq[sel].exp()
    qc = q.gather(1, c[:, None]).squeeze(1)
    rest = (1 - qc).clamp_min(UL_FLOOR)
    total = -alpha * rest.log().sum(dtype=torch.float64)
    coef = alpha * qc / rest
    g = q.mul_(-coef[:, None])
    g[torch.arange(len(sel), device=g.device), c] += coef
    return sel, total, g


def _logit_terms(lt: torch.Tensor, ls: torch.Tensor, mix: float, temperature: float, scale: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's divergence (float64 sum) and d(mean divergence)/d(student logits) in
    ``dtype``, from both models' logits ``lt``, ``ls`` (any float dtype); ``scale`` (a 0-d
    tensor) is 1 / (rows of the batch x T). What :func:`_compiled_terms` compiles."""
    logp = torch.log_softmax(lt.float() / temperature, dim=-1)
    logq = torch.log_softmax(ls.float() / temperature, dim=-1)
    total, g = _rows_terms(logp, logq, mix)
    return total, g.mul_(scale).to(dtype)


#: Set when the compiled chunk failed here once: the eager chunk is used from then on.
_COMPILED_FAILED: list[str] = []
_COMPILED: list = []


def compiled_available(device: torch.device | str) -> bool:
    """True where :func:`chunked` runs each chunk's softmaxes, divergence and gradient as one
    ``torch.compile``d function (a few fused kernels over the bf16 logits, no float32 copies):
    CUDA by default (``BITQUANT_COMPILED_LOSS=1``: every device; ``0``: never)."""
    choice = os.environ.get("BITQUANT_COMPILED_LOSS", "auto")
    if choice == "0" or _COMPILED_FAILED:
        return False
    return choice == "1" or torch.device(device).type == "cuda"


def _compiled_terms():
    if not _COMPILED:
        _COMPILED.append(torch.compile(_logit_terms, dynamic=None))
    return _COMPILED[0]


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, rows: int, mix: float, temperature: float, negative=None,
                alpha: float = 0.0):
        n = h_s.shape[0]
        grad_h = torch.empty_like(h_s)
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float64, device=h_s.device)
        done = False
        if (negative is None or alpha == 0) and n and compiled_available(h_s.device):
            try:
                _compiled_chunks(h_s, w_s, h_t, w_t, rows, mix, temperature, grad_h, total, grad_w)
                done = True
            except Exception as e:  # a compiler that fails here: the eager chunks from now on
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                _COMPILED_FAILED.append(describe(e))
                total.zero_()
                if grad_w is not None:
                    grad_w.zero_()
        if not done:  # the eager chunks
            for b in range(0, n, rows):
                hs, ht = h_s[b : b + rows], h_t[b : b + rows]
                logp = torch.log_softmax((ht @ w_t.T).float() / temperature, dim=-1)
                logq = torch.log_softmax((hs @ w_s.T).float() / temperature, dim=-1)
                ul = None if negative is None or alpha == 0 else _unlikelihood(logq, negative[b : b + rows], alpha)
                part, g = _rows_terms(logp, logq, mix)
                del logp
                total += part
                if ul is not None:
                    total += ul[1]
                    g[ul[0]] += ul[2]
                g = g.div_(n * temperature)  # d(mean divergence)/d(student logits)
                grad_h[b : b + rows] = g.to(w_s.dtype) @ w_s
                if grad_w is not None:
                    grad_w.addmm_(g.T, hs.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        return (total / max(n, 1)).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype)
        return grad_h * grad_out.to(grad_h.dtype), gw, None, None, None, None, None, None, None


def _compiled_chunks(h_s, w_s, h_t, w_t, rows: int, mix: float, temperature: float, grad_h: torch.Tensor,
                     total: torch.Tensor, grad_w: torch.Tensor | None = None) -> None:
    """:class:`_Chunked`'s loop with each chunk's terms compiled (no unlikelihood term): fills
    ``grad_h``, adds the divergence's sum to ``total`` and, where the head is trained, each
    chunk's head gradient to the float32 ``grad_w`` (formed in the logits' dtype, as the
    matmuls of mixed-precision training are)."""
    n = h_s.shape[0]
    terms = _compiled_terms()
    cuda_autocast = h_s.device.type == "cuda" and torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda") if cuda_autocast else w_s.dtype  # what the matmul below takes
    scale = torch.tensor(1.0 / (n * temperature), dtype=torch.float32, device=h_s.device)
    w_back = w_s.to(dtype)
    for b in range(0, n, rows):
        hs = h_s[b : b + rows]
        part, g = terms(h_t[b : b + rows] @ w_t.T, hs @ w_s.T, mix, temperature, scale, dtype)
        total += part
        grad_h[b : b + rows] = g @ w_back
        if grad_w is not None:
            grad_w += g.T @ hs.to(dtype)


def chunk_rows(vocab: int, budget: int = DEFAULT_BUDGET) -> int:
    return max(1, budget // vocab)


def chunked(h_student: torch.Tensor, head_student: torch.Tensor, h_teacher: torch.Tensor, head_teacher: torch.Tensor,
            div: Divergence = FORWARD_KL, budget: int = DEFAULT_BUDGET, negative: torch.Tensor | None = None,
            alpha: float = 0.0) -> torch.Tensor:
    """Mean over rows of the divergence ``div`` between softmax(h_t W_t^T / T) and
    softmax(h_s W_s^T / T), in nats, in chunks of rows (pure torch).

    ``h_*``: [rows, hidden] final hidden states (after the final norm); ``head_*``: the
    output heads, [vocab, hidden]. Gradients flow to ``h_student`` and, if it requires
    them, to ``head_student``; the teacher's inputs are constants. ``negative`` ([rows],
    a token id or -1) with ``alpha`` > 0 adds the unlikelihood term on the rows that have one."""
    rows = chunk_rows(head_student.shape[0], budget)
    return _Chunked.apply(h_student, head_student, h_teacher.detach(), head_teacher.detach(), rows, div.mix,
                          div.temperature, negative, alpha)


#: Set when liger-kernel's kernel failed here once: the chunked loop is used from then on.
_FUSED_FAILED: list[str] = []
#: Divergences for which the fused kernel measured faster than the chunked loop: none since the
#: chunks are compiled (bench/heal_loss.py, H100, 2026-12-07: 3.8x slower for the JSD).
FUSED_FASTER: tuple[str, ...] = ()


def fused_available(device: torch.device | str, div: Divergence | None = None) -> bool:
    """True where :func:`divergence` takes liger-kernel's fused kernel for ``div``: CUDA,
    liger-kernel installed (and working here), and the divergence one it measured faster for
    (``BITQUANT_FUSED_LOSS=1``: any; ``0``: none)."""
    choice = os.environ.get("BITQUANT_FUSED_LOSS", "auto")
    if torch.device(device).type != "cuda" or choice == "0" or _FUSED_FAILED:
        return False
    if choice != "1" and (div is None or div.kind not in FUSED_FASTER):
        return False
    try:
        import logging

        logging.getLogger("liger_kernel").setLevel(logging.ERROR)  # its optional backends it cannot import
        import liger_kernel.ops  # noqa: F401
    except Exception:  # not installed, or built for another torch/triton
        return False
    return True


def fused(h_student: torch.Tensor, head_student: torch.Tensor, h_teacher: torch.Tensor, head_teacher: torch.Tensor,
          div: Divergence = FORWARD_KL) -> torch.Tensor:
    """:func:`chunked`'s quantity through liger-kernel's ``LigerFusedLinearJSDFunction`` (CUDA)."""
    from liger_kernel.ops import LigerFusedLinearJSDFunction

    dtype = h_student.dtype  # liger forms the logits in the inputs' dtype and accumulates in float32
    return LigerFusedLinearJSDFunction.apply(h_student, head_student.to(dtype), h_teacher.detach().to(dtype),
                                             head_teacher.detach().to(dtype), None, div.mix, -100, div.temperature)


def divergence(h_student: torch.Tensor, head_student: torch.Tensor, h_teacher: torch.Tensor,
               head_teacher: torch.Tensor, div: Divergence = FORWARD_KL, negative: torch.Tensor | None = None,
               alpha: float = 0.0) -> torch.Tensor:
    """The mean divergence over rows: fused on CUDA where :func:`fused_available`, else chunked
    (also from the first time the fused kernel fails here: a liger-kernel built for another
    torch or Triton). With an unlikelihood term (``negative``, ``alpha``): chunked."""
    if negative is not None and alpha > 0:
        return chunked(h_student, head_student, h_teacher, head_teacher, div, negative=negative, alpha=alpha)
    if fused_available(h_student.device, div):
        try:
            return fused(h_student, head_student, h_teacher, head_teacher, div)
        except (RuntimeError, ImportError, AttributeError, TypeError, ValueError) as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            _FUSED_FAILED.append(describe(e))
    return chunked(h_student, head_student, h_teacher, head_teacher, div)


def implementation(device: torch.device | str, div: Divergence = FORWARD_KL) -> str:
    """What :func:`divergence` runs on ``device`` for ``div``, for the report."""
    if fused_available(device, div):
        return "liger-kernel fused"
    what = "chunked (torch, each chunk compiled)" if compiled_available(device) else "chunked (torch)"
    if _COMPILED_FAILED:
        what += f"; the compiled chunks failed here: {_COMPILED_FAILED[0][:200]}"
    if _FUSED_FAILED:
        what += f"; liger-kernel failed here: {_FUSED_FAILED[0][:200]}"
    return what


def kl_loss(h_student, head_student, h_teacher, head_teacher, budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """KL(teacher ‖ student), chunked (the forward KL of :func:`chunked`)."""
    return chunked(h_student, head_student, h_teacher, head_teacher, FORWARD_KL, budget)


def reference(h_student, head_student, h_teacher, head_teacher, div: Divergence = FORWARD_KL,
              negative: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """The same quantity with whole logits and autograd, for tests."""
    logp = torch.log_softmax((h_teacher @ head_teacher.T).float() / div.temperature, -1)
    logq = torch.log_softmax((h_student @ head_student.T).float() / div.temperature, -1)
    p, q = logp.exp(), logq.exp()
    if div.mix == 0.0:
        rows = (p * (logp - logq)).sum(-1)
    elif div.mix == 1.0:
        rows = (q * (logq - logp)).sum(-1)
    else:
        m = div.mix * p + (1 - div.mix) * q
        rows = div.mix * (p * (logp - m.log())).sum(-1) + (1 - div.mix) * (q * (logq - m.log())).sum(-1)
    if negative is not None and alpha > 0:
        has = negative >= 0
        qc = q.gather(1, negative.clamp_min(0)[:, None]).squeeze(1)
        rows = rows + torch.where(has, -alpha * (1 - qc).clamp_min(UL_FLOOR).log(), torch.zeros_like(qc))
    return rows.mean()


def repeated(ids: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, seq] bool: True at each token that ends an n-gram which already ended earlier
    in its own row (the token that makes the text repeat itself). Exact (no hashing).
    :func:`bitquant.training.data.row_distinct` gives each row's share of distinct n-grams
    (1 minus this mask's mean over the n-gram ends) by hashing instead: on a heal run's
    4,194,304 samples it is about 36x faster (0.2 s against 7.6 s on 2 CPU cores), and it
    needs no positions; this exact form serves the rollouts (512 sequences at a time)."""
    rows, seq = ids.shape
    out = torch.zeros(rows, seq, dtype=torch.bool, device=ids.device)
    if seq < n:
        return out
    grams = ids.unfold(1, n, 1)  # [rows, seq - n + 1, n]
    count = grams.shape[1]
    keyed = torch.cat([torch.arange(rows, device=ids.device).repeat_interleave(count)[:, None],
                       grams.reshape(-1, n)], 1)
    _, inverse = torch.unique(keyed, dim=0, return_inverse=True)
    where = torch.arange(len(keyed), device=ids.device)
    first = torch.full((int(inverse.max()) + 1,), len(keyed), device=ids.device).scatter_reduce(
        0, inverse, where, "amin")
    out[:, n - 1 :] = (where > first[inverse]).view(rows, count)
    return out


def kl_reference(h_student, head_student, h_teacher, head_teacher) -> torch.Tensor:
    return reference(h_student, head_student, h_teacher, head_teacher)


def block_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    """Block-wise reconstruction loss: the mean over blocks of the squared error of each
    block's output against the teacher's, relative to the size of what the teacher's block
    adds to its input (so every block counts alike, whatever the scale of the residual
    stream): mean_i ‖y_i − t_i‖² / ‖t_i − x_i‖²."""
    terms = []
    for y, t, x in zip(outputs, targets, inputs):
        t = t.float()
        change = (t - x.float()).pow(2).sum().clamp_min(1e-12)
        terms.append((y.float() - t).pow(2).sum() / change)
    return torch.stack(terms).mean()
