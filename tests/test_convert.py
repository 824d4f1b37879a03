import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bitquant.convert import convert
from bitquant.errors import OutputError, SourceError, TensorError
from bitquant.recipe import Recipe
from bitquant.staging import STAGING_PREFIX
from conftest import make_checkpoint, run_clean
from reference import PROJECTIONS, absmean_reference, reference_model, unpack_reference

IDS = [3, 17, 42, 5, 88, 61, 9, 23, 77, 14, 2, 50]


def load_clean(out: Path) -> dict:
    """Load OUT with transformers in a fresh process that never imports bitquant."""
    return run_clean(f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
kinds = {{n: type(mod).__name__ for n, mod in m.named_modules() if n.endswith(("_proj", "lm_head"))}}
with torch.no_grad():
    logits = m(torch.tensor([{IDS}])).logits[0].float()
print(json.dumps({{"logits": logits.tolist(), "kinds": kinds, "dtype": str(m.dtype)}}))
""")


def expected_quantization(source: Path, modules: list[str]) -> dict:
    """name -> (codes, weight_scale) from the independent reference recipe."""
    out = {}
    with safe_open(source / "model.safetensors", "pt") as f:
        for m in modules:
            codes, s = absmean_reference(f.get_tensor(m + ".weight"))
            out[m] = (codes, float(np.float32(1.0) / s))
    return out


def projections(n_layers: int = 2) -> list[str]:
    mods = []
    for i in range(n_layers):
        mods += [f"model.layers.{i}.self_attn.{p}" for p in PROJECTIONS[:4]]
        mods += [f"model.layers.{i}.mlp.{p}" for p in PROJECTIONS[4:]]
    return mods


def reference_logits(source: Path, quantized: dict) -> torch.Tensor:
    model = reference_model(source, quantized)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float()


def assert_close_logits(got, want, rel=1e-3):
    got = torch.tensor(got)
    err = (got - want).norm() / want.norm()
    assert err < rel, f"relative logit error {err:.2e}"


@pytest.mark.parametrize(
    "arch,tied,shard",
    [("llama", False, 5 * 10**9), ("llama", True, 10_000), ("mistral", False, 5 * 10**9), ("qwen2", True, 5 * 10**9)],
)
def test_converted_model_loads_in_transformers_and_matches_reference(tmp_path, arch, tied, shard):
    src = make_checkpoint(tmp_path / "src", arch=arch, tied=tied)
    out = tmp_path / "out"
    report = convert(str(src), out, max_shard_size=shard)
    mods = projections()
    assert sorted(l.name for l in report.layers) == sorted(mods)
    if shard < 10**9:
        assert (out / "model.safetensors.index.json").is_file()
    loaded = load_clean(out)
    assert all(loaded["kinds"][m] == "BitLinear" for m in mods)
    assert loaded["kinds"].get("lm_head", "Linear") == "Linear"
    assert_close_logits(loaded["logits"], reference_logits(src, expected_quantization(src, mods)))


def test_every_code_and_scale_equals_the_reference_recipe(tmp_path):
    src = make_checkpoint(tmp_path / "src", dtype=torch.float16, seed=3)
    out = tmp_path / "out"
    convert(str(src), out)
    want = expected_quantization(src, projections())
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, (codes, inv_s) in want.items():
            packed = f.get_tensor(name + ".weight")
            assert packed.dtype == torch.uint8
            assert np.array_equal(unpack_reference(packed.numpy()), codes), name
            ws = f.get_tensor(name + ".weight_scale")
            assert ws.shape == (1,) and ws.dtype == torch.float16
            assert float(ws) == pytest.approx(inv_s, rel=2**-10)  # fp16 precision
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16


def test_qwen2_biases_stay_full_precision(tmp_path):
    src = make_checkpoint(tmp_path / "src", arch="qwen2")
    convert(str(src), tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f, safe_open(src / "model.safetensors", "pt") as g:
        b = "model.layers.0.self_attn.q_proj.bias"
        assert torch.equal(f.get_tensor(b), g.get_tensor(b))


def test_excluded_modules_stay_linear_and_load(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    report = convert(str(src), out, recipe=Recipe(exclude=("model.layers.0.*",)))
    kept = sorted(k.name for k in report.kept_full_precision)
    assert kept == sorted(m for m in projections() if ".layers.0." in m)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["modules_to_not_convert"] == ["lm_head", *kept]
    loaded = load_clean(out)
    assert loaded["kinds"]["model.layers.0.mlp.up_proj"] == "Linear"
    assert loaded["kinds"]["model.layers.1.mlp.up_proj"] == "BitLinear"
    quantized = [m for m in projections() if ".layers.1." in m]
    assert_close_logits(loaded["logits"], reference_logits(src, expected_quantization(src, quantized)))


def test_rows_not_multiple_of_four(tmp_path):
    src = make_checkpoint(tmp_path / "src", intermediate_size=130)
    with pytest.raises(TensorError, match="gate_proj.weight.*130 output rows, not a multiple of 4"):
        convert(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = convert(str(src), tmp_path / "out", recipe=Recipe(indivisible="keep"))
    kept = {k.name for k in report.kept_full_precision}
    assert kept == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert load_clean(tmp_path / "out")["kinds"]["model.layers.0.mlp.gate_proj"] == "Linear"


def test_report_sizes_and_hashes_match_disk(tmp_path):
    src = make_checkpoint(tmp_path / "src", dtype=torch.bfloat16)
    out = tmp_path / "out"
    report = convert(str(src), out, max_shard_size=10_000)
    on_disk = {p.name: p for p in out.iterdir()}
    shards = [n for n in on_disk if n.endswith(".safetensors")]
    assert len(shards) > 1
    assert report.size.output_bytes == sum(on_disk[n].stat().st_size for n in shards)
    assert report.size.source_bytes == (src / "model.safetensors").stat().st_size
    for f in report.files:
        assert f.bytes == on_disk[f.name].stat().st_size
        assert f.sha256 == hashlib.sha256(on_disk[f.name].read_bytes()).hexdigest()
    assert {f.name for f in report.files} == set(on_disk) - {"report.json"}
    big = [n for n in report.notes if "is larger than --max-shard-size (10.0 kB)" in n]
    assert any(n.startswith("model.embed_tokens.weight (") for n in big)
    assert not [n for n in convert(str(src), tmp_path / "default").notes if "max-shard-size" in n]
    q = report.size.quantized_params
    assert report.size.bits_per_weight_quantized == pytest.approx(8 * (q / 4 + 2 * len(report.layers)) / q, rel=1e-3)
    saved = json.loads((out / "report.json").read_text())
    assert saved["size"]["output_bytes"] == report.size.output_bytes
    assert saved["recipe"]["name"] == "absmean" and len(saved["recipe_sha256"]) == 64
    assert set(saved["layers"][0]) >= {"name", "shape", "scale", "zero_fraction", "relative_error"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: src\n") and "- bitnet\n- ternary\n- bitquant\n" in card
    assert "Quality warning" in card


def test_bad_weight_mid_stream_leaves_nothing(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    from safetensors.torch import load_file, save_file

    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TensorError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*NaN"):
        convert(str(src), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no staging folder


def test_existing_output_needs_overwrite_and_survives_failures(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        convert(str(src), out)
    (src / "config.json").write_text("{broken")
    with pytest.raises(SourceError):
        convert(str(src), out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    make_checkpoint(src)
    convert(str(src), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_untied_model_without_lm_head_is_refused(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    from safetensors.torch import load_file, save_file

    sd = load_file(src / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match="no lm_head.weight"):
        convert(str(src), tmp_path / "out")


def test_carries_tokenizer_and_generation_config(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    (src / "tokenizer.json").write_text('{"fake": true}')
    convert(str(src), tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"fake": true}'
    assert (tmp_path / "out" / "generation_config.json").is_file()
