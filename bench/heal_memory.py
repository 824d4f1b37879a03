"""GPU memory of heal's training on one GPU, by model size: how large a model the plain
one-GPU road (fp32 latent weights, AdamW, bf16 teacher) trains, and where it stops.

For each shape, a model with random weights (memory does not depend on the values) is
built on the GPU and trained for a few steps exactly as heal trains (compiled decoder
blocks, chunked KL, fused AdamW); prints tokens/s and peak memory, or where it ran out:

    python bench/heal_memory.py                                 # smollm2, tinyllama-1b, llama3-3b, llama2-7b
    python bench/heal_memory.py --shapes llama2-7b --batch-tokens 8192
    python bench/heal_memory.py --low-memory       # the low-memory road: bf16 weights, torchao AdamW8bit

Expected from the arithmetic: 18 bytes per parameter before activations (fp32 weights 4,
gradients 4, AdamW moments 8, bf16 teacher 2), e.g. 121 GB for Llama-2-7B; on the
low-memory road 8 (bf16 weights 2, gradients 2, 8-bit moments 2, teacher 2): 54 GB.
"""

from __future__ import annotations

import argparse
import gc

import torch

from heal_speed import smollm2_config, tinyllama_config, train_speed


def llama3_3b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                       num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def llama2_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


SHAPES = {"smollm2": smollm2_config, "tinyllama-1b": tinyllama_config, "llama3-3b": llama3_3b_config,
          "llama2-7b": llama2_7b_config}


def params_of(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--low-memory", action="store_true")
    args = p.parse_args()
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    per = 8 if args.low_memory else 18
    road = "low memory (bf16 weights, torchao AdamW8bit)" if args.low_memory else "fp32 weights, AdamW"
    print(f"{torch.cuda.get_device_name(0)}, {total:.1f} GiB; {road}; {args.batch_tokens} tokens per step "
          f"({args.micro_batch_tokens} per forward pass)")
    print(f"{'shape':14s} {'params':>8s} {f'{per} B/param GiB':>15s} {'result':>40s}")
    for name in args.shapes.split(","):
        config = SHAPES[name]()
        n = params_of(config)
        try:
            rate, warm, peak = train_speed(config, "blocks", args.batch_tokens, args.micro_batch_tokens, args.steps,
                                           args.warmup, args.low_memory)
            result = f"{rate / 1e3:.1f}k tok/s, peak {peak:.1f} GiB"
        except torch.cuda.OutOfMemoryError as e:
            first = str(e).splitlines()[0]
            result = "out of memory: " + first[:120]
        print(f"{name:14s} {n / 1e9:7.2f}B {per * n / 2**30:15.1f} {result}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
