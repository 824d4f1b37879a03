"""Next-token scores from final hidden states, without forming a window's logits whole.

The output head of a model with a large vocabulary is the largest matrix it has (Qwen's
151,936 × 2,048), and a window's logits are larger still (512 × 151,936 float32: 311 MB).
These functions take the head in blocks of vocabulary rows, converted to the compute
dtype one block at a time (so the head stays in its stored dtype), and keep online
log-sum-exp, argmax and KL accumulators, so that memory is a few blocks whatever the
vocabulary. The numbers are those of the whole-row computation up to float rounding.

Tensor in, tensor out; nothing here knows about files or models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Bytes of float temporaries per vocabulary block (logits and the converted head rows).
BLOCK_BYTES = 32 << 20


@dataclass
class Head:
    """An output head: ``weight`` [vocab, hidden] in any float dtype, computed in ``dtype``,
    with the family's tanh soft-capping of the logits (``cap``; None: none)."""

    weight: torch.Tensor
    dtype: torch.dtype
    cap: float | None = None
    release: Callable[[int, int], None] | None = None  # drops rows begin:end from memory after use (mapped heads)

    def blocks(self, rows: int) -> list[tuple[int, int]]:
        """(begin, end) vocabulary blocks whose temporaries for ``rows`` rows fit BLOCK_BYTES."""
        vocab, hidden = self.weight.shape
        size = torch.empty((), dtype=self.dtype).element_size()
        step = max(256, BLOCK_BYTES // (size * max(hidden, rows)))
        return [(v, min(v + step, vocab)) for v in range(0, vocab, step)]

    def logits(self, x: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        z = x @ self.weight[begin:end].to(self.dtype).T
        if self.release is not None:
            self.release(begin, end)
        if self.cap:
            z = torch.tanh(z / self.cap) * self.cap
        return z.float()


def _merge(m: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online log-sum-exp: running max ``m`` and sum ``s`` of exp(z - m), updated with block
    ``z``; also returns the factor exp(old m - new m) that earlier sums are rescaled by."""
    new_m = torch.maximum(m, z.amax(-1))
    rescale = torch.exp(m - new_m)
    return new_m, s * rescale + torch.exp(z - new_m[:, None]).sum(-1), rescale


@torch.inference_mode()
def nll(x: torch.Tensor, head: Head, targets: torch.Tensor) -> torch.Tensor:
    """Per-row negative log-likelihood (float64) of ``targets`` under ``x``'s logits."""
    x = x.to(head.dtype)
    rows = x.shape[0]
    m = torch.full((rows,), float("-inf"), device=x.device)
    s = torch.zeros(rows, device=x.device)
    target_logit = torch.empty(rows, device=x.device)
    for begin, end in head.blocks(rows):
        z = head.logits(x, begin, end)
        m, s, _ = _merge(m, s, z)
        inside = (targets >= begin) & (targets < end)
        if bool(inside.any()):
            idx = inside.nonzero().squeeze(1)
            target_logit[idx] = z[idx, targets[idx] - begin]
    return (m + torch.log(s) - target_logit).double()


@torch.inference_mode()
def compare(xb: torch.Tensor, head_b: Head, xq: torch.Tensor, head_q: Head,
            targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row: both models' NLL of the target (float64), KL(P_b ‖ P_q) (float64), and
    whether their argmax agrees. KL = Σ p_b (z_b − z_q) − lse_b + lse_q, accumulated online."""
    xb, xq = xb.to(head_b.dtype), xq.to(head_q.dtype)
    rows = xb.shape[0]
    dev = xb.device
    mb = torch.full((rows,), float("-inf"), device=dev)
    mq = mb.clone()
    sb, sq, cross = torch.zeros(rows, device=dev), torch.zeros(rows, device=dev), torch.zeros(rows, device=dev)
    tb, tq = torch.empty(rows, device=dev), torch.empty(rows, device=dev)
    best_b, best_q = torch.full((rows,), float("-inf"), device=dev), torch.full((rows,), float("-inf"), device=dev)
    arg_b, arg_q = torch.zeros(rows, dtype=torch.long, device=dev), torch.zeros(rows, dtype=torch.long, device=dev)
    if head_b.weight.shape[0] != head_q.weight.shape[0]:
        raise ValueError(f"the models' vocabularies differ ({head_b.weight.shape[0]} and {head_q.weight.shape[0]})")
    for begin, end in head_b.blocks(rows):
        zb, zq = head_b.logits(xb, begin, end), head_q.logits(xq, begin, end)
        mb, sb, rescale = _merge(mb, sb, zb)
        cross = cross * rescale + (torch.exp(zb - mb[:, None]) * (zb - zq)).sum(-1)
        mq, sq, _ = _merge(mq, sq, zq)
        inside = (targets >= begin) & (targets < end)
        if bool(inside.any()):
            idx = inside.nonzero().squeeze(1)
            tb[idx] = zb[idx, targets[idx] - begin]
            tq[idx] = zq[idx, targets[idx] - begin]
        for z, best, arg in ((zb, best_b, arg_b), (zq, best_q, arg_q)):
            v, i = z.max(-1)
            better = v > best
            best[better] = v[better]
            arg[better] = i[better] + begin
    lse_b, lse_q = mb + torch.log(sb), mq + torch.log(sq)
    kl = cross / sb - (lse_b - lse_q)  # p_b = exp(z_b − m_b) / s_b
    return (lse_b - tb).double(), (lse_q - tq).double(), kl.double(), arg_b == arg_q
