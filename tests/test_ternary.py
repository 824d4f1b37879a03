import numpy as np
import pytest
import torch

from bitquant.errors import TensorError
from bitquant.ternary import absmean_scale, dequantize, quantize_absmean, relative_error, ternarize
from reference import absmean_reference


def test_hand_computed_matrix():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.1]])
    t = quantize_absmean(w)
    assert t.scale == pytest.approx(0.9)  # (1 + 2 + 0.5 + 0.1) / 4
    # w / s = [1.11, -2.22, 0.556, 0.111] -> round -> [1, -2, 1, 0] -> clamp
    assert t.codes.tolist() == [[1, -1], [1, 0]]
    assert t.codes.dtype == torch.int8
    assert t.zero_fraction == 0.25
    err = torch.tensor([[1 - 0.9, -2 + 0.9], [0.5 - 0.9, 0.1]]).norm() / w.norm()
    assert t.relative_error == pytest.approx(float(err), rel=1e-6)
    assert not t.scale_clamped


def test_ties_round_half_to_even():
    # s = mean(0.5, 1.5, 0.5, 1.5) = 1.0 ; w/s = 0.5 -> 0 (half to even), 1.5 -> 2 -> 1
    w = torch.tensor([[0.5, 1.5], [-0.5, -1.5]])
    t = quantize_absmean(w)
    assert t.scale == 1.0
    assert t.codes.tolist() == [[0, 1], [0, -1]]


def test_all_zero_matrix_gets_eps_and_zero_codes():
    t = quantize_absmean(torch.zeros(4, 8, dtype=torch.float16), eps=1e-5)
    assert t.scale == pytest.approx(1e-5)
    assert t.scale_clamped
    assert t.zero_fraction == 1.0
    assert t.relative_error == 0.0
    assert not t.codes.any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_name_the_tensor(bad):
    w = torch.randn(8, 8)
    w[3, 5] = bad
    with pytest.raises(TensorError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*NaN or Inf"):
        quantize_absmean(w, name="model.layers.0.mlp.up_proj.weight")


def test_integer_weights_are_refused():
    with pytest.raises(TensorError, match="int32.*not a float"):
        quantize_absmean(torch.ones(4, 4, dtype=torch.int32), name="w")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matches_independent_float32_recipe(dtype):
    torch.manual_seed(1)
    w = (torch.randn(256, 384) * 0.02).to(dtype)
    t = quantize_absmean(w)
    codes, s = absmean_reference(w)
    assert np.float32(t.scale) == pytest.approx(s, rel=1e-6)
    assert np.array_equal(t.codes.numpy(), codes)
    assert t.relative_error == pytest.approx(relative_error(w, t.codes, t.scale), rel=1e-5)
    assert t.zero_fraction == pytest.approx(float((codes == 0).mean()))


def test_scale_is_accumulated_accurately_on_large_matrices():
    torch.manual_seed(2)
    w = (torch.randn(2048, 2048) * 0.02).half()
    exact = w.double().abs().mean()
    assert float(absmean_scale(w)) == pytest.approx(float(exact), rel=1e-6)


def test_ternarize_and_dequantize_agree_with_quantize():
    w = torch.randn(16, 16)
    t = quantize_absmean(w)
    assert torch.equal(ternarize(w, t.scale), t.codes)
    assert torch.allclose(dequantize(t.codes, t.scale), t.codes.float() * t.scale)
