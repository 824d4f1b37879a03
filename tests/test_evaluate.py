import json
import math

import pytest
import torch
from click.testing import CliRunner

from bitquant.cli.main import cli
from bitquant.convert import convert
from bitquant.evaluate import EvalSettings, compare, evaluate, token_nlls, tokenize_for, windows
from bitquant.errors import UsageError
from conftest import DATA, make_checkpoint
from reference import reference_model

TEXT = DATA / "alice29.txt"


def test_windows_score_every_token_once():
    for n, ctx, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 16), (16, 16, 4)]:
        scored = [t for _, end, first in windows(n, ctx, stride) for t in range(first, end)]
        assert sorted(scored) == sorted(set(scored))
        assert all(end - begin <= ctx for begin, end, _ in windows(n, ctx, stride))
        if stride < ctx:
            assert scored == list(range(1, n))


def independent_ppl(model, ids, ctx):
    """Non-overlapping windows, transformers' own shifted loss."""
    total, count = 0.0, 0
    for b in range(0, len(ids), ctx):
        x = torch.tensor([ids[b : b + ctx]])
        if x.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(x, labels=x).loss
        total += float(loss) * (x.shape[1] - 1)
        count += x.shape[1] - 1
    return math.exp(total / count), count


def test_perplexity_equals_independent_computation(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = evaluate(str(tiny_lm), TEXT, settings=EvalSettings(context=64, stride=64, max_tokens=1000))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(tiny_lm)((TEXT).read_text(), add_special_tokens=False)["input_ids"][:1000]
    ppl, count = independent_ppl(model, ids, 64)
    assert r.tokens == count and r.text_tokens == 1000 and r.truncated
    assert r.perplexity == pytest.approx(ppl, rel=1e-6)
    assert r.mode == "full precision" and r.tokens_per_second > 0
    assert 0 < r.stderr < r.perplexity


def test_ternary_path_equals_transformers_bitlinear(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    convert(str(tiny_lm), tmp_path / "q")
    settings = EvalSettings(context=64, stride=32, max_tokens=800)
    ours = evaluate(str(tmp_path / "q"), TEXT, settings=settings)
    theirs_model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    tokens = tokenize_for(tmp_path / "q", TEXT, settings)
    nll, _ = token_nlls(theirs_model, tokens.ids, 64, 32, "cpu")
    assert ours.mode == "ternary W1.58A8"
    assert ours.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)


def test_weights_only_differs_and_matches_dequantized_forward(tiny_lm, tmp_path):
    convert(str(tiny_lm), tmp_path / "q")
    settings = EvalSettings(context=64, max_tokens=640)
    a8 = evaluate(str(tmp_path / "q"), TEXT, settings=settings)
    wo = evaluate(str(tmp_path / "q"), TEXT, settings=settings, act_quant=False)
    assert wo.mode == "ternary weights-only"
    assert wo.perplexity != pytest.approx(a8.perplexity, rel=1e-6)
    from safetensors import safe_open

    from reference import absmean_reference

    quantized = {}
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f, safe_open(tiny_lm / "model.safetensors", "pt") as g:
        for name in f.keys():
            if name.endswith(".weight_scale"):
                module = name.removesuffix(".weight_scale")
                codes, _ = absmean_reference(g.get_tensor(module + ".weight"))
                quantized[module] = (codes, float(f.get_tensor(name)))
    ref = reference_model(tiny_lm, quantized, act_bits=False)
    tokens = tokenize_for(tiny_lm, TEXT, settings)
    nll, _ = token_nlls(ref, tokens.ids, 64, 64, "cpu")
    assert wo.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def test_compare_of_a_model_with_itself(tiny_lm):
    settings = EvalSettings(context=64, max_tokens=320)
    tokens = tokenize_for(tiny_lm, TEXT, settings)
    r = compare(tiny_lm, tiny_lm, tokens, settings=settings)
    assert r["ratio"] == pytest.approx(1.0) and r["delta"] == pytest.approx(0.0, abs=1e-9)
    assert r["kl_mean"] == pytest.approx(0.0, abs=1e-6) and r["top1_agreement"] == 1.0


def test_convert_with_eval_text_reports_perplexity(tiny_lm, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["convert", str(tiny_lm), "-o", str(tmp_path / "q"), "--eval-text", str(TEXT),
                            "--eval-max-tokens", "512", "--eval-context", "64"])
    assert r.exit_code == 0, r.output
    assert "KL / top-1" in r.output
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    p = report["perplexity"]
    assert {"baseline", "quantized", "ratio", "delta", "kl_mean", "top1_agreement", "tokens", "context", "stride", "text_sha256"} <= set(p)
    assert p["ratio"] == pytest.approx(p["quantized"] / p["baseline"])
    assert p["kl_mean"] > 0 and 0 <= p["top1_agreement"] <= 1
    assert "perplexity, ternary" in (tmp_path / "q" / "README.md").read_text()


def test_convert_refuses_bad_eval_text_before_writing(tiny_lm, tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    r = CliRunner().invoke(cli, ["convert", str(tiny_lm), "-o", str(tmp_path / "q"), "--eval-text", str(tmp_path / "bin.txt")])
    assert r.exit_code == 2 and "NUL bytes" in r.stderr
    assert not (tmp_path / "q").exists()


def test_eval_cli_json_and_errors(tiny_lm, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["eval", str(tiny_lm), str(TEXT), "--context", "64", "--max-tokens", "256", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {"perplexity", "stderr", "tokens", "tokens_per_second", "model", "text_sha256"} <= set(d)
    r = runner.invoke(cli, ["eval", str(tiny_lm), str(TEXT), "--context", "64", "--max-tokens", "256"])
    assert r.exit_code == 0 and "perplexity" in r.output
    for args, msg in [
        ([str(tmp_path / "none.txt")], "does not exist"),
        ([str(TEXT), "--stride", "1000"], "--stride must be between"),
        ([str(TEXT), "--device", "cuda"] if not torch.cuda.is_available() else [str(TEXT), "--max-tokens", "10"], "cuda" if not torch.cuda.is_available() else "--max-tokens"),
    ]:
        r = runner.invoke(cli, ["eval", str(tiny_lm), *args])
        assert r.exit_code == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_settings_validation():
    with pytest.raises(UsageError):
        EvalSettings(context=64, stride=65)
    with pytest.raises(UsageError):
        EvalSettings(context=64, max_tokens=10)


@pytest.mark.parametrize("stride", [None, 12])
def test_batched_windows_give_the_numbers_of_one_window_at_a_time(tmp_path, stride):
    """Windows of one length go through the model together (the last, shorter window alone);
    the per-token NLLs equal those of one window per pass."""
    from transformers import AutoModelForCausalLM

    from bitquant.evaluate import token_nlls, windows

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "m")).eval()
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    stride = stride or 32
    assert len({e - b for b, e, _ in windows(150, 32, stride)}) == 2  # a shorter last window
    one, n1 = token_nlls(model, ids, 32, stride, "cpu", batch=1)
    many, n4 = token_nlls(model, ids, 32, stride, "cpu", batch=4)
    assert n1 == n4 and one.shape == many.shape
    assert torch.allclose(one, many, atol=1e-5)
