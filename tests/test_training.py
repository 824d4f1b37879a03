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
from bitquant.training.loss import block_loss, kl_loss, kl_reference
from bitquant.training.recipe import HealRecipe, load_heal_recipe
from bitquant.training.student import FakeTernaryLinear, fake_ternary_linear, make_student
from conftest import NEW_FAMILIES, make_checkpoint


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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", *NEW_FAMILIES])
def test_sampler_steps_are_the_models_forward_pass_and_draws_are_gumbel_max(tmp_path, arch):
    """bitquant.decode's cached steps give the full forward pass's logits, and each token is
    argmax(logits / T + Gumbel noise) of exactly those logits, EOS excluded."""
    from transformers import AutoModelForCausalLM

    from bitquant import decode

    # 16 positions: past Gemma 3's sliding window of 8 in the tiny config
    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m", arch=arch, bos_token_id=0,
                                                                 eos_token_id=1)).eval()
    steps = {}
    ids = decode.sample_batch(model, 4, 16, 0, 0.7, [1], torch.Generator().manual_seed(3),
                              on_step=lambda pos, logits: steps.__setitem__(pos, logits.clone()))
    with torch.no_grad():
        full = model(ids).logits.float()
    g = torch.Generator().manual_seed(3)
    for pos in range(15):
        assert torch.allclose(steps[pos], full[:, pos], atol=1e-4, rtol=1e-4)
        logits = full[:, pos].clone()
        logits[:, 1] = -float("inf")
        assert torch.equal(ids[:, pos + 1], decode.gumbel_argmax(logits, 0.7, g))
    assert (ids[:, 0] == 0).all() and not (ids[:, 1:] == 1).any()


def test_gumbel_max_draws_from_the_softmax():
    from bitquant import decode

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(40000, 1)
    draws = decode.gumbel_argmax(logits, 0.8, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, torch.softmax(logits[0] / 0.8, -1), atol=0.01)


def test_samples_are_drawn_per_batch_seed(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m", bos_token_id=0, eos_token_id=1))
    settings = data.SampleSettings(tokens=6 * 16, seq_len=16, temperature=1.0, seed=3, batch=4)
    ids = data.sample(model, settings, bos_id=0, eos_ids=[1])
    assert ids.shape == (6, 16)
    # batch i is drawn from seed + i, so two processes together draw what one does
    a = data.sample(model, settings, 0, [1], part=(0, 2))
    b = data.sample(model, settings, 0, [1], part=(1, 2))
    assert torch.equal(a + b, ids)


def test_sampling_stops_at_its_time_share(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m", bos_token_id=0, eos_token_id=1))
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(data.time, "monotonic", lambda: next(clock))
    settings = data.SampleSettings(tokens=8 * 16, seq_len=16, temperature=1.0, seed=0, batch=2, seconds=15)
    ids = data.sample(model, settings, 0, [1])
    assert ids.shape == (4, 16)  # two batches of 2 sequences: the second passed 15 s
    assert settings.key("m", "cpu") != data.SampleSettings(8 * 16, 16, 1.0, 0, 2).key("m", "cpu")


def test_samples_needed_is_what_the_run_reads():
    r = load_heal_recipe().replace(tokens=16384, batch_tokens=2048, micro_batch_tokens=2048)
    assert data.samples_needed(r, r.batch_sequences) == 16384  # not the recipe's 4,194,304
    assert data.samples_needed(r, 1) == 16384 // 4  # a quarter of each batch from samples
    assert data.samples_needed(load_heal_recipe(), 64) == load_heal_recipe().sample_tokens  # capped
    assert data.samples_needed(r, 4, timed=True) == r.sample_tokens


def test_block_loss_is_relative_to_each_blocks_change():
    x = [torch.zeros(2, 3, 4), torch.ones(2, 3, 4)]
    t = [torch.ones(2, 3, 4), 3 * torch.ones(2, 3, 4)]  # block 0 adds 1, block 1 adds 2
    y = [t[0] + 0.5, t[1] + 1.0]  # each off by half its change: relative squared error 0.25
    assert float(block_loss(y, t, x)) == pytest.approx(0.25)
    assert float(block_loss(t, t, x)) == 0.0


@pytest.mark.parametrize("arch", ["llama", "gemma3", "smollm3"])
def test_block_states_are_the_decoders_hidden_states(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from bitquant.training.student import block_states, run_blocks

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m", arch=arch)).eval()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        states = block_states(model.get_decoder(), ids)
        ref = model(ids, output_hidden_states=True).hidden_states
        outs = run_blocks(model.get_decoder(), states[:-1])
    assert len(states) == len(ref) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(states[:-1], ref[:-1]))
    assert torch.allclose(model.get_decoder().norm(states[-1]), ref[-1], atol=1e-5)
    assert all(torch.allclose(o, s, atol=1e-5) for o, s in zip(outs, states[1:]))


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


def test_each_stage_has_its_own_schedule():
    r = HealRecipe(tokens=100 * 512, batch_tokens=512, micro_batch_tokens=512, seq_len=512, warmup_steps=4, lr=1e-3,
                   sample_tokens=512, block_stage=0.3)
    lrs = [lr_at(s, r) for s in range(r.steps)]
    assert r.block_steps == 30
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3) and lrs[29] == pytest.approx(0.0, abs=1e-12)
    assert lrs[30] == pytest.approx(2.5e-4) and lrs[33] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


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
    (dict(block_stage=1.0), "'block_stage' at least 0 and below 1"),
    (dict(time_budget=0), "'time_budget' must be a positive number"),
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
