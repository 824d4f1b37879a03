"""The calibrated methods as pure functions (bitquant.methods), on synthetic data whose
answer is known: each must lower the layer-output error against absmean on the same data."""

import pytest
import torch

from bitquant.methods import equalize, mixed
from bitquant.methods.gptq import fit_scale, output_error, ternary_gptq
from bitquant.methods.tune import ScaledTernary, tune
from bitquant.ternary import ternarize


def correlated_inputs(n=2048, d=96, seed=0, outliers=()):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    for j in outliers:
        x[:, j] *= 20
    return x


def absmean(w):
    s = float(w.abs().mean())
    return s * ternarize(w, s).float()


def test_gptq_lowers_output_error_and_codes_are_ternary():
    x = correlated_inputs()
    h = x.T @ x / x.shape[0]
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    r = ternary_gptq(w, h)
    assert set(r.codes.unique().tolist()) <= {-1, 0, 1} and r.codes.dtype == torch.int8
    assert r.absmean_output_error == pytest.approx(output_error(w, absmean(w), h))
    assert r.output_error == pytest.approx(output_error(w, r.scale * r.codes.float(), h))
    assert r.output_error < 0.8 * r.absmean_output_error


def test_fit_scale_is_the_least_squares_scale():
    x = correlated_inputs(seed=2)
    h = x.T @ x / x.shape[0]
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(3))
    codes = ternarize(w, float(w.abs().mean()))
    s = fit_scale(w, codes, h)
    best = output_error(w, s * codes.float(), h)
    for f in (0.9, 0.99, 1.01, 1.1):
        assert output_error(w, f * s * codes.float(), h) > best


def test_equalize_lowers_error_with_outlier_channels_and_keeps_the_function():
    x = correlated_inputs(outliers=(3, 40, 77))
    h = x.T @ x / x.shape[0]
    g = torch.Generator().manual_seed(4)
    # as in real models, columns fed by large activations hold small weights (and vice versa)
    col = torch.ones(96)
    col[[3, 40, 77]] = 0.05
    col[10:30] = 3.0
    ws = [torch.randn(48, 96, generator=g) * 0.05 * col for _ in range(3)]
    sc = equalize.search(x.abs().mean(0), [(w, h) for w in ws])
    assert sc.beta > 0 and sc.error < 0.9 * sc.error_before
    assert sc.error_before == pytest.approx(sum(output_error(w, absmean(w), h) for w in ws))
    # folding: input divided by c (RMSNorm gain), columns multiplied by c: same FP output
    gain = torch.rand(96) + 0.5
    xg = x[:8] * gain
    xg2 = x[:8] * equalize.scale_rows(gain, sc.c)
    for w in ws:
        torch.testing.assert_close(xg2 @ equalize.scale_columns(w, sc.c).T, xg @ w.T, rtol=1e-4, atol=1e-4)


def test_equalize_with_producer_and_grouped_heads():
    """v -> o with 2 query heads per kv head: v rows / c, o columns * expand(c)."""
    groups, head_dim, kv_heads = 2, 8, 3
    g = torch.Generator().manual_seed(5)
    wv = torch.randn(kv_heads * head_dim, 32, generator=g) * 0.05
    wo = torch.randn(32, groups * kv_heads * head_dim, generator=g) * 0.05
    x = correlated_inputs(d=32, seed=6)
    hv = x.T @ x / x.shape[0]
    xo = correlated_inputs(d=groups * kv_heads * head_dim, seed=7, outliers=(5, 30))
    ho = xo.T @ xo / xo.shape[0]
    stat = equalize.reduce(xo.abs().mean(0), groups, head_dim)
    sc = equalize.search(stat, [(wo, ho)], [(wv, hv)], groups=groups, head_dim=head_dim)
    assert sc.error <= sc.error_before
    c = equalize.expand(sc.c, groups, head_dim)
    assert c.shape[0] == wo.shape[1]
    # v's output channel j feeds o's columns j + k * (kv_heads * head_dim)... per head layout:
    v_out = x[:4] @ wv.T  # [4, kv_heads*head_dim]
    o_in = v_out.view(4, kv_heads, 1, head_dim).expand(4, kv_heads, groups, head_dim).reshape(4, -1)
    v2 = x[:4] @ equalize.scale_rows(wv, sc.c).T
    o_in2 = v2.view(4, kv_heads, 1, head_dim).expand(4, kv_heads, groups, head_dim).reshape(4, -1)
    torch.testing.assert_close(o_in2 @ equalize.scale_columns(wo, c).T, o_in @ wo.T, rtol=1e-4, atol=1e-5)


def test_mixed_precision_keeps_most_damage_per_bit_within_budget():
    damage = {"a": 10.0, "b": 1.0, "c": 5.0, "d": 0.1}
    params = {"a": 100, "b": 100, "c": 400, "d": 400}
    choices = mixed.choose(damage, params, target_bits=3.5, full_bits=16)
    kept = {c.name for c in choices if c.kept}
    assert kept == {"a"}  # a: 10/1400 per bit; c: 5/5600; the budget 1.5*1000 bits fits only a (1400)
    assert mixed.bits_per_weight(choices, 16) <= 3.5
    assert [c.name for c in choices] == ["a", "c", "b", "d"]  # by damage per extra bit
    assert not any(c.kept for c in mixed.choose(damage, params, target_bits=2.0, full_bits=16))
    assert all(c.kept for c in mixed.choose(damage, params, target_bits=16, full_bits=16))


def test_tune_fits_scale_and_gain_to_target():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(16, 24, generator=g)
    codes = ternarize(w, float(w.abs().mean()))
    layer = ScaledTernary(codes, 0.3)
    gain = torch.nn.Parameter(torch.ones(24))
    x = torch.randn(8, 10, 24, generator=g)
    target = torch.nn.functional.linear(x * 1.5, w)
    result = tune(lambda t: layer(t * gain), [gain, layer.log_scale], x, target, steps=300, lr=2e-2)
    assert result.loss_after < 0.5 * result.loss_before
    full = float((layer(x * gain) - target).pow(2).mean() / target.pow(2).mean())
    assert full == pytest.approx(result.loss_after, rel=1e-4)
