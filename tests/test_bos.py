"""BOS, the way each model was trained: every window that bitquant scores and every sequence
it trains or calibrates on starts with BOS where the model's tokenizer adds one by default
(``per_window``: Llama 2 and 3, Mistral, Gemma), and with nothing where it adds none
(``none``: SmolLM2, Qwen2). Checked against plain transformers on the same windows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bitquant import text
from bitquant.convert import convert
from bitquant.errors import SourceError
from bitquant.evaluate import EvalSettings, evaluate
from bitquant.recipe import load_recipe
from conftest import DATA, TOKENIZER_VOCAB, add_tokenizer, make_bos_tokenizer, make_checkpoint

TEXT = DATA / "alice29.txt"


@pytest.fixture(scope="module", params=["llama", "gemma"])
def bos_model(request, tmp_path_factory) -> Path:
    """A tiny random Llama whose tokenizer adds BOS (Llama or Gemma style)."""
    folder = tmp_path_factory.mktemp(f"bos-{request.param}")
    tok = make_bos_tokenizer(folder / "tok", request.param)
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(tok).bos_token_id
    return add_tokenizer(make_checkpoint(folder / "model", vocab_size=TOKENIZER_VOCAB, bos_token_id=bos), tok)


def reference_perplexity(folder: Path, max_tokens: int, context: int) -> float:
    """Plain transformers: the text without special tokens, cut into windows of context - 1
    tokens, each fed after BOS; every text token scored (llama.cpp's convention)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(TEXT.read_text(), add_special_tokens=False)["input_ids"][:max_tokens]
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(ids), context - 1):
            window = [tok.bos_token_id] + ids[b : b + context - 1]
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), -1)
            target = torch.tensor(window[1:])
            nll -= float(logp[:-1].gather(1, target[:, None]).sum())
            n += len(target)
    return math.exp(nll / n)


def test_bos_is_found_where_the_tokenizer_adds_it(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    assert text.bos_token(AutoTokenizer.from_pretrained(tiny_tokenizer_dir)) is None
    for style, want in (("llama", 1), ("gemma", 2)):
        assert text.bos_token(AutoTokenizer.from_pretrained(make_bos_tokenizer(tmp_path / style, style))) == want
    broken = AutoTokenizer.from_pretrained(make_bos_tokenizer(tmp_path / "broken", "broken"))
    with pytest.raises(SourceError, match="adds token 1 before the text but names no BOS token"):
        text.bos_token(broken)


@pytest.mark.parametrize("n,context,stride", [(100, 16, 16), (100, 16, 5), (31, 16, 16), (15, 16, 16), (250, 64, 20)])
def test_windows_score_every_token_once_in_both_conventions(n, context, stride):
    for bos in (False, True):
        spans = text.windows(n, context, stride, bos)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert scored == sorted(set(scored))  # each token at most once, in order
        assert all(end - begin + bos <= context for begin, end, _ in spans)  # BOS counts in the window
        if bos:
            assert scored == list(range(n))  # every token, the first of each window after BOS
        elif stride == context:  # non-overlapping: each window's first token has no context
            assert scored == [t for t in range(1, n) if t % context]
        else:  # overlapping: an earlier window gives every later token its context
            assert scored == list(range(1, n))


def test_windows_and_scored_rows_line_up():
    ids = torch.arange(10, 30)
    span = text.windows(20, 8, 8, True)[1]  # second window: text 7..14
    x = text.window_input(ids, span, 99)
    assert x.tolist() == [99] + list(range(17, 24))
    rows = text.scored_rows(span, 99)
    assert [int(x[i + 1]) for i in range(rows.start, rows.stop)] == list(range(17, 24))  # each row predicts the next


def test_sequences_start_with_bos_where_there_is_one():
    ids = list(range(100, 130))
    assert text.sequences(ids, 8, None).shape == (3, 8)
    seqs = text.sequences(ids, 8, 7)
    assert seqs.shape == (4, 8) and (seqs[:, 0] == 7).all() and seqs[1, 1:].tolist() == list(range(107, 114))


@pytest.mark.parametrize("stream", [False, True])
def test_eval_equals_transformers_with_bos_before_every_window(bos_model, stream):
    result = evaluate(str(bos_model), TEXT, settings=EvalSettings(context=64, max_tokens=1000, device="cpu",
                                                                  stream=stream))
    assert result.bos == "per_window" and result.tokens == 1000
    want = reference_perplexity(bos_model, 1000, 64)
    assert abs(result.perplexity - want) <= 1e-4 * want


def test_convert_eval_text_measures_the_source_with_bos(bos_model, tmp_path):
    recipe = load_recipe().replace(eval_context=64, eval_max_tokens=1000)
    report = convert(str(bos_model), tmp_path / "out", recipe=recipe, eval_text=TEXT)
    assert report.perplexity["bos"] == "per_window"
    want = reference_perplexity(bos_model, 1000, 64)
    assert abs(report.perplexity["baseline"] - want) <= 1e-4 * want
    ternary = evaluate(str(tmp_path / "out"), TEXT, settings=EvalSettings(context=64, max_tokens=1000, device="cpu"))
    assert abs(report.perplexity["quantized"] - ternary.perplexity) <= 1e-4 * ternary.perplexity


def test_a_model_without_bos_is_scored_as_before(tiny_lm):
    result = evaluate(str(tiny_lm), TEXT, settings=EvalSettings(context=64, max_tokens=640, device="cpu"))
    assert result.bos == "none" and result.tokens == 640 - 10  # each window's first token is not scored


def test_heal_trains_and_measures_with_bos(bos_model, tmp_path, monkeypatch):
    """heal on a model whose tokenizer adds BOS: its text sequences and teacher samples start
    with the tokenizer's BOS, its --eval-text windows too, and the report says so."""
    from bitquant.heal import heal
    from bitquant.training import data
    from bitquant.training.recipe import load_heal_recipe

    monkeypatch.setenv("BITQUANT_CACHE", str(tmp_path / "cache"))
    seen = []
    real = data.Batches.__init__

    def spy(self, pools, per_batch, seed):
        seen.extend(pools)
        real(self, pools, per_batch, seed)

    monkeypatch.setattr(data.Batches, "__init__", spy)
    recipe = load_heal_recipe().replace(tokens=4 * 4 * 32, batch_tokens=4 * 32, micro_batch_tokens=4 * 32, seq_len=32,
                                        sample_tokens=16 * 32, sample_batch=8, min_steps=1, data_share=0.5,
                                        eval_context=64, eval_max_tokens=1000)
    book = DATA.parent.parent / "bitquant" / "data" / "paradise-lost.txt"
    report = heal(str(bos_model), tmp_path / "out", recipe=recipe, data_files=(book,), eval_text=TEXT, device="cpu")
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(bos_model).bos_token_id
    assert len(seen) == 2 and all(bool((pool[:, 0] == bos).all()) for pool in seen)  # text, then samples
    assert report.heal["bos"] == "per_window" and report.perplexity["bos"] == "per_window"
    want = reference_perplexity(bos_model, 1000, 64)
    assert abs(report.perplexity["baseline"] - want) <= 1e-4 * want
