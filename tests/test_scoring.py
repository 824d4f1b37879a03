"""Scores from hidden states through the head in vocabulary blocks equal the whole-row ones."""

import pytest
import torch
import torch.nn.functional as F

from bitquant import scoring
from bitquant.scoring import Head


def whole(x, w, cap=None):
    z = x.float() @ w.float().T
    return (torch.tanh(z / cap) * cap if cap else z).float()


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_scores_equal_whole_rows(monkeypatch, cap, dtype):
    monkeypatch.setattr(scoring, "BLOCK_BYTES", 4 * 64 * 300)  # many small blocks, the last one partial
    g = torch.Generator().manual_seed(0)
    x, xq = torch.randn(37, 64, generator=g) * 3, torch.randn(37, 64, generator=g) * 3
    w = (torch.randn(1000, 64, generator=g) / 4).to(dtype)
    wq = (torch.randn(1000, 64, generator=g) / 4).to(dtype)
    t = torch.randint(0, 1000, (37,), generator=g)
    head, head_q = Head(w, torch.float32, cap), Head(wq, torch.float32, cap)
    assert len(head.blocks(37)) > 3
    lb, lq = F.log_softmax(whole(x, w, cap), -1), F.log_softmax(whole(xq, wq, cap), -1)
    want_b, want_q = F.nll_loss(lb, t, reduction="none"), F.nll_loss(lq, t, reduction="none")
    assert torch.allclose(scoring.nll(x, head, t).float(), want_b, atol=1e-5)
    nb, nq, kl, agree = scoring.compare(x, head, xq, head_q, t)
    assert torch.allclose(nb.float(), want_b, atol=1e-5) and torch.allclose(nq.float(), want_q, atol=1e-5)
    assert torch.allclose(kl.float(), (lb.exp() * (lb - lq)).sum(-1), atol=1e-5)
    assert torch.equal(agree, lb.argmax(-1) == lq.argmax(-1))
    nb, _, kl, agree = scoring.compare(x, head, x, head, t)  # a model against itself
    assert float(kl.abs().max()) < 1e-5 and bool(agree.all())


def test_argmax_ties_go_to_the_first_index_as_torch_does(monkeypatch):
    monkeypatch.setattr(scoring, "BLOCK_BYTES", 4 * 8 * 256)
    wb, wq = torch.zeros(1024, 8), torch.zeros(1024, 8)
    wb[[10, 700]] = 1.0  # equal logits in two blocks: the first maximum is 10 in both
    wq[[10, 900]] = 1.0
    x = torch.ones(2, 8)
    *_, agree = scoring.compare(x, Head(wb, torch.float32), x, Head(wq, torch.float32), torch.tensor([0, 1]))
    assert agree.all()  # picking the last maximum would compare 700 with 900
