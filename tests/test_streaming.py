"""Block-streamed evaluation gives the in-memory path's numbers in bounded memory."""

import pytest
import torch

from bitquant import evaluate, streaming
from bitquant.convert import convert
from bitquant.evaluate import EvalSettings
from bitquant.recipe import load_recipe
from bitquant.source import open_checkpoint
from conftest import DATA, TOKENIZER_VOCAB, add_tokenizer, make_checkpoint

TEXT = DATA / "alice29.txt"


def settings(stream, **kw):
    return EvalSettings(**{"context": 32, "max_tokens": 600, "device": "cpu", "stream": stream, **kw})


@pytest.fixture
def model(tmp_path, tiny_tokenizer_dir, request):
    arch, tied = getattr(request, "param", ("llama", False))
    src = make_checkpoint(tmp_path / "src", arch=arch, tied=tied, vocab_size=TOKENIZER_VOCAB)
    return add_tokenizer(src, tiny_tokenizer_dir)


@pytest.mark.parametrize("model", [("llama", False), ("llama", True), ("mistral", False), ("qwen2", True)], indirect=True)
@pytest.mark.parametrize("stride", [None, 20])
def test_fp_perplexity_streamed_equals_in_memory(model, stride):
    a = evaluate.evaluate(str(model), TEXT, settings=settings(False, stride=stride))
    b = evaluate.evaluate(str(model), TEXT, settings=settings(True, stride=stride))
    assert not a.streamed and b.streamed
    assert abs(a.perplexity - b.perplexity) / a.perplexity < 1e-5
    assert (a.tokens, a.windows) == (b.tokens, b.windows)


@pytest.mark.parametrize("model", [("llama", False), ("qwen2", False)], indirect=True)
@pytest.mark.parametrize("weights_only", [False, True])
def test_ternary_and_compare_streamed_equal_in_memory(model, tmp_path, weights_only):
    out = tmp_path / "partly"
    convert(str(model), out, recipe=load_recipe().replace(exclude=("model.layers.0.*",)))
    a = evaluate.evaluate(str(out), TEXT, settings=settings(False), act_quant=not weights_only)
    b = evaluate.evaluate(str(out), TEXT, settings=settings(True), act_quant=not weights_only)
    assert a.mode == b.mode and abs(a.perplexity - b.perplexity) / a.perplexity < 1e-3
    tokens = evaluate.tokenize_for(model, TEXT, settings(None))
    c = evaluate.compare(model, out, tokens, settings=settings(False))
    d = evaluate.compare(model, out, tokens, settings=settings(True))
    assert not c["streamed"] and d["streamed"]
    for key in ("baseline", "quantized", "kl_mean"):
        assert abs(c[key] - d[key]) <= 1e-3 * abs(c[key]) + 1e-9, key
    assert abs(c["top1_agreement"] - d["top1_agreement"]) < 0.01


def test_streaming_is_chosen_when_the_models_do_not_fit(model, monkeypatch):
    monkeypatch.setattr(streaming, "available_bytes", lambda device: 1000)
    assert evaluate.evaluate(str(model), TEXT, settings=settings(None)).streamed
    monkeypatch.setattr(streaming, "available_bytes", lambda device: 10**12)
    assert not evaluate.evaluate(str(model), TEXT, settings=settings(None)).streamed


def test_model_bytes_counts_unpacked_codes(model, tmp_path):
    out = tmp_path / "t"
    convert(str(model), out)
    fp = streaming.model_bytes(model, torch.float32)
    w158a8 = streaming.model_bytes(out, torch.float32)
    weights_only = streaming.model_bytes(out, torch.float32, act_quant=False)
    specs = [s for _, s in open_checkpoint(model).iter_specs()]
    projections = [s for s in specs if s.name.endswith("_proj.weight")]
    assert fp == 4 * sum(s.numel for s in specs)
    # int8 codes instead of float32, plus one float32 weight_scale per projection
    assert fp - w158a8 == 3 * sum(s.numel for s in projections) - 4 * len(projections)
    assert weights_only >= fp  # float codes, plus the scales


def test_progress_counts_blocks_then_windows(model):
    seen = []
    r = evaluate.evaluate(str(model), TEXT, settings=settings(True), progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (2 + r.windows, 2 + r.windows) and [d for d, _ in seen] == list(range(1, len(seen) + 1))
