"""Ternary-trained inputs (bitquant.inputs): BitNet masters, packed checkpoints in both
transformers conventions, and already-ternary dense weights convert without loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bitquant.cli.main import cli
from bitquant.convert import convert
from bitquant.errors import SourceError, TensorError, UnsupportedModelError, UsageError
from bitquant.evaluate import EvalSettings, evaluate
from bitquant.inputs import detect
from bitquant.recipe import PROJECTIONS, Recipe, load_recipe
from bitquant.runtime import load_model
from bitquant.source import open_checkpoint
from conftest import DATA, MASTER_QC, TOKENIZER_VOCAB, add_tokenizer, make_checkpoint, make_master, run_clean
from reference import absmean_reference, reference_model, unpack_reference

TEXT = DATA / "alice29.txt"
IDS = [[1, 5, 9, 17, 33, 2, 70, 44, 12, 90, 3, 61]]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _projections(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n in tensors if n.rsplit(".", 2)[-2] in PROJECTIONS and n.endswith(".weight"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("tied", [True, False])
def test_master_converts_to_the_2b4t_layout_and_computes_the_masters_forward_pass(tmp_path, tied):
    master = make_master(tmp_path / "master", tied=tied, num_hidden_layers=4)
    report = convert(str(master), tmp_path / "out")
    assert report.input["kind"] == "master" and not report.input["quantization_error_added"]
    assert report.input["output_linear_class"] == "autobitlinear"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["BitNetForCausalLM"] and config["hidden_act"] == "relu2"
    assert config["quantization_config"]["linear_class"] == "autobitlinear"
    assert config["quantization_config"]["quantization_mode"] == "offline"
    out, src = _tensors(tmp_path / "out"), _tensors(master)
    assert ("lm_head.weight" in out) == (not tied)
    assert all(f"model.layers.{i}.{n}" in out for i in range(4) for n in ("self_attn.attn_sub_norm.weight", "mlp.ffn_sub_norm.weight"))
    quantized = {}
    for name in _projections(src):
        codes, s = absmean_reference(src[name])  # fp32 absmean of the master, computed independently
        assert np.array_equal(unpack_reference(out[name].numpy()), codes), name
        stored = out[name + "_scale"]
        assert stored.dtype == torch.float32 and float(stored) == float(src[name].abs().mean()), name  # as transformers
        assert abs(float(stored) / float(s) - 1) <= 2 ** -23, name  # within one float32 step of the exact mean
        quantized[name.removesuffix(".weight")] = (unpack_reference(out[name].numpy()), float(out[name + "_scale"]))

    from transformers import AutoModelForCausalLM

    ids = torch.tensor(IDS)
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(master, dtype=torch.float32)(ids).logits  # AutoBitLinear online
        stored = reference_model(master, quantized, multiply=True)(ids).logits  # OUT's codes and scales, in float32
        ours, mode = load_model(tmp_path / "out", torch.float32, "cpu")
        ours = ours(ids).logits
    assert _rel(stored, theirs) <= 1e-4
    assert _rel(ours, theirs) <= 1e-4 and mode == "ternary W1.58A8"


def test_clean_process_loads_the_output_as_transformers_own_autobitlinear(tmp_path):
    master = make_master(tmp_path / "master")
    convert(str(master), tmp_path / "out")
    got = run_clean(f"""
import torch
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file
ids = torch.tensor({IDS})
out = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, dtype=torch.float32)
ref = AutoModelForCausalLM.from_pretrained({str(master)!r}, dtype=torch.float32)
layer = out.model.layers[0].mlp.down_proj
with torch.no_grad():
    a, b = out(ids).logits.double(), ref(ids).logits.double()
w = load_file({str(master / 'model.safetensors')!r})["model.layers.0.mlp.down_proj.weight"]
s = w.abs().mean()
codes = (w / s).round().clamp(-1, 1)
print(json.dumps({{"cls": type(layer).__name__, "rel": float((a - b).norm() / b.norm()),
                   "codes": bool(torch.equal(layer.weight.float(), codes)), "scale": float(layer.weight_scale), "s": float(s)}}))
""")
    assert got["cls"] == "AutoBitLinear" and got["codes"] and got["rel"] <= 1e-4
    assert got["scale"] == got["s"]


def test_round_trip_master_to_autobitlinear_to_bitlinear_to_gguf_keeps_every_code(tmp_path, tiny_tokenizer_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    master = add_tokenizer(make_master(tmp_path / "master", vocab_size=TOKENIZER_VOCAB, hidden_size=256,
                                       intermediate_size=512, hidden_act="silu"), tiny_tokenizer_dir)
    convert(str(master), tmp_path / "auto")
    report = convert(str(tmp_path / "auto"), tmp_path / "bit", recipe=Recipe(linear_class="bitlinear"))
    assert report.input == {"kind": "packed", "label": "packed ternary", "source_linear_class": "autobitlinear",
                            "output_linear_class": "bitlinear", "copied_matrices": 14, "absmean_matrices": 0,
                            "quantization_error_added": False}
    assert all(l.copied and l.relative_error == 0.0 for l in report.layers)
    back = convert(str(tmp_path / "bit"), tmp_path / "back", recipe=Recipe(linear_class="autobitlinear"))
    assert back.input["source_linear_class"] == "bitlinear"
    g = convert(str(tmp_path / "bit"), tmp_path / "gguf", recipe=Recipe(format="gguf-tq2_0"))
    assert g.gguf["architecture"] == "bitnet" and not g.notes  # silu: what llama.cpp computes
    auto, bit, again = _tensors(tmp_path / "auto"), _tensors(tmp_path / "bit"), _tensors(tmp_path / "back")
    reader = {t.name: t for t in GGUFReader(tmp_path / "gguf" / "model.gguf").tensors}
    gguf_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
    for name in _projections(auto):
        assert torch.equal(auto[name], bit[name]) and torch.equal(auto[name], again[name]), name
        s = float(auto[name + "_scale"])
        assert bit[name + "_scale"].dtype == torch.float32
        assert abs(1 / float(bit[name + "_scale"]) / s - 1) <= 2 ** -23, name  # 1/s in float32
        assert float(again[name + "_scale"]) == s, name  # and back, exactly
        layer, module = name.split(".")[2], ".".join(name.split(".")[3:5])
        t = reader[f"blk.{layer}.{gguf_names[module]}.weight"]
        codes = dequantize(t.data, t.tensor_type)  # d = 1: the codes themselves
        assert np.array_equal(codes.astype(np.int8), unpack_reference(auto[name].numpy())), name
        assert float(reader[f"blk.{layer}.{gguf_names[module]}.scale"].data[0]) == s, name
    assert {"blk.0.attn_sub_norm.weight", "blk.0.ffn_sub_norm.weight"} <= set(reader) and "output.weight" not in reader


def test_packed_input_reexported_in_its_own_convention_is_byte_identical(tmp_path):
    src = make_checkpoint(tmp_path / "src", dtype=torch.bfloat16)
    convert(str(src), tmp_path / "a")
    report = convert(str(tmp_path / "a"), tmp_path / "b")
    assert report.input["kind"] == "packed" and report.input["output_linear_class"] == "bitlinear"
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert a == b


def test_ternary_valued_dense_weights_keep_their_scale(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    torch.manual_seed(1)
    want = {}
    for name in _projections(tensors):
        codes = torch.randint(-1, 2, tensors[name].shape).float()
        c = float(torch.rand(()) * 0.1 + 0.01)
        tensors[name] = codes * c
        want[name] = (codes, torch.tensor(c, dtype=torch.float32))
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    report = convert(str(src), tmp_path / "out")
    assert report.input["kind"] == "ternary-dense" and report.input["copied_matrices"] == 14
    assert not report.input["quantization_error_added"]
    out = _tensors(tmp_path / "out")
    for name, (codes, c) in want.items():
        assert np.array_equal(unpack_reference(out[name].numpy()), codes.numpy().astype(np.int8))
        assert out[name + "_scale"] == (1 / c.double()).float()  # 1/c, not 1/(c x share of non-zeros)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Lossless" in card and "ternary-valued dense" in card


def test_eval_runs_masters_and_both_conventions_alike(tmp_path, tiny_tokenizer_dir):
    master = add_tokenizer(make_master(tmp_path / "master", vocab_size=TOKENIZER_VOCAB), tiny_tokenizer_dir)
    convert(str(master), tmp_path / "auto")
    convert(str(tmp_path / "auto"), tmp_path / "bit", recipe=Recipe(linear_class="bitlinear"))
    settings = EvalSettings(context=64, max_tokens=512)
    ppl = {k: evaluate(str(f), TEXT, settings=settings).perplexity
           for k, f in (("master", master), ("auto", tmp_path / "auto"), ("bit", tmp_path / "bit"))}
    assert ppl["master"] == ppl["auto"]  # the same codes and the same float32 scales
    assert abs(ppl["bit"] / ppl["master"] - 1) <= 1e-5  # 1/s in float32, divided
    streamed = evaluate(str(master), TEXT, settings=EvalSettings(context=64, max_tokens=512, stream=True))
    assert streamed.streamed and abs(streamed.perplexity / ppl["master"] - 1) <= 1e-5
    report = convert(str(master), tmp_path / "checked", eval_text=TEXT, recipe=load_recipe().replace(eval_context=64, eval_max_tokens=512))
    assert report.perplexity["ratio"] == 1.0 and report.perplexity["top1_agreement"] == 1.0


def test_llama_master_written_by_qat_keeps_bitlinear_by_default(tmp_path):
    master = make_checkpoint(tmp_path / "m", quantization_config=MASTER_QC)
    report = convert(str(master), tmp_path / "out")
    assert report.input["kind"] == "master" and report.input["output_linear_class"] == "bitlinear"
    plain = make_checkpoint(tmp_path / "plain")
    convert(str(plain), tmp_path / "plain-out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "plain-out" / "model.safetensors").read_bytes()


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensor(folder: Path, name: str, fn) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = fn(tensors[name])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_broken_ternary_trained_inputs_are_refused_by_name(tmp_path):
    master = make_master(tmp_path / "m")
    zero = tmp_path / "zero"
    shutil.copytree(master, zero)
    _edit_tensor(zero, "model.layers.1.mlp.up_proj.weight", torch.zeros_like)
    with pytest.raises(TensorError, match="'model.layers.1.mlp.up_proj.weight' of this ternary-trained model is all zeros"):
        convert(str(zero), tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    nan = tmp_path / "nan"
    shutil.copytree(master, nan)
    _edit_tensor(nan, "model.layers.0.self_attn.attn_sub_norm.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")))
    with pytest.raises(TensorError, match="'model.layers.0.self_attn.attn_sub_norm.weight' contains NaN"):
        convert(str(nan), tmp_path / "o2")
    convert(str(master), tmp_path / "packed")
    bad = tmp_path / "bad-code"
    shutil.copytree(tmp_path / "packed", bad)
    _edit_tensor(bad, "model.layers.0.self_attn.k_proj.weight", lambda t: t | 3)
    with pytest.raises(TensorError, match="k_proj.weight' holds the 2-bit value 3"):
        convert(str(bad), tmp_path / "o3")
    scale = tmp_path / "bad-scale"
    shutil.copytree(tmp_path / "packed", scale)
    _edit_tensor(scale, "model.layers.0.self_attn.k_proj.weight_scale", torch.zeros_like)
    with pytest.raises(TensorError, match="k_proj.weight_scale is 0.0, not a positive finite scale"):
        convert(str(scale), tmp_path / "o4")


def test_configs_that_do_not_match_are_refused(tmp_path):
    master = make_master(tmp_path / "m")
    for qc, pattern in [
        ({**MASTER_QC, "linear_class": "ternarylinear"}, "linear_class 'ternarylinear', which bitquant does not know"),
        ({**MASTER_QC, "linear_class": "bitlinear"}, "online with linear_class bitlinear"),
        ({**MASTER_QC, "use_rms_norm": True}, "use_rms_norm"),
        ({**MASTER_QC, "quantization_mode": "offline"}, "autobitlinear offline multiplies by"),
    ]:
        _edit_config(master, quantization_config=qc)
        with pytest.raises((UnsupportedModelError, SourceError), match=pattern):
            open_checkpoint(master)
    _edit_config(master, quantization_config=MASTER_QC)
    convert(str(master), tmp_path / "packed")
    _edit_config(tmp_path / "packed", quantization_config=MASTER_QC)
    with pytest.raises(UnsupportedModelError, match="online \\(latent weights\\), but .* is packed uint8"):
        open_checkpoint(tmp_path / "packed")
    nosub = make_master(tmp_path / "nosub")
    _edit_tensor(nosub, "model.layers.1.mlp.ffn_sub_norm.weight", lambda t: t)
    tensors = load_file(nosub / "model.safetensors")
    del tensors["model.layers.1.mlp.ffn_sub_norm.weight"]
    save_file(tensors, nosub / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match="without model.layers.1.mlp.ffn_sub_norm.weight"):
        open_checkpoint(nosub)


def test_ternary_trained_inputs_refuse_recipes_that_would_change_them(tmp_path):
    master = make_master(tmp_path / "m")
    with pytest.raises(UsageError, match="ternary-trained master, so calibrated recipe 'gptq' does not apply"):
        convert(str(master), tmp_path / "o", recipe=load_recipe("gptq"))
    with pytest.raises(UsageError, match="drop the exclusions"):
        convert(str(master), tmp_path / "o", recipe=Recipe(exclude=("model.layers.0.*",)))
    from bitquant.heal import heal

    with pytest.raises(UsageError, match="already a ternary model .*bitquant convert"):
        heal(str(master), tmp_path / "h", device="cpu")


def test_detect_names_every_kind(tmp_path):
    master = make_master(tmp_path / "m")
    specs = {s.name: s for _, s in open_checkpoint(master).iter_specs()}
    config = json.loads((master / "config.json").read_text())
    assert detect(config, specs, PROJECTIONS, "m").kind == "master"
    del config["quantization_config"]
    assert detect(config, specs, PROJECTIONS, "m").kind == "master"  # BitNetForCausalLM is trained ternary
    llama = make_checkpoint(tmp_path / "l")
    assert open_checkpoint(llama).layout.kind == "fp"


def test_cli_names_the_input_kind_and_takes_linear_class(tmp_path):
    master = make_master(tmp_path / "m")
    r = CliRunner().invoke(cli, ["convert", str(master), "-o", str(tmp_path / "o"), "--linear-class", "bitlinear"])
    assert r.exit_code == 0, r.output
    assert "ternary-trained master" in r.output and "lossless" in r.output
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["linear_class"] == "bitlinear"
    with safe_open(tmp_path / "o" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.float32  # the master's dtype
