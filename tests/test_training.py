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


@pytest.mark.parametrize("top_p,greedy", [(1.0, 0), (0.9, 3)])
def test_samples_through_the_static_decoder_are_the_same_draws(tmp_path, top_p, greedy):
    """On CUDA full batches go through a StaticDecoder (its step a CUDA graph); run eagerly,
    it draws exactly what the eager loop draws, and a short last batch takes the loop."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m", bos_token_id=0, eos_token_id=1)).eval()
    settings = data.SampleSettings(tokens=7 * 16, seq_len=16, temperature=1.0, seed=5, batch=3, top_p=top_p,
                                   greedy=greedy)
    static = data.sample(model, settings, 0, [1], static=True)
    assert static.shape == (7, 16) and not (static[:, 1:] == 1).any()
    assert torch.equal(static, data.sample(model, settings, 0, [1], static=False))


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


DIVERGENCES = [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.5, 1.0), ("jsd", 0.1, 2.0),
               ("reverse_kl", 0.5, 0.7)]


@pytest.mark.parametrize("kind,beta,temperature", DIVERGENCES)
def test_chunked_divergences_equal_whole_logits(kind, beta, temperature):
    """Each divergence's chunked value and gradients equal autograd through whole logits."""
    from bitquant.training.loss import Divergence, chunked, reference

    torch.manual_seed(3)
    div = Divergence(kind, beta, temperature)
    h_s = torch.randn(29, 12, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(29, 12, dtype=torch.float64), torch.randn(40, 12, dtype=torch.float64)
    value = chunked(h_s, w_s, h_t, w_t, div, budget=6 * 40)  # 6 rows a chunk
    value.backward()
    grads = h_s.grad.clone(), w_s.grad.clone()
    h_s.grad = w_s.grad = None
    ref = reference(h_s, w_s, h_t, w_t, div)
    ref.backward()
    assert float(ref.detach()) > 0
    assert torch.allclose(value.double(), ref.detach().double(), rtol=1e-5)  # the logits are formed in float32
    assert (grads[0] - h_s.grad).norm() <= 1e-5 * h_s.grad.norm()
    assert (grads[1] - w_s.grad).norm() <= 1e-5 * w_s.grad.norm()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_unlikelihood_term_equals_whole_logits(kind):
    """The unlikelihood term (rows with a negative token) added to each divergence: chunked
    value and gradients equal autograd through whole logits; without negatives it is off."""
    from bitquant.training.loss import Divergence, chunked, reference

    torch.manual_seed(6)
    div = Divergence(kind, 0.3, 1.5)
    h_s = torch.randn(29, 12, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(29, 12, dtype=torch.float64), torch.randn(40, 12, dtype=torch.float64)
    negative = torch.randint(-20, 40, (29,)).clamp_min(-1)
    assert 0 < int((negative >= 0).sum()) < 29
    value = chunked(h_s, w_s, h_t, w_t, div, budget=6 * 40, negative=negative, alpha=0.8)
    value.backward()
    grads = h_s.grad.clone(), w_s.grad.clone()
    h_s.grad = w_s.grad = None
    ref = reference(h_s, w_s, h_t, w_t, div, negative, 0.8)
    ref.backward()
    plain = float(reference(h_s, w_s, h_t, w_t, div))
    assert float(ref.detach()) > plain + 1e-3  # the term is there
    assert torch.allclose(value.double(), ref.detach().double(), rtol=1e-5)
    assert (grads[0] - h_s.grad).norm() <= 1e-5 * h_s.grad.norm()
    assert (grads[1] - w_s.grad).norm() <= 1e-5 * w_s.grad.norm()
    none = torch.full((29,), -1)
    assert abs(float(chunked(h_s, w_s, h_t, w_t, div, negative=none, alpha=0.8)) - plain) < 1e-5


def test_unlikelihood_lowers_the_negative_tokens_probability():
    from bitquant.training.loss import chunked

    torch.manual_seed(7)
    h = torch.randn(8, 6, requires_grad=True)
    w = torch.randn(20, 6)
    h_t = h.detach().clone()  # the teacher agrees: the divergence pulls nowhere, the term alone acts
    negative = torch.full((8,), 3)
    before = torch.softmax(h @ w.T, -1)[:, 3]
    chunked(h, w, h_t, w, negative=negative, alpha=5.0).backward()
    after = torch.softmax((h - 0.1 * h.grad) @ w.T, -1)[:, 3]
    assert bool((after < before).all())


def test_repeated_marks_the_tokens_that_repeat_an_ngram():
    from bitquant.training.loss import repeated

    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2], [5, 5, 5, 5, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert repeated(ids, 2).int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0], [0] * 8]
    assert repeated(ids, 4).int().tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 0, 0, 0], [0] * 8]
    assert not repeated(ids[:, :3], 4).any()
    # rows do not see each other's n-grams
    assert not repeated(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]), 4).any()


def test_divergences_differ_and_vanish_for_equal_models():
    from bitquant.training.loss import Divergence, chunked

    torch.manual_seed(4)
    h, w = torch.randn(16, 8), torch.randn(30, 8)
    h2 = torch.randn(16, 8)
    values = {k: float(chunked(h2, w, h, w, Divergence(k, 0.5))) for k in ("forward_kl", "reverse_kl", "jsd")}
    assert len({round(v, 4) for v in values.values()}) == 3  # three different quantities
    assert values["jsd"] < min(values["forward_kl"], values["reverse_kl"])  # JSD is bounded by the KLs' mixture
    for k in values:
        assert abs(float(chunked(h, w, h, w, Divergence(k, 0.5)))) < 1e-6


@pytest.mark.parametrize("kind,beta,temperature,head", [("forward_kl", 0.5, 1.0, False), ("jsd", 0.1, 2.0, False),
                                                         ("forward_kl", 0.5, 1.0, True)])
def test_compiled_chunks_equal_whole_logits(kind, beta, temperature, head, monkeypatch, compiled_loss_calls):
    """The chunked loss with each chunk torch.compile'd (heal's road on CUDA, forced here on
    the CPU) gives autograd's value and gradients through whole logits, the head's too where it
    is trained (``train: [..., embeddings]``), and is the road taken."""
    from bitquant.training import loss
    from bitquant.training.loss import Divergence, chunked, reference

    torch.manual_seed(4)
    div = Divergence(kind, beta, temperature)
    h_s = torch.randn(29, 12, requires_grad=True)
    w_s = torch.randn(40, 12, requires_grad=head)  # not trained in the bundled recipe
    h_t, w_t = torch.randn(29, 12), torch.randn(40, 12)
    value = chunked(h_s, w_s, h_t, w_t, div, budget=6 * 40)  # 6 rows a chunk, the last one 5
    value.backward()
    assert not loss._COMPILED_FAILED
    assert len(compiled_loss_calls) == 5  # five chunks went through the compiled function
    grad, grad_w = h_s.grad.clone(), None if w_s.grad is None else w_s.grad.clone()
    h_s.grad = w_s.grad = None
    ref = reference(h_s, w_s, h_t, w_t, div)
    ref.backward()
    assert abs(float(value) - float(ref)) <= 1e-5 * abs(float(ref))
    assert (grad - h_s.grad).norm() <= 1e-5 * h_s.grad.norm()
    if head:
        assert (grad_w - w_s.grad).norm() <= 1e-5 * w_s.grad.norm()
    assert loss.implementation("cpu", div) == "chunked (torch, each chunk compiled)"
    monkeypatch.setenv("BITQUANT_COMPILED_LOSS", "0")
    assert loss.implementation("cpu", div) == "chunked (torch)"


@pytest.mark.parametrize("kind,beta,temperature", DIVERGENCES[:4])
def test_fused_and_chunked_losses_agree(kind, beta, temperature):
    """liger-kernel's fused kernel (run here by Triton's interpreter) and the pure-torch
    chunked loop give the same divergence and gradients."""
    pytest.importorskip("liger_kernel")
    from bitquant.training.loss import Divergence, chunked, fused

    torch.manual_seed(5)
    div = Divergence(kind, beta, temperature)
    h_s = torch.randn(21, 16, requires_grad=True)
    w_s = torch.randn(50, 16, requires_grad=True)
    h_t, w_t = torch.randn(21, 16), torch.randn(50, 16)
    out = []
    for fn in (chunked, fused):
        h_s.grad = w_s.grad = None
        value = fn(h_s, w_s, h_t, w_t, div)
        value.backward()
        out.append((float(value), h_s.grad.clone(), w_s.grad.clone()))
    (a, ga, wa), (b, gb, wb) = out
    assert abs(a - b) <= 1e-5 * abs(a)
    assert (ga - gb).norm() <= 1e-5 * ga.norm() and (wa - wb).norm() <= 1e-5 * wa.norm()


def test_recipe_refuses_bad_losses_and_on_policy_shares():
    with pytest.raises(RecipeError, match="recipe field 'loss' is 'kl2'; choose one of forward_kl, reverse_kl, jsd"):
        HealRecipe(loss="kl2")
    with pytest.raises(RecipeError, match="must be between 0 and 1, got 1.5"):
        HealRecipe(on_policy=1.5)
    with pytest.raises(RecipeError, match="'loss_beta' must be between 0 and 1"):
        HealRecipe(loss="jsd", loss_beta=1.0)
    with pytest.raises(RecipeError, match="'on_policy_prompt' \\(512\\) must be shorter than 'seq_len'"):
        HealRecipe(on_policy=0.5, on_policy_prompt=512)
    assert HealRecipe(on_policy=0.25).on_policy_rows == 16  # of 64 sequences
    with pytest.raises(RecipeError, match="recipe field 'unlikelihood'\\) acts on the text the student writes itself"):
        HealRecipe(unlikelihood=1.0)
    with pytest.raises(RecipeError, match="recipe field 'unlikelihood'\\) must be 0 or more and 'unlikelihood_n' at least 2"):
        HealRecipe(on_policy=0.25, unlikelihood=-1.0)
    with pytest.raises(RecipeError, match="'unlikelihood_n' at least 2"):
        HealRecipe(on_policy=0.25, unlikelihood=1.0, unlikelihood_n=1)


def test_row_distinct_counts_repetition():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 1, 2, 1, 2, 1, 2], [5, 5, 5, 5, 5, 5, 5, 5]])
    d = data.row_distinct(ids)
    assert d[0] == 1.0 and abs(float(d[1]) - 2 / 5) < 1e-6 and abs(float(d[2]) - 1 / 5) < 1e-6


def test_choose_greedy_top_p_and_temperature():
    from bitquant.decode import choose

    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]] * 2000)
    g = torch.Generator().manual_seed(0)
    assert choose(logits[:3], 0.0, g).tolist() == [1, 1, 1]
    drawn = choose(logits, 1.0, g, top_p=0.9)  # tokens 1 (0.51 of the mass) and 2 (0.46) reach 0.9
    assert set(drawn.tolist()) == {1, 2}
    drawn = choose(logits, 1.0, g)
    assert set(drawn.tolist()) >= {0, 1, 2}


def test_samples_with_a_greedy_start_and_a_repetition_filter(tmp_path):
    """LLM-QAT's start (BOS, a uniformly drawn token, greedy tokens, then sampling) and the
    filter that drops repetitive sequences; both keyed in the cache."""
    model = _tiny_lm(tmp_path)
    plain = data.SampleSettings(8 * 12, 12, 1.0, 0, 4)
    greedy = data.SampleSettings(8 * 12, 12, 1.0, 0, 4, greedy=3)
    strict = data.SampleSettings(8 * 12, 12, 1.0, 0, 4, min_distinct=1.0)
    assert len({s.key("m", "cpu") for s in (plain, greedy, strict)}) == 3
    ids = data.sample(model, greedy, 0, [1])
    assert (ids[:, 0] == 0).all() and not (ids[:, 1] == ids[0, 1]).all()  # the second token is drawn at random
    with torch.inference_mode():
        logits = model(ids[:, :4]).logits
    assert (logits[:, 1:4].argmax(-1) == ids[:, 2:5]).all()  # then three greedy tokens
    kept, info = data.cached_samples(model, strict, "k", tmp_path / "cache", 0, [1], 96)
    assert info["sequences"] + info["dropped_sequences"] == 8 and (data.row_distinct(kept) >= 1.0).all()


def _tiny_lm(tmp_path):
    from bitquant import runtime

    return runtime.load_fp(make_checkpoint(tmp_path / "lm", vocab_size=96, bos_token_id=0, eos_token_id=1), torch.float32,
                           "cpu")
