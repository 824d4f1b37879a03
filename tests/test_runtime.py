import pytest
import torch

from bitquant import runtime
from bitquant.convert import convert
from bitquant.runtime import TernaryLinear, is_ternary, load_ternary
from conftest import make_checkpoint
from reference import RefTernaryLinear

IDS = torch.tensor([[5, 9, 33, 2, 71, 64, 18, 90, 11, 40]])


def random_layer(out=48, inp=40, bias=True, act_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (out, inp), generator=g, dtype=torch.int8)
    ws = torch.tensor([37.5])
    b = torch.randn(out, generator=g) if bias else None
    return codes, ws, b


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int8_kernel_equals_float_reference(rows):
    codes, ws, b = random_layer()
    x = torch.randn(2, rows, 40)
    ours = TernaryLinear(codes, ws, b)(x)
    ref = RefTernaryLinear(codes, ws, b)(x)
    assert ours.shape == (2, rows, 48)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_float_fallback_equals_int8_kernel(monkeypatch):
    codes, ws, b = random_layer(bias=False)
    layer = TernaryLinear(codes, ws, b)
    x = torch.randn(30, 40)
    fast = layer(x)
    monkeypatch.setattr(TernaryLinear, "_int8_ok", lambda self, rows: False)
    assert torch.equal(layer(x), fast)  # integer sums are exact in float32 too


def test_weights_only_is_plain_dequantized_linear():
    codes, ws, b = random_layer()
    x = torch.randn(5, 40)
    y = TernaryLinear(codes, ws, b, act_quant=False)(x)
    assert torch.allclose(y, x @ (codes.float() / ws).t() + b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, TernaryLinear(codes, ws, b)(x), rtol=1e-4, atol=1e-4)


@pytest.fixture
def converted(tmp_path):
    src = make_checkpoint(tmp_path / "src", arch="qwen2", tied=True)
    convert(str(src), tmp_path / "out")
    return src, tmp_path / "out"


def test_loaded_ternary_model_equals_transformers_bitlinear(converted):
    from transformers import AutoModelForCausalLM

    src, out = converted
    assert is_ternary(out) and not is_ternary(src)
    ours = load_ternary(out, torch.float32, "cpu")
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "BitLinear"
    assert isinstance(ours.model.layers[0].mlp.up_proj, TernaryLinear)
    assert ours.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        a, b = ours(IDS).logits, theirs(IDS).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()  # tied


def test_weights_only_model_equals_dequantized_fp_forward(converted):
    from transformers import AutoModelForCausalLM
    from safetensors import safe_open

    src, out = converted
    ours = load_ternary(out, torch.float32, "cpu", act_quant=False)
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with safe_open(out / "model.safetensors", "pt") as f, torch.no_grad():
        for name, module in fp.named_modules():
            if isinstance(getattr(ours.get_submodule(name), "codes_f", None), torch.Tensor):
                codes = ours.get_submodule(name).codes_f
                module.weight.copy_(codes / f.get_tensor(name + ".weight_scale").float())
        assert torch.allclose(ours(IDS).logits, fp(IDS).logits, rtol=1e-5, atol=1e-5)


def test_mismatched_checkpoint_is_reported(converted):
    from safetensors.torch import load_file, save_file

    _, out = converted
    sd = load_file(out / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    from bitquant.errors import SourceError

    with pytest.raises(SourceError, match="does not match its config"):
        runtime.load_ternary(out, torch.float32, "cpu")


def test_packed_layer_equals_the_int8_path():
    """The packed W2A8 layer (the CUDA path, here under Triton's interpreter) keeps 2 bits a
    weight and gives the int8 path's numbers: same integers, same float32 epilogue."""
    pytest.importorskip("triton")
    codes, ws, b = random_layer(out=64, inp=96)
    x = torch.randn(3, 5, 96)
    packed = TernaryLinear(codes, ws, b, packed=True)
    assert packed.packed.dtype == torch.uint8 and packed.packed.shape == (16, 96) and packed.codes_t is None
    assert torch.allclose(packed(x), TernaryLinear(codes, ws, b)(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="W1.58A8 only"):
        TernaryLinear(codes, ws, b, act_quant=False, packed=True)


@pytest.mark.parametrize("flag,wanted", [(None, True), ("0", False)])
def test_packed_kernel_is_chosen_on_cuda_only(monkeypatch, flag, wanted):
    if flag is None:
        monkeypatch.delenv("BITQUANT_W2A8", raising=False)
    else:
        monkeypatch.setenv("BITQUANT_W2A8", flag)
    monkeypatch.setattr(runtime.w2a8, "available", lambda: True)
    assert runtime.packed_kernel("cuda", True) is wanted
    assert not runtime.packed_kernel("cpu", True) and not runtime.packed_kernel("cuda", False)


def test_loaded_packed_model_equals_the_int8_model(converted, monkeypatch):
    """load_ternary as on a GPU: the checkpoint's packed bytes go to the layers as they are,
    and the logits equal the int8 runtime's."""
    pytest.importorskip("triton")
    _, out = converted
    want = load_ternary(out, torch.float32, "cpu")
    monkeypatch.setattr(runtime, "packed_kernel", lambda device, act_quant: act_quant)
    got = load_ternary(out, torch.float32, "cpu")
    layer = got.model.layers[0].mlp.up_proj
    assert layer.packed is not None and layer.codes_t is None
    with torch.no_grad():
        assert torch.allclose(got(IDS).logits, want(IDS).logits, rtol=1e-5, atol=1e-5)


def test_rows_that_do_not_pack_stay_int8():
    codes, ws, b = random_layer(out=6, inp=40)
    layer = TernaryLinear(codes, ws, b, packed=True)
    assert layer.packed is None and layer.codes_t is not None


@pytest.mark.parametrize("flag,tied,wanted", [(None, False, True), ("0", False, False), (None, True, False)])
def test_host_embedding_is_chosen_on_cuda_for_untied_tables(monkeypatch, flag, tied, wanted):
    """A table that is also the output head must be on the GPU anyway: only untied ones move."""
    from types import SimpleNamespace

    if flag is None:
        monkeypatch.delenv("BITQUANT_HOST_EMBEDDING", raising=False)
    else:
        monkeypatch.setenv("BITQUANT_HOST_EMBEDDING", flag)
    config = SimpleNamespace(tie_word_embeddings=tied)
    assert runtime.host_embedding("cuda", config) is wanted
    assert not runtime.host_embedding("cpu", config)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_host_embedding_gives_the_same_logits_and_leaves_the_model(tmp_path, monkeypatch, arch):
    """load_ternary as on a GPU: the token table (Gemma's scaled one included) is looked up
    in host memory, is not one of the model's parameters (so moving the model leaves it and
    the model's device is its layers'), and the logits are unchanged."""
    src = make_checkpoint(tmp_path / "src", arch=arch)
    convert(str(src), tmp_path / "out")
    want = load_ternary(tmp_path / "out", torch.float32, "cpu")
    monkeypatch.setattr(runtime, "host_embedding", lambda device, config: True)
    got = load_ternary(tmp_path / "out", torch.float32, "cpu")
    table = got.get_input_embeddings()
    assert isinstance(table, runtime.HostEmbedding)
    assert all(p is not table.weight for p in got.parameters()) and "model.embed_tokens.weight" not in got.state_dict()
    assert torch.equal(table.weight, want.get_input_embeddings().weight)
    with torch.no_grad():
        assert torch.equal(got(IDS).logits, want(IDS).logits)
