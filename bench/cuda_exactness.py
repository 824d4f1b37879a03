"""Is what heal trains what ships, on a GPU? A random model of SmolLM2-135M's shape (FP16,
larger projection weights so that ternarizing them matters) is converted by bitquant's
writer; heal's student is built from the same FP weights; both run in float32 on CUDA on
the same tokens, the exported model through bitquant's runtime as ``bitquant eval`` and
``generate`` run it: the packed W2A8 kernels, and with ``BITQUANT_W2A8=0`` the int8 path.

    python bench/cuda_exactness.py            # relative error, max |diff|, top-1 agreement
    python bench/cuda_exactness.py --layers 4 --rows 2

heal's report gives the same comparison on its own run (``heal.exactness``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import use_source_tree  # noqa: E402

use_source_tree()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    args = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitquant import runtime
    from bitquant.convert import convert
    from bitquant.training.student import make_student

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("_proj.weight"):
                w.normal_(0, 0.06)
    folder = Path(tempfile.mkdtemp())
    model.half().save_pretrained(folder / "fp")
    convert(str(folder / "fp"), folder / "out")
    ids = torch.randint(0, config.vocab_size, (args.rows, args.length), device="cuda")
    student = runtime.load_fp(folder / "fp", torch.float32, "cuda")
    modules = {n for n, _ in student.named_modules() if n.rsplit(".", 1)[-1].endswith("_proj")}
    make_student(student, modules, 1e-5, torch.float16, ("projections",))
    with torch.inference_mode():
        a = student(input_ids=ids).logits.float()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for label, env in (("W2A8 kernels", "1"), ("int8 path (BITQUANT_W2A8=0)", "0")):
        os.environ["BITQUANT_W2A8"] = env
        exported, _ = runtime.load_model(folder / "out", torch.float32, "cuda")
        with torch.inference_mode():
            b = exported(input_ids=ids).logits.float()
        print(f"{label:30s} relative error {float((a - b).norm() / b.norm()):.3e}, max |diff| "
              f"{float((a - b).abs().max()):.3e}, top-1 {float((a.argmax(-1) == b.argmax(-1)).float().mean()):.4f}",
              flush=True)
        del exported


if __name__ == "__main__":
    main()
