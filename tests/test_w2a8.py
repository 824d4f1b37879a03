"""The packed W2A8 Triton kernel, run on the CPU under Triton's interpreter (conftest sets
TRITON_INTERPRET=1), against an int32 reference: a wrong index or shift fails here, without a GPU."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is installed by the README's set-up command (.[dev])")

from bitquant import w2a8  # noqa: E402
from bitquant.packing import pack_ternary  # noqa: E402
from bitquant.runtime import TernaryLinear  # noqa: E402
from bitquant.ternary import quantize_activations  # noqa: E402


def random_case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    return codes, xq


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (5, 256, 96), (16, 128, 256), (37, 320, 200), (70, 8, 64)])
def test_int32_product_equals_the_reference_exactly(m, n, k):
    """Decode and prefill tiles, rows and columns that are not multiples of the tiles."""
    codes, xq = random_case(m, n, k)
    want = xq.to(torch.int32) @ codes.to(torch.int32).T
    got = w2a8.matmul_int32(xq, pack_ternary(codes))
    assert got.dtype == torch.int32 and torch.equal(got, want)


@pytest.mark.parametrize("multiply", [False, True])
def test_scaled_output_equals_the_cpu_runtime(multiply):
    """The epilogue applies the runtime's conventions: within 1e-6 relative of TernaryLinear."""
    codes, _ = random_case(1, 192, 160, seed=1)
    x = torch.randn(9, 160, generator=torch.Generator().manual_seed(2))
    scale = torch.tensor([0.037 if multiply else 1 / 0.037])
    ref = TernaryLinear(codes, scale, None, act_quant=True, multiply=multiply)(x)
    q, act_scale = quantize_activations(x)
    got = w2a8.linear(q.to(torch.int8), act_scale, pack_ternary(codes), float(scale), multiply)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6


def test_wrong_inputs_are_refused():
    codes, xq = random_case(2, 8, 16)
    with pytest.raises(ValueError, match="need int8"):
        w2a8.matmul_int32(xq.float(), pack_ternary(codes))
