"""Check `bitquant eval --device cuda` against the CPU on one random LLaMA, and time both.

Builds a random LLaMA (default hidden 1024, 8 layers) with a byte-level BPE tokenizer
trained on the vendored text, converts it, and evaluates the FP and ternary models on CPU
(float32) and CUDA (float32 and bfloat16). Prints perplexities, their ratios to the CPU
float32 figure, and tokens/s. Needs a CUDA GPU.

    python bench/cuda_eval_check.py --tokens 4096
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from bitquant.convert import convert
from bitquant.evaluate import EvalSettings, evaluate

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "tests" / "data" / "alice29.txt"


def make_model(folder: Path, hidden: int, layers: int) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT.read_text()], vocab_size=2048, show_progress=False)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch")
    work = Path(tempfile.mkdtemp(prefix="bitquant-cuda-"))
    try:
        make_model(work / "fp", args.hidden, args.layers)
        convert(str(work / "fp"), work / "q")
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens")
        print(f"{'model':8s} {'device':6s} {'dtype':9s} {'perplexity':>14s} {'vs cpu':>10s} {'tokens/s':>10s}")
        for name in ("fp", "q"):
            ref = None
            for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
                r = evaluate(str(work / name), TEXT, settings=EvalSettings(context=512, max_tokens=args.tokens, device=device, dtype=dtype))
                ref = ref or r.perplexity
                print(f"{name:8s} {device:6s} {dtype:9s} {r.perplexity:14.6g} {r.perplexity / ref:10.6f} {r.tokens_per_second:10.0f}  ({r.mode})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
