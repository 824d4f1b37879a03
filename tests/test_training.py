"""The training modules of heal: loss, student, data, schedule, recipe."""

import pytest
import torch

from bitquant.errors import RecipeError
from bitquant.formats.hf_bitnet import encode
from bitquant.kernels import quantize_pack
from bitquant.packing import unpack_ternary
from bitquant.runtime import TernaryLinear
from bitquant.training import data
from bitquant.training.loop import lr_at
from bitquant.training.loss import kl_loss, kl_reference
from bitquant.training.recipe import HealRecipe, load_heal_recipe
from bitquant.training.student import FakeTernaryLinear, fake_ternary_linear, make_student
from conftest import make_checkpoint


@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_kl_equals_whole_logits_value_and_gradients(train_head):
    torch.manual_seed(0)
    n, hidden, vocab = 37, 16, 50
    h_s = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(n, hidden, dtype=torch.float64)
    w_s = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=train_head)
    w_t = torch.randn(vocab, hidden, dtype=torch.float64)
    loss = kl_loss(h_s, w_s, h_t, w_t, budget=8 * vocab)  # 8 rows a chunk: 5 chunks
    loss.backward()
    grads = (h_s.grad.clone(), w_s.grad.clone() if train_head else None)
    h_s.grad = None
    w_s.grad = None
    ref = kl_reference(h_s, w_s, h_t, w_t)
    ref.backward()
    assert torch.allclose(loss.double(), ref.double(), rtol=1e-5)
    assert torch.allclose(grads[0], h_s.grad, rtol=1e-5, atol=1e-7)
    if train_head:
        assert torch.allclose(grads[1], w_s.grad, rtol=1e-5, atol=1e-7)


def test_kl_of_identical_models_is_zero_with_zero_gradient():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8)
    loss = kl_loss(h, w, h.detach(), w)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and h.grad.abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_student_forward_is_the_exported_layer(dtype):
    """The fake-quantized layer computes what the exported (packed) layer computes."""
    torch.manual_seed(1)
    latent = torch.randn(24, 40).to(dtype)
    bias = torch.randn(24)
    x = torch.randn(3, 5, 40)
    t = quantize_pack(latent, eps=1e-5)
    (_, packed), (_, inv) = encode("w", t.packed, t.scale, dtype)
    exported = TernaryLinear(unpack_ternary(packed), inv.to(torch.float32), bias)
    student = fake_ternary_linear(x, latent.float(), bias, 1e-5, dtype)
    want = exported(x)
    assert ((student - want).norm() / want.norm()) < 1e-6


def test_student_gradients_are_straight_through():
    torch.manual_seed(2)
    w = torch.randn(8, 12, requires_grad=True)
    x = torch.randn(4, 12, requires_grad=True)
    fake_ternary_linear(x, w, None, 1e-5, torch.float32).sum().backward()
    gw, gx = w.grad.clone(), x.grad.clone()
    # identity through both roundings: the gradient of a plain linear layer of the quantized values
    from bitquant.ternary import absmean, quantize_activations, ternarize

    s = absmean(w.detach())
    wq = ternarize(w.detach(), s).float() * s
    q, sc = quantize_activations(x.detach())
    xq = q / sc
    assert torch.allclose(gw, torch.ones(4, 8).T @ xq, atol=1e-5)
    assert torch.allclose(gx, torch.ones(4, 8) @ wq, atol=1e-5)


def test_make_student_swaps_projections_and_sets_trainable(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m"))
    modules = {n for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    params = make_student(model, modules, 1e-5, torch.float32, ("projections", "norms"))
    swapped = {n for n, m in model.named_modules() if isinstance(m, FakeTernaryLinear)}
    assert swapped == modules
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {m + ".weight" for m in modules} | {n for n, _ in model.named_parameters() if "norm" in n}
    assert len(params) == len(names)


def test_sampling_is_plain_temperature_sampling_with_eos_masked(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m", bos_token_id=0, eos_token_id=1))
    settings = data.SampleSettings(tokens=4 * 16, seq_len=16, temperature=0.7, seed=3, batch=4)
    ids = data.sample(model, settings, bos_id=0, eos_ids=[1])
    torch.manual_seed(3)
    ref = torch.zeros(4, 16, dtype=torch.long)
    with torch.no_grad():
        for t in range(1, 16):
            logits = model(ref[:, :t]).logits[:, -1].float() / 0.7
            logits[:, 1] = -float("inf")
            ref[:, t] = torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]
    assert torch.equal(ids, ref)


def test_samples_are_cached_by_settings(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m", bos_token_id=0, eos_token_id=1))
    settings = data.SampleSettings(tokens=32, seq_len=16, temperature=1.0, seed=0, batch=2)
    key = settings.key("model-fp", "cpu")
    a, info = data.cached_samples(model, settings, key, tmp_path / "cache", 0, [1], 96)
    b, again = data.cached_samples(None, settings, key, tmp_path / "cache", 0, [1], 96)  # no model needed: cached
    assert torch.equal(a, b) and not info["cached"] and again["cached"] and again["sha256"] == info["sha256"]
    other = data.SampleSettings(tokens=32, seq_len=16, temperature=1.0, seed=1, batch=2)
    assert other.key("model-fp", "cpu") != key and settings.key("other-model", "cpu") != key


def test_batches_are_a_function_of_the_step():
    text = torch.arange(10 * 4).view(10, 4)
    samples = 1000 + torch.arange(7 * 4).view(7, 4)
    one = data.Batches([text, samples], [3, 1], seed=5)
    two = data.Batches([text, samples], [3, 1], seed=5)
    seen = torch.cat([one.batch(s)[:3] for s in range(10)])
    assert all(torch.equal(one.batch(s), two.batch(s)) for s in (7, 0, 3))  # any order
    assert (one.batch(4)[:3] < 1000).all() and (one.batch(4)[3:] >= 1000).all()
    # every text sequence is seen 3 times in 3 passes (10 steps x 3 sequences = 30 = 3 x 10)
    assert torch.bincount(seen[:, 0] // 4, minlength=10).tolist() == [3] * 10
    assert one.passes(10) == [3.0, 10 / 7]


def test_learning_rate_schedule():
    r = HealRecipe(tokens=100 * 512, batch_tokens=512, micro_batch_tokens=512, seq_len=512, warmup_steps=10, lr=1e-3,
                   sample_tokens=512)
    lrs = [lr_at(s, r) for s in range(r.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_a_small_budget_gets_min_steps_smaller_batches():
    r = load_heal_recipe().replace(tokens=32768).fitted()
    assert (r.batch_tokens, r.steps, r.micro_batch_tokens) == (2048, 16, 2048)
    big = load_heal_recipe()
    assert big.fitted() is big


@pytest.mark.parametrize("changes, message", [
    (dict(tokens=100), "smaller than one sequence"),
    (dict(batch_tokens=1000), "multiples of 'seq_len'"),
    (dict(train=("norms",)), "must include 'projections'"),
    (dict(betas=(0.9,)), "two numbers"),
    (dict(lr=0), "'lr' must be positive"),
])
def test_bad_heal_recipes(changes, message):
    with pytest.raises(RecipeError, match=message):
        load_heal_recipe().replace(**changes)


def test_heal_and_convert_recipes_are_not_interchangeable(tmp_path):
    from bitquant.recipe import load_recipe

    with pytest.raises(RecipeError, match="no bundled recipe named 'heal'"):
        load_recipe("heal")
    f = tmp_path / "r.yaml"
    f.write_text("name: x\n")
    with pytest.raises(RecipeError, match="not a heal recipe"):
        load_heal_recipe(f)
