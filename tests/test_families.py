"""Every family of bitquant.families (Qwen3, Gemma 3, Phi-3, SmolLM3 here; Llama, Mistral,
Qwen2 and BitNet throughout the other tests), on tiny random checkpoints built from each
config class: codes and scales, the output in transformers, evaluation in memory and
streamed, heal's exactness, GGUF in llama.cpp, and the refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bitquant import evaluate, families
from bitquant.convert import convert
from bitquant.errors import SourceError, UnsupportedModelError, UsageError
from bitquant.evaluate import EvalSettings
from bitquant.recipe import load_recipe
from conftest import DATA, NEW_FAMILIES, TOKENIZER_VOCAB, add_tokenizer, make_checkpoint, make_heal_source, run_clean
from reference import absmean_reference, reference_model, unpack_reference

TEXT = DATA / "alice29.txt"
IDS = [3, 17, 42, 5, 88, 61, 9, 23, 77, 14, 2, 50, 31, 8, 66, 70]  # 16 tokens: past Gemma 3's window of 8


def family_modules(src) -> list[str]:
    """The source's projections by the family table (fused ones included)."""
    family = families.family_of(json.loads((src / "config.json").read_text()))
    leaves = {p.rsplit(".", 1)[-1] for p in family.projections}
    with safe_open(src / "model.safetensors", "pt") as f:
        return sorted(n.removesuffix(".weight") for n in f.keys()
                      if n.endswith(".weight") and ".layers." in n and n.split(".")[-2] in leaves)


def test_the_table_has_each_family_once_and_knows_the_new_ones():
    archs = [f.architecture for f in families.FAMILIES]
    assert len(archs) == len(set(archs)) and len({f.model_type for f in families.FAMILIES}) == len(archs)
    for arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "SmolLM3ForCausalLM"):
        assert arch in families.SUPPORTED_ARCHITECTURES
    assert {"qkv_proj", "gate_up_proj"} <= set(families.PROJECTIONS)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", *NEW_FAMILIES])
def test_the_row_names_every_module_of_a_block(tmp_path, arch):
    """Each block tensor is a projection or a norm of the family's row (or a bias)."""
    src = make_checkpoint(tmp_path / "src", arch=arch)
    family = families.family_of(json.loads((src / "config.json").read_text()))
    with safe_open(src / "model.safetensors", "pt") as f:
        modules = {".".join(n.split(".")[3:-1]) for n in f.keys() if ".layers." in n and not n.endswith(".bias")}
    assert modules == set(family.projections) | set(family.norms)


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_codes_and_scales_equal_an_independent_absmean(tmp_path, arch):
    src = make_checkpoint(tmp_path / "src", arch=arch)
    out = tmp_path / "out"
    report = convert(str(src), out, recipe=load_recipe().replace(linear_class="autobitlinear"))
    mods = family_modules(src)
    assert sorted(l.name for l in report.layers) == mods and not report.kept_full_precision
    with safe_open(out / "model.safetensors", "pt") as f, safe_open(src / "model.safetensors", "pt") as g:
        for m in mods:
            codes, s = absmean_reference(g.get_tensor(m + ".weight"))
            assert np.array_equal(unpack_reference(f.get_tensor(m + ".weight").numpy()), codes), m
            got = np.float32(f.get_tensor(m + ".weight_scale").item())  # autobitlinear stores s itself
            assert abs(got - s) <= np.spacing(s), (m, got, s)
        kept = [n for n in g.keys() if "norm" in n or "embed" in n]
        assert all(torch.equal(f.get_tensor(n), g.get_tensor(n)) for n in kept)  # norms, embeddings: as they were


CLEAN = """
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({out!r})
kinds = {{n: type(mod).__name__ for n, mod in m.named_modules() if n.endswith("_proj")}}
with torch.no_grad():
    o = m(torch.tensor([{ids}]), output_hidden_states=True)
print(json.dumps({{"layer1": o.hidden_states[2][0].float().tolist(), "logits": o.logits[0].float().tolist(),
                  "kinds": kinds}}))
"""


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_output_runs_in_transformers_as_the_reference(tmp_path, arch, linear_class):
    """In a process that never imports bitquant: the output after decoder layer 1, and the
    logits, equal the source model with each projection replaced by codes x scale behind
    8-bit per-token activation quantization (float32, 1e-3 relative)."""
    src = make_checkpoint(tmp_path / "src", arch=arch)
    out = tmp_path / "out"
    convert(str(src), out, recipe=load_recipe().replace(linear_class=linear_class))
    got = run_clean(CLEAN.format(out=str(out), ids=IDS))
    mods = family_modules(src)
    assert all(got["kinds"][m] in ("BitLinear", "AutoBitLinear") for m in mods)
    multiply = linear_class == "autobitlinear"
    want = {}
    with safe_open(src / "model.safetensors", "pt") as g:
        for m in mods:
            codes, s = absmean_reference(g.get_tensor(m + ".weight"))
            want[m] = (codes, float(s) if multiply else float(np.float32(1.0) / s))
    with torch.no_grad():
        ref = reference_model(src, want, multiply=multiply)(torch.tensor([IDS]), output_hidden_states=True)
    # after layer 1: 1e-3. The logits, after every layer, are looser: an activation that
    # rounds the other way at a tie (division here, multiplication there) moves one 8-bit
    # code, and later layers amplify it (1.04e-3 seen for Gemma 3 with autobitlinear, norms x1.5-2.5)
    for key, r, bound in (("layer1", ref.hidden_states[2][0], 1e-3), ("logits", ref.logits[0], 5e-3)):
        err = float((torch.tensor(got[key]) - r).norm() / r.norm())
        assert err < bound, (key, err)


def transformers_perplexity(folder, tokens, context: int) -> float:
    """transformers' own perplexity of a checkpoint over bitquant's windows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(tokens.ids) if not isinstance(tokens.ids, torch.Tensor) else tokens.ids
    nll = []
    with torch.no_grad():
        for begin, end, first in evaluate.windows(len(ids), context, context):
            logp = torch.log_softmax(model(ids[None, begin:end]).logits[0].double(), -1)
            nll += [-float(logp[t - 1 - begin, ids[t]]) for t in range(first, end)]
    return math.exp(sum(nll) / len(nll))


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_eval_equals_transformers_in_memory_and_streamed(tmp_path, tiny_tokenizer_dir, arch):
    src = add_tokenizer(make_checkpoint(tmp_path / "src", arch=arch, vocab_size=TOKENIZER_VOCAB), tiny_tokenizer_dir)
    out = tmp_path / "out"
    convert(str(src), out)
    for folder in (src, out):
        settings = EvalSettings(context=32, max_tokens=300, device="cpu", stream=False)
        tokens = evaluate.tokenize_for(folder, TEXT, settings)
        want = transformers_perplexity(folder, tokens, 32)
        for stream in (False, True):
            got = evaluate.evaluate(str(folder), TEXT, settings=EvalSettings(context=32, max_tokens=300, device="cpu",
                                                                            stream=stream))
            assert got.streamed == stream
            assert abs(got.perplexity - want) / want < 1e-4, (folder.name, stream, got.perplexity, want)


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_heal_keeps_exactness(tmp_path, tiny_tokenizer_dir, monkeypatch, arch):
    from bitquant.heal import heal
    from bitquant.training.recipe import load_heal_recipe

    monkeypatch.setenv("BITQUANT_CACHE", str(tmp_path / "cache"))
    src = make_heal_source(tmp_path / "src", tiny_tokenizer_dir, arch=arch)
    r = load_heal_recipe().replace(tokens=4 * 128, batch_tokens=128, micro_batch_tokens=64, seq_len=32, sample_tokens=256,
                                   sample_batch=8, eval_context=32, eval_max_tokens=256, checkpoint_every=4, lr=2e-2,
                                   warmup_steps=1, min_steps=1)
    report = heal(str(src), tmp_path / "out", recipe=r, eval_text=TEXT, device="cpu")
    h = report.heal
    assert h["steps"] == 4
    assert h["exactness"]["max_abs_error"] == 0.0 and h["exactness"]["top1_agreement"] == 1.0


def test_calibrated_recipes_refuse_families_without_the_llama_block(tmp_path):
    src = make_checkpoint(tmp_path / "src", arch="gemma3")
    with pytest.raises(UsageError, match="calibrated recipe 'gptq' needs the Llama block layout, which Gemma 3"):
        convert(str(src), tmp_path / "out", recipe=load_recipe("gptq"))
    assert not (tmp_path / "out").exists()


def test_a_mixture_of_experts_model_is_refused_in_one_line(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                         num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "moe")
    with pytest.raises(UnsupportedModelError, match=r"Qwen3MoeForCausalLM is a mixture-of-experts model.*Qwen3ForCausalLM"):
        convert(str(tmp_path / "moe"), tmp_path / "out")


def test_an_unsupported_family_lists_the_supported_ones(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        convert(str(src), tmp_path / "out")
    assert "GPT2LMHeadModel is not supported" in str(e.value)
    assert all(a in str(e.value) for a in families.SUPPORTED_ARCHITECTURES)


def test_a_fused_projection_that_does_not_match_its_config_is_refused_by_name(tmp_path):
    src = make_checkpoint(tmp_path / "src", arch="phi3")
    sd = load_file(src / "model.safetensors")
    name = "model.layers.1.self_attn.qkv_proj.weight"
    sd[name] = sd[name][:-16].clone()  # a k/v head short
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match=r"model.layers.1.self_attn.qkv_proj.weight of .* is \[112, 64\], but its "
                                          r"config.json gives \[128, 64\]"):
        convert(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_recipe_without_the_fused_names_keeps_them_and_says_so(tmp_path):
    """An older recipe that lists only the seven Llama projections leaves Phi-3's fused ones
    in full precision, listed as kept (so transformers loads them as plain Linear)."""
    src = make_checkpoint(tmp_path / "src", arch="phi3")
    seven = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    report = convert(str(src), tmp_path / "out", recipe=load_recipe().replace(projections=seven))
    kept = {k.name: k.reason for k in report.kept_full_precision}
    assert kept["model.layers.0.self_attn.qkv_proj"] == "not among the recipe's projections"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.gate_up_proj" in cfg["modules_to_not_convert"]
