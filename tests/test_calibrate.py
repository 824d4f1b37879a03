"""Layer-by-layer calibration on tiny random Llamas: every method lowers the layer-output
error against absmean on the same calibration data, and the conversion stays loadable."""

import pytest
import torch
from conftest import DATA, add_tokenizer, make_checkpoint
from test_convert import load_clean

from bitquant import calibrate
from bitquant.blocks import Blocks
from bitquant.convert import convert
from bitquant.errors import TextError, UsageError
from bitquant.recipe import load_recipe
from bitquant.source import open_checkpoint

CALIB = calibrate.default_text()


@pytest.fixture
def tiny_outliers(tmp_path, tiny_tokenizer_dir):
    """A tiny Llama whose RMSNorm gains have a few large channels, as real models do."""
    folder = make_checkpoint(tmp_path / "tiny", vocab_size=320, num_hidden_layers=3)
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    for name, t in state.items():
        if "layernorm" in name:
            t[[3, 17, 40]] = 12.0
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return add_tokenizer(folder, tiny_tokenizer_dir)


def run_layers(folder, **kw):
    ckpt = open_checkpoint(folder)
    calib = calibrate.load_calibration(folder, None, 1024, 64)
    blocks = Blocks(ckpt, "cpu")
    targets = {f"model.layers.{i}.{p}" for i in range(blocks.n_layers) for g in calibrate.GROUPS for p in g}
    log = calibrate.CalibrationLog()
    items = list(calibrate.quantize_layers(blocks, calib, targets, damp=0.01, eps=1e-5, log=log, **kw))
    return items, log


def test_calibration_text_is_bundled_and_not_the_eval_text():
    assert CALIB.is_file() and CALIB.stat().st_size > 400_000
    assert CALIB.read_bytes() != (DATA / "alice29.txt").read_bytes()


def test_gptq_lowers_every_layer_output_error(tiny_outliers):
    items, _ = run_layers(tiny_outliers, method="gptq", equalize_scales=False)
    quantized = [q for _, _, q in items if q is not None]
    assert len(quantized) == 21
    for q in quantized:
        assert q.output_error <= q.absmean_output_error
    mean = sum(q.output_error for q in quantized) / 21
    base = sum(q.absmean_output_error for q in quantized) / 21
    assert mean < 0.8 * base


def test_absmean_method_reproduces_the_default_recipe(tiny_outliers):
    from bitquant.ternary import quantize_absmean

    items, _ = run_layers(tiny_outliers, method="absmean", equalize_scales=False)
    for name, w, q in items:
        if q is not None:
            ref = quantize_absmean(w)
            assert torch.equal(q.codes, ref.codes) and q.scale == pytest.approx(ref.scale, rel=1e-6)


def test_equalize_lowers_the_error_it_measures(tiny_outliers):
    _, log = run_layers(tiny_outliers, method="absmean", equalize_scales=True)
    assert log.transforms, "outlier gains should make some transform worth applying"
    for t in log.transforms:
        assert (t["alpha"], t["beta"]) != (0, 0) and t["error_after"] < t["error_before"]
    kinds = {t["transform"] for t in log.transforms}
    assert "input_layernorm -> q/k/v" in kinds


def test_equalized_fp_model_computes_the_same_function(tiny_outliers):
    """The transforms are exact in full precision: apply them without quantizing anything."""
    ckpt = open_checkpoint(tiny_outliers)
    calib = calibrate.load_calibration(tiny_outliers, None, 512, 64)
    blocks = Blocks(ckpt, "cpu")
    h = blocks.embed(calib.ids)
    layer = blocks.load(0)
    ref = blocks.run(layer, h)
    targets = {f"model.layers.0.{p}" for g in calibrate.GROUPS for p in g}
    log = calibrate.CalibrationLog()
    calibrate._equalize(blocks, layer, h, "model.layers.0.", targets, log)
    assert log.transforms
    torch.testing.assert_close(blocks.run(layer, h), ref, rtol=1e-4, atol=1e-4)


def test_tuning_lowers_block_output_error(tiny_outliers):
    _, log = run_layers(tiny_outliers, method="gptq", equalize_scales=False, tune_steps=20)
    assert len(log.tuning) == 3
    for t in log.tuning:
        assert t["error_after"] <= t["error_before"]
    assert any(t["error_after"] < t["error_before"] for t in log.tuning)


def test_damage_is_measured_for_every_target(tiny_outliers):
    ckpt = open_checkpoint(tiny_outliers)
    calib = calibrate.load_calibration(tiny_outliers, None, 512, 64)
    blocks = Blocks(ckpt, "cpu")
    targets = {"model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj", "model.layers.2.self_attn.q_proj"}
    damage = calibrate.measure_damage(blocks, calib, targets)
    assert set(damage) == {"model.layers.0.mlp", "model.layers.2.self_attn"}
    assert sorted(damage["model.layers.0.mlp"][1]) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    assert all(kl > 0 for kl, _ in damage.values())
    # the same KL computed independently, with the whole transformers model
    from bitquant.runtime import load_fp
    from bitquant.ternary import quantize_absmean

    fp = load_fp(tiny_outliers, torch.float32, "cpu")
    ids = calib.ids[: calibrate.DAMAGE_TOKENS // 64]
    with torch.no_grad():
        ref = torch.log_softmax(fp(ids).logits.float(), -1)
        for m in ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"):
            lin = fp.get_submodule(m)
            t = quantize_absmean(lin.weight)
            lin.weight.data = t.scale * t.codes.float()
        got = torch.log_softmax(fp(ids).logits.float(), -1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert damage["model.layers.0.mlp"][0] == pytest.approx(kl, rel=1e-3)


def test_convert_gptq_loads_in_transformers_and_reports_calibration(tiny_outliers, tmp_path):
    out = tmp_path / "out"
    report = convert(str(tiny_outliers), out, recipe=load_recipe("gptq").replace(calib_tokens=1024, calib_context=64),
                     device="cpu")
    cal = report.calibration
    assert cal["method"] == "gptq" and cal["tokens"] == 1024 and cal["text"] == str(CALIB)
    assert all(l.output_error is not None and l.output_error <= l.absmean_output_error for l in report.layers)
    assert report.size.bits_per_weight_quantized < 2.01
    got = load_clean(out)
    assert all(v.endswith("BitLinear") for k, v in got["kinds"].items() if "_proj" in k)
    assert torch.isfinite(torch.tensor(got["logits"])).all()
    # same inputs: up to date, no second calibration
    again = convert(str(tiny_outliers), out, recipe=load_recipe("gptq").replace(calib_tokens=1024, calib_context=64),
                    device="cpu")
    assert again.up_to_date


def test_convert_mixed_precision_keeps_within_budget_and_says_why(tiny_outliers, tmp_path):
    out = tmp_path / "mixed"
    recipe = load_recipe("gptq-mixed").replace(calib_tokens=512, calib_context=64, target_bits_per_weight=6.0)  # float32 source: a kept weight costs 32 bits
    report = convert(str(tiny_outliers), out, recipe=recipe, device="cpu")
    mp = report.calibration["mixed_precision"]
    assert mp["bits_per_projection_weight"] <= 6.0 and mp["kept"] and mp["kept_bits_per_weight"] == 32
    assert sorted(k.name for k in report.kept_full_precision) == mp["kept"]
    assert all("mixed precision" in k.reason and "KL" in k.reason for k in report.kept_full_precision)
    assert set(mp["kl_by_unit"]) == {f"model.layers.{i}.{u}" for i in range(3) for u in ("self_attn", "mlp")}
    kinds = load_clean(out)["kinds"]
    for unit in mp["kept_units"]:
        assert all(kinds[m] == "Linear" for m in mp["kept"] if m.startswith(unit + "."))
    assert len(report.layers) + len(mp["kept"]) == 21


def test_calibration_refusals(tiny_outliers, tmp_path):
    gptq = load_recipe("gptq").replace(calib_tokens=512, calib_context=64)
    with pytest.raises(UsageError, match="transformers layout only"):
        convert(str(tiny_outliers), tmp_path / "a", recipe=gptq.replace(format="gguf-tq2_0"))
    with pytest.raises(UsageError, match="calibrated recipes only"):
        convert(str(tiny_outliers), tmp_path / "b", calib_text=DATA / "alice29.txt")
    with pytest.raises(UsageError, match="same file"):
        convert(str(tiny_outliers), tmp_path / "c", recipe=gptq, calib_text=DATA / "alice29.txt",
                eval_text=DATA / "alice29.txt")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(TextError, match="fewer than one window"):
        convert(str(tiny_outliers), tmp_path / "d", recipe=gptq, calib_text=short)
    assert not any(p.name in "abcd" for p in tmp_path.iterdir())
