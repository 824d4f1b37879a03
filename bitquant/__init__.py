"""bitquant: post-training ternary (BitNet b1.58) quantization of LLaMA-family checkpoints."""

__version__ = "0.1.0"
