"""Generation beside the runtime: the static-cache decoder that CUDA graphs replay (run
eagerly here), its agreement with transformers' generate, and the sampling rule."""

import pytest
import torch

from bitquant.decode import StaticDecoder
from bitquant.generate import Sampling, generate, next_token
from conftest import NEW_FAMILIES, make_checkpoint, make_heal_source


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", *NEW_FAMILIES])
def test_static_decoder_steps_are_the_models_forward_pass(tmp_path, arch):
    """Fixed shapes (the whole cache read under a mask, the position a device tensor) give
    the full forward pass's logits at every position, 16 of them: past Gemma 3's window of 8."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m", arch=arch)).eval()
    ids = torch.randint(2, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    decoder = StaticDecoder(model, 2, 20, graph=False)
    with torch.no_grad():
        full = model(ids).logits.float()
    for pos in range(16):
        logits = decoder.step(ids[:, pos : pos + 1], pos)
        assert torch.allclose(logits, full[:, pos], atol=1e-4, rtol=1e-4), pos
    with pytest.raises(ValueError, match="outside the cache"):
        decoder.step(ids[:, :1], 20)


def test_static_generate_equals_transformers_greedy(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_heal_source(tmp_path / "m", tiny_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([[5, 9, 33, 2, 41]])
    sampling = Sampling(max_new_tokens=12)
    seen = []
    ours = generate(model, tokenizer, ids, sampling, on_text=seen.append, static=True)
    theirs = generate(model, tokenizer, ids, sampling, static=False)
    assert ours.ids == theirs.ids and ours.text == theirs.text
    assert "".join(seen) == ours.text


def test_static_generate_with_the_packed_kernel(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """A ternary model loaded as on a GPU (packed W2A8 layers, under Triton's interpreter, and
    the token table in host memory, looked up outside the decoder's step) decodes the int8
    runtime's greedy tokens."""
    pytest.importorskip("triton")
    from bitquant import runtime
    from bitquant.convert import convert

    src = make_heal_source(tmp_path / "src", tiny_tokenizer_dir, arch="qwen2")
    convert(str(src), tmp_path / "out")
    tokenizer = runtime.load_tokenizer(tmp_path / "out")
    ids = torch.tensor([[5, 9, 33, 2, 41]])
    want = generate(runtime.load_ternary(tmp_path / "out", torch.float32, "cpu"), tokenizer, ids,
                    Sampling(max_new_tokens=8), static=False)
    monkeypatch.setattr(runtime, "packed_kernel", lambda device, act_quant: act_quant)
    monkeypatch.setattr(runtime, "host_embedding", lambda device, config: True)  # the token table in host memory
    model = runtime.load_ternary(tmp_path / "out", torch.float32, "cpu")
    assert model.model.layers[0].self_attn.q_proj.packed is not None
    assert isinstance(model.get_input_embeddings(), runtime.HostEmbedding)
    assert generate(model, tokenizer, ids, Sampling(max_new_tokens=8), static=True).ids == want.ids


@pytest.mark.parametrize("backend,dtype", [("aot_eager", torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_a_compiled_step_gives_the_same_logits(tmp_path, tiny_tokenizer_dir, monkeypatch, backend, dtype):
    """``compile``: the step traced by torch.compile, each packed ternary layer one opaque
    operator (its fake gives the shape); the logits equal the uncompiled step's at every
    position. aot_eager checks the trace; True is inductor as ``generate --compile`` builds
    it (fused code, C++ on the CPU), told to keep eager's roundings to bf16."""
    pytest.importorskip("triton")
    from bitquant import runtime
    from bitquant.convert import convert

    src = make_heal_source(tmp_path / "src", tiny_tokenizer_dir, arch="llama")
    convert(str(src), tmp_path / "out")
    monkeypatch.setattr(runtime, "packed_kernel", lambda device, act_quant: act_quant)
    model = runtime.load_ternary(tmp_path / "out", dtype, "cpu")
    assert model.model.layers[0].mlp.down_proj.packed is not None
    torch._dynamo.reset()
    plain = StaticDecoder(model, 1, 8, graph=False)
    compiled = StaticDecoder(model, 1, 8, graph=False, compile=backend)
    for pos, token in enumerate([5, 9, 33, 2, 41, 7]):
        want = plain.step(torch.tensor([[token]]), pos).clone()
        got = compiled.step(torch.tensor([[token]]), pos)
        assert torch.equal(got, want) if dtype == torch.bfloat16 else torch.allclose(got, want, atol=1e-5, rtol=1e-5), pos


def test_compile_asks_inductor_for_eagers_roundings(tmp_path, monkeypatch):
    """``compile=True`` passes inductor ``emulate_precision_casts``: on the GPU, without it,
    the compiled logits moved by 3.5-16% of the largest (docs/measurements.md); on the CPU
    inductor rounds as eager either way, so the option is checked here, not its effect."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m", arch="llama")).eval()
    asked = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: asked.append(kw) or fn)
    StaticDecoder(model, 1, 8, graph=False, compile=True)
    StaticDecoder(model, 1, 8, graph=False, compile="aot_eager")
    assert asked == [{"dynamic": False, "options": {"emulate_precision_casts": True}},
                     {"dynamic": False, "backend": "aot_eager"}]


def test_next_token_is_argmax_or_a_top_p_draw():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert int(next_token(logits, Sampling(), g)) == 0
    draws = torch.stack([next_token(logits, Sampling(temperature=1.0, top_p=0.6), g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[2] == 0 and freq[3] == 0  # 0.5 < 0.6: the second token is needed, the third is not
    assert abs(float(freq[0]) - 0.625) < 0.03
    draws = torch.stack([next_token(logits, Sampling(temperature=1.0), g) for _ in range(4000)])
    assert torch.allclose(torch.bincount(draws, minlength=4).float() / len(draws), logits.exp()[0], atol=0.03)


def test_distinct_se_is_the_spread_of_each_completions_own_figure():
    from bitquant.generate import distinct_ngrams, distinct_se

    loops = [5, 6, 7, 8] * 4  # 16 tokens, 13 4-grams, 4 distinct
    fresh = list(range(16))  # 13 4-grams, all distinct
    assert distinct_ngrams([loops], 4) == 4 / 13 and distinct_ngrams([fresh], 4) == 1.0
    # two completions 4/13 and 1: standard deviation |1 - 4/13| / sqrt(2), over sqrt(2)
    assert distinct_se([loops, fresh]) == round((1 - 4 / 13) / 2, 4)
    assert distinct_se([fresh, fresh]) == 0.0
    assert distinct_se([fresh, [1, 2]]) is None  # one completion of 4 tokens or more: no spread


@pytest.mark.parametrize("road", ["fp", "ternary"])
def test_batched_completions_are_the_ones_each_prompt_gets_alone(tmp_path, tiny_tokenizer_dir, road):
    """The report's completions, left-padded into batches (here 4, so the last is partial),
    give each prompt the greedy tokens it gets alone: the FP model through transformers and
    the ternary runtime on the CPU."""
    from transformers import AutoModelForCausalLM

    from bitquant import runtime
    from bitquant.convert import convert
    from bitquant.generate import PROMPTS, completions, prompt_ids

    src = make_heal_source(tmp_path / "src", tiny_tokenizer_dir, arch="qwen2")
    tokenizer = runtime.load_tokenizer(src)
    if road == "fp":
        model = AutoModelForCausalLM.from_pretrained(src).eval()
    else:
        convert(str(src), tmp_path / "out")
        model = runtime.load_ternary(tmp_path / "out", torch.float32, "cpu")
    prompts = PROMPTS[:6]
    assert len({len(prompt_ids(tokenizer, p, False)[0]) for p in prompts}) > 1  # padding is exercised
    alone = [generate(model, tokenizer, prompt_ids(tokenizer, p, False), Sampling(max_new_tokens=12), static=False)
             for p in prompts]
    batched = completions(model, tokenizer, prompts, max_new_tokens=12, batch=4)
    assert [g.ids for g in batched] == [g.ids for g in alone]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert [g.prompt_tokens for g in batched] == [len(prompt_ids(tokenizer, p, False)[0]) for p in prompts]


def test_batched_completions_on_the_gpus_road(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """As on a GPU (packed W2A8 layers under Triton's interpreter, the token table in host
    memory), a left-padded batch completes as the int8 runtime does on the CPU. Few tokens:
    the interpreter takes seconds a forward pass."""
    pytest.importorskip("triton")
    from bitquant import runtime
    from bitquant.convert import convert
    from bitquant.generate import PROMPTS, completions

    src = make_heal_source(tmp_path / "src", tiny_tokenizer_dir, arch="qwen2")
    convert(str(src), tmp_path / "out")
    tokenizer = runtime.load_tokenizer(tmp_path / "out")
    want = completions(runtime.load_ternary(tmp_path / "out", torch.float32, "cpu"), tokenizer, PROMPTS[:3], 4)
    monkeypatch.setattr(runtime, "packed_kernel", lambda device, act_quant: act_quant)
    monkeypatch.setattr(runtime, "host_embedding", lambda device, config: True)
    model = runtime.load_ternary(tmp_path / "out", torch.float32, "cpu")
    assert model.model.layers[0].self_attn.q_proj.packed is not None
    assert [g.ids for g in completions(model, tokenizer, PROMPTS[:3], 4)] == [g.ids for g in want]


def test_a_failed_batch_is_completed_one_at_a_time_and_said(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """heal's report does not lose a finished run over its completions: where the batch
    fails, each prompt is completed alone (the same tokens) and the report says why."""
    from transformers import GenerationMixin

    from bitquant import runtime
    from bitquant.generate import PROMPTS, generation_report

    src = make_heal_source(tmp_path / "src", tiny_tokenizer_dir)
    tokenizer = runtime.load_tokenizer(src)
    want = generation_report([("source", src)], tokenizer, "cpu")
    plain = GenerationMixin.generate

    def no_batches(self, inputs=None, **kw):
        if inputs is not None and inputs.shape[0] > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return plain(self, inputs, **kw)

    monkeypatch.setattr(GenerationMixin, "generate", no_batches)
    got = generation_report([("source", src)], tokenizer, "cpu")
    assert got["one_at_a_time"] == {"source": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert "one_at_a_time" not in want and got["models"] == want["models"]
    assert len(got["models"]["source"]["completions"]) == len(PROMPTS)
