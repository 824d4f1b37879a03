import numpy as np
import pytest
import torch

from bitquant import kernels
from bitquant.errors import TensorError
from bitquant.packing import pack_ternary
from bitquant.ternary import quantize_absmean
from reference import absmean_reference, unpack_reference

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is a dependency; its absence is tested elsewhere")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 1), (64, 48), (1536, 576), (12, 257)])
def test_fused_kernel_is_bit_exact_with_the_reference(dtype, shape):
    torch.manual_seed(sum(shape))
    w = (torch.randn(*shape) * 0.02).to(dtype)
    fused = kernels._fused(w, 1e-5, "w")
    ref = quantize_absmean(w)
    assert torch.equal(fused.packed, pack_ternary(ref.codes))
    codes, s = absmean_reference(w)
    assert np.array_equal(unpack_reference(fused.packed.numpy()), codes)
    assert np.float32(fused.scale) == s  # float64-accumulated mean, rounded to float32
    assert fused.zero_fraction == pytest.approx(ref.zero_fraction, abs=1e-12)
    assert fused.relative_error == pytest.approx(ref.relative_error, rel=1e-9)


def test_ties_and_thresholds_follow_round_half_to_even():
    # s = 1.0; w/s = 0.5 -> 0, 1.5 -> 1 (clamped 2), -0.5 -> 0, values just past the tie -> +-1
    w = torch.tensor([[0.5, 1.5, -0.5, -1.5], [0.5009765625, -0.5009765625, 0.0, 2.0],
                      [1.0, 1.0, 1.0, 1.0], [1.0, 0.4990234375, 0.5, 1.0]], dtype=torch.float16)
    w = w * (1.0 / w.float().abs().mean()).half()  # make s land exactly on a representable value
    fused = kernels._fused(w, 1e-5, "w")
    assert torch.equal(fused.packed, pack_ternary(quantize_absmean(w).codes))


def test_all_zero_and_non_finite():
    z = kernels._fused(torch.zeros(8, 16, dtype=torch.bfloat16), 1e-5, "z")
    assert z.scale_clamped and z.zero_fraction == 1.0 and z.relative_error == 0.0
    assert z.scale == pytest.approx(1e-5)
    w = torch.randn(8, 16).half()
    w[2, 3] = float("nan")
    with pytest.raises(TensorError, match="'bad'.*NaN or Inf"):
        kernels._fused(w, 1e-5, "bad")


def test_dispatch_uses_the_reference_for_float32():
    w = torch.randn(16, 8)
    got = kernels.quantize_pack(w, 1e-5)
    assert torch.equal(got.packed, pack_ternary(quantize_absmean(w).codes))
