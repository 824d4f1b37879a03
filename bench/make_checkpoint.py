"""Write a synthetic FP16 LLaMA checkpoint with the exact tensor names, shapes and sharding
of a real one, filled with random normal values (std 0.02; norms 1.0).

Values do not change the cost of quantization, so speed and memory can be measured
without the Hub. Tensors are streamed into the shards, so memory stays small. A
byte-level BPE tokenizer of the right vocabulary size is written beside them.

    python bench/make_checkpoint.py llama2-7b /tmp/llama2-7b-synthetic     # 13.5 GB
    python bench/make_checkpoint.py tinyllama-1b /tmp/tinyllama-synthetic  # 2.2 GB
    python bench/make_checkpoint.py bitnet-2b-4t /tmp/bitnet-2b-master     # 4.8 GB, BF16 master
    python bench/make_checkpoint.py qwen3-8b /tmp/qwen3-8b                 # 16.4 GB, BF16, q/k norms, 152k vocabulary
    python bench/make_checkpoint.py qwen2-1.5b /tmp/qwen2-1.5b             # 3.1 GB, BF16, tied 152k vocabulary

``bitnet-2b-4t`` is a ternary-trained master shaped as microsoft/bitnet-b1.58-2B-4T-bf16:
BitNetForCausalLM with its sub-norms, tied embeddings, relu2 and the master's
``quantization_config`` (autobitlinear, online), in bfloat16.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bitquant.formats.hf_bitnet import plan_shards, write_index
from bitquant.tensorfile import SafetensorsStreamWriter, TensorSpec

PRESETS = {
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "tinyllama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=False),
    # microsoft/bitnet-b1.58-2B-4T-bf16 (the master of the packed release)
    "bitnet-2b-4t": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=30, num_attention_heads=20,
                         num_key_value_heads=5, vocab_size=128256, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    # Qwen/Qwen2-1.5B (q/k/v biases, tied 151,936-token embeddings)
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       tie_word_embeddings=True),
    # Qwen/Qwen3-8B (head_dim 128 with per-head q/k norms, 151,936-token vocabulary)
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, tie_word_embeddings=False),
}

#: Presets that are BitNet masters rather than LLaMA FP16 checkpoints.
BITNET = {"bitnet-2b-4t"}
#: Presets of the Qwen3 family (bf16, q/k norms) and of Qwen2 (bf16, q/k/v biases).
QWEN3 = {"qwen3-8b"}
QWEN2 = {"qwen2-1.5b"}


def tensor_specs(cfg: dict, bitnet: bool = False, qwen3: bool = False, qwen2: bool = False) -> list[TensorSpec]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = hd * cfg["num_attention_heads"], hd * cfg["num_key_value_heads"]
    f16 = torch.bfloat16 if bitnet or qwen3 or qwen2 else torch.float16
    specs = [TensorSpec("model.embed_tokens.weight", f16, (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        if qwen3:
            specs += [TensorSpec(p + "self_attn.q_norm.weight", f16, (hd,)),
                      TensorSpec(p + "self_attn.k_norm.weight", f16, (hd,))]
        if qwen2:
            specs += [TensorSpec(p + "self_attn.q_proj.bias", f16, (q,)), TensorSpec(p + "self_attn.k_proj.bias", f16, (kv,)),
                      TensorSpec(p + "self_attn.v_proj.bias", f16, (kv,))]
        specs += [
            TensorSpec(p + "input_layernorm.weight", f16, (h,)),
            TensorSpec(p + "self_attn.q_proj.weight", f16, (q, h)),
            TensorSpec(p + "self_attn.k_proj.weight", f16, (kv, h)),
            TensorSpec(p + "self_attn.v_proj.weight", f16, (kv, h)),
            TensorSpec(p + "self_attn.o_proj.weight", f16, (h, q)),
            TensorSpec(p + "post_attention_layernorm.weight", f16, (h,)),
            TensorSpec(p + "mlp.gate_proj.weight", f16, (i, h)),
            TensorSpec(p + "mlp.up_proj.weight", f16, (i, h)),
            TensorSpec(p + "mlp.down_proj.weight", f16, (h, i)),
        ]
        if bitnet:
            specs += [TensorSpec(p + "self_attn.attn_sub_norm.weight", f16, (h,)),
                      TensorSpec(p + "mlp.ffn_sub_norm.weight", f16, (i,))]
    specs.append(TensorSpec("model.norm.weight", f16, (h,)))
    if not cfg["tie_word_embeddings"]:
        specs.append(TensorSpec("lm_head.weight", f16, (v, h)))
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-shard-size", type=int, default=5 * 10**9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    args.out.mkdir(parents=True, exist_ok=False)
    gen = torch.Generator().manual_seed(args.seed)
    bitnet = args.preset in BITNET
    qwen3, qwen2 = args.preset in QWEN3, args.preset in QWEN2
    shards = plan_shards(tensor_specs(cfg, bitnet, qwen3, qwen2), args.max_shard_size)
    for shard in shards:
        writer = SafetensorsStreamWriter(args.out / shard.filename, list(shard.specs))
        for spec in shard.specs:
            if spec.name.endswith("norm.weight"):
                t = torch.ones(spec.shape, dtype=spec.dtype)
            else:
                t = torch.empty(spec.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(spec.dtype)
            writer.write(spec.name, t)
        writer.close()
        print(f"wrote {shard.filename} ({shard.nbytes / 1e9:.2f} GB)")
    write_index(args.out, shards)
    if bitnet:  # every field written: BitNetConfig's defaults differ from the release
        config = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "torch_dtype": "bfloat16",
                  "hidden_act": "relu2", "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None,
                  "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                  "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                          "quantization_mode": "online"}, **cfg}
    elif qwen2:
        config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "bfloat16",
                  "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, **cfg}
    elif qwen3:
        config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "torch_dtype": "bfloat16",
                  "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645, "attention_bias": False,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, **cfg}
    else:
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
                  "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0, **cfg}
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(args.out, cfg["vocab_size"])


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of the right vocabulary size: the 256 byte symbols, then
    tokens merged from pairs of them. Converters load and copy it; llama.cpp loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0}
    for sym in sorted(symbols):
        vocab[sym] = len(vocab)
    merges = []
    for a in sorted(symbols):
        for b in sorted(symbols):
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)


if __name__ == "__main__":
    main()
