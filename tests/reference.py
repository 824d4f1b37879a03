"""An independent reference for what a converted model must compute.

Written for the tests from the published recipe, sharing no code with bitquant: the scale
is accumulated in float64 with numpy and rounded to float32, codes come from numpy's
round-half-to-even, and the forward pass of a ternary linear layer is
``linear(act_quant(x), Wq) / weight_scale`` with 8-bit per-token absmax activations
(W1.58A8, as the BitNet paper and transformers' BitLinear).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def absmean_reference(w: torch.Tensor, eps: float = 1e-5) -> tuple[np.ndarray, np.float32]:
    """(int8 codes, float32 s) for one matrix, computed with numpy."""
    w32 = w.to(torch.float32).numpy()
    s = np.float32(max(np.abs(w32.astype(np.float64)).mean(), eps))
    codes = np.clip(np.round(w32 / s), -1, 1).astype(np.int8)
    return codes, s


def unpack_reference(packed: np.ndarray) -> np.ndarray:
    """Row-block 2-bit unpacking, written out longhand."""
    rows, cols = packed.shape
    out = np.empty((4 * rows, cols), dtype=np.int8)
    for i in range(4):
        out[i * rows : (i + 1) * rows] = ((packed >> (2 * i)) & 3).astype(np.int8) - 1
    return out


def act_quant(x: torch.Tensor) -> torch.Tensor:
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


class RefTernaryLinear(torch.nn.Module):
    """``multiply``: transformers' AutoBitLinear (offline) convention, y = linear(act_quant(x), Wq) * weight_scale."""

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, act_bits: bool = True,
                 multiply: bool = False):
        super().__init__()
        self.codes = codes
        self.weight_scale = weight_scale
        self.bias = bias
        self.act_bits = act_bits
        self.multiply = multiply

    def forward(self, x):
        xq = act_quant(x) if self.act_bits else x
        y = F.linear(xq, self.codes.to(x.dtype))
        y = y * self.weight_scale.to(x.dtype) if self.multiply else y / self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def reference_model(source_dir, quantized: dict[str, tuple[np.ndarray, float]], dtype=torch.float32, act_bits: bool = True,
                    multiply: bool = False):
    """The source model with each module in ``quantized`` (name -> (codes, weight_scale))
    replaced by a reference ternary linear layer. A source with a ``quantization_config``
    (a master) is built as a plain dense model first."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(source_dir, config=config, dtype=dtype)
    for name, (codes, weight_scale) in quantized.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        setattr(parent, leaf, RefTernaryLinear(torch.from_numpy(codes), torch.tensor([weight_scale]), old.bias, act_bits,
                                               multiply))
    return model.eval()
