"""KL(teacher ‖ student) of next-token distributions, from final hidden states, in chunks.

The logits of a batch (tokens x vocabulary, 1.6 G values for 32k tokens of a 49k
vocabulary) are never held whole, in any dtype: rows are taken ``chunk`` at a time, both
models' logits for those rows are formed (through each model's output head) and turned
into float32 log-probabilities, the chunk's KL is summed, and its gradient with respect to
the student's hidden states (and, if it trains, the student's output head) is computed
right there: d KL / d z_s = p_s - p_t. The backward pass only scales those stored
gradients. Rows per chunk are chosen so a chunk's float32 logits stay near ``budget``
values, so the vocabulary is whole inside a chunk but the memory is bounded whatever
the vocabulary size.
"""

from __future__ import annotations

import torch

#: Float32 logits held per chunk (per model): 2^26 values = 256 MiB.
DEFAULT_BUDGET = 1 << 26


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, rows: int):
        n = h_s.shape[0]
        grad_h = torch.empty_like(h_s)
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float64, device=h_s.device)
        for b in range(0, n, rows):
            hs, ht = h_s[b : b + rows], h_t[b : b + rows]
            logp_t = torch.log_softmax((ht @ w_t.T).float(), dim=-1)
            logp_s = torch.log_softmax((hs @ w_s.T).float(), dim=-1)
            p_t = logp_t.exp()
            total += (p_t * (logp_t - logp_s)).sum(dtype=torch.float64)
            g = logp_s.exp_().sub_(p_t).div_(n)  # d(mean KL)/d z_s, reusing logp_s's memory
            del logp_t, p_t
            gd = g.to(w_s.dtype)
            grad_h[b : b + rows] = gd @ w_s
            if grad_w is not None:
                grad_w.addmm_(g.T, hs.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        return (total / n).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype)
        return grad_h * grad_out.to(grad_h.dtype), gw, None, None, None


def chunk_rows(vocab: int, budget: int = DEFAULT_BUDGET) -> int:
    return max(1, budget // vocab)


def kl_loss(h_student: torch.Tensor, head_student: torch.Tensor, h_teacher: torch.Tensor, head_teacher: torch.Tensor,
            budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """Mean over rows of KL(softmax(h_t W_t^T) ‖ softmax(h_s W_s^T)), in nats.

    ``h_*``: [rows, hidden] final hidden states (after the final norm); ``head_*``: the
    output heads, [vocab, hidden]. Gradients flow to ``h_student`` and, if it requires
    them, to ``head_student``; the teacher's inputs are constants."""
    rows = chunk_rows(head_student.shape[0], budget)
    return _ChunkedKL.apply(h_student, head_student, h_teacher.detach(), head_teacher.detach(), rows)


def kl_reference(h_student, head_student, h_teacher, head_teacher) -> torch.Tensor:
    """The same quantity with whole logits, for tests."""
    logp_t = torch.log_softmax((h_teacher @ head_teacher.T).float(), -1)
    logp_s = torch.log_softmax((h_student @ head_student.T).float(), -1)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean()


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
