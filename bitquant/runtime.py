"""Run models in torch for evaluation: FP checkpoints as they are, ternary ones as deployed.

A ternary checkpoint (:mod:`bitquant.inputs`: packed in either transformers convention,
or a ternary-trained master) is loaded by building the architecture from its config,
turning each ternary weight **once** into a :class:`TernaryLinear` (packed codes
unpacked; a master's latent weights ternarized with absmean, as transformers'
``AutoBitLinear`` does online in every forward pass), and loading every other tensor from
the memory-mapped files. transformers' own classes unpack or re-quantize on every forward
pass; this does not.

:class:`TernaryLinear` computes what ``BitLinear`` / ``AutoBitLinear`` do (W1.58A8, as in
the BitNet b1.58 paper): each token's activations are quantized to 8 bits with absmax
scaling (``127 / max|x|``, clamped at 1e-5), multiplied by the {-1, 0, 1} codes, divided by
the activation scale, and divided by ``weight_scale`` (bitlinear: 1/s) or multiplied by it
(autobitlinear and masters: s). ``act_quant=False`` skips the activation step
(weights-only ternary).

On a CUDA GPU with Triton, W1.58A8 layers keep their codes packed (2 bits each, the
checkpoint's own bytes) and run the W2A8 kernels of :mod:`bitquant.w2a8`: the integers are
the same, the weights take an eighth of bf16's memory. ``BITQUANT_W2A8=0`` turns that off
(int8 codes and ``torch._int_mm``, as on the CPU). On CUDA the token table of a ternary
model whose head is not tied to it stays in host memory (:class:`HostEmbedding`; only the
rows looked up travel); ``BITQUANT_HOST_EMBEDDING=0`` keeps it on the GPU.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from bitquant.errors import SourceError, UnsupportedModelError, UsageError
from bitquant.formats.hf_bitnet import SCALE_SUFFIX
from bitquant.inputs import Layout, is_ternary_weight, runs_ternary
from bitquant import w2a8
from bitquant.packing import pack_ternary, unpack_ternary
from bitquant.recipe import PROJECTIONS
from bitquant.source import Checkpoint, open_checkpoint
from bitquant.tensorfile import SafetensorsReader
from bitquant.ternary import absmean_scale, quantize_activations, ternarize


class TernaryLinear(torch.nn.Module):
    """y = (act_quant(x) @ codes^T) / (act_scale * weight_scale) + bias, codes unpacked once;
    with ``multiply``, y = (act_quant(x) @ codes^T) / act_scale * weight_scale + bias.

    With activation quantization the product of 8-bit activations and ternary codes is a
    sum of integers, computed exactly by ``torch._int_mm`` (int8 x int8 -> int32; several
    times faster than a float32 GEMM on CPUs with VNNI). The float path gives the same
    numbers (every partial sum is an integer far below 2^24) and is used without
    activation quantization, or where ``_int_mm`` does not take the shape (CUDA needs
    more than 16 rows and dimensions divisible by 8).
    """

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, act_quant: bool = True,
                 multiply: bool = False, packed: bool = False):
        """``codes``: int8 [out, in]; with ``packed`` (W1.58A8 only: the W2A8 kernel on CUDA)
        they are kept packed, and may be given packed already (uint8 [out/4, in])."""
        super().__init__()
        if packed and not act_quant:
            raise ValueError("packed codes run W1.58A8 only")
        already = packed and codes.dtype == torch.uint8
        packed = packed and (already or codes.shape[0] % 4 == 0)  # rows that do not pack stay int8
        self.out_features, self.in_features = (4 * codes.shape[0], codes.shape[1]) if already else tuple(codes.shape)
        self.act_quant = act_quant
        self.multiply = multiply
        dtype = weight_scale.dtype
        self.register_buffer("packed", (codes if already else pack_ternary(codes)).contiguous() if packed else None)
        self.register_buffer("codes_t", codes.to(torch.int8).t().contiguous() if act_quant and not packed else None)
        self.register_buffer("codes_f", None if act_quant else codes.to(dtype))
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, weight_scale: torch.Tensor) -> None:
        """Replace the int8 codes ([out, in]) and ``weight_scale`` in place (the buffers keep
        their addresses, so a CUDA graph captured over this layer stays valid)."""
        if self.packed is not None:
            self.packed.copy_(pack_ternary(codes))
        elif self.codes_t is not None:
            self.codes_t.copy_(codes.t())
        else:
            self.codes_f.copy_(codes)
        self.weight_scale.copy_(weight_scale.reshape(self.weight_scale.shape))

    def _int8_ok(self, rows: int) -> bool:
        if self.codes_t.device.type == "cpu":
            return True
        return rows > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_quant:
            y = F.linear(x, self.codes_f)
            y = y * self.weight_scale if self.multiply else y / self.weight_scale
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            if torch.compiler.is_compiling():  # an opaque operator: compiled decode (StaticDecoder)
                return w2a8.forward_op(x, self.packed, self.weight_scale, self.multiply, self.bias)
            return w2a8.forward(x, self.packed, self.weight_scale, self.multiply, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        q, scale = quantize_activations(x2)
        if self._int8_ok(x2.shape[0]):
            acc = torch._int_mm(q.to(torch.int8), self.codes_t).to(x.dtype)
        else:
            acc = q @ self.codes_t.to(x.dtype)
        y = acc / scale * self.weight_scale if self.multiply else acc / (scale * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        scale = "multiplied" if self.multiply else "divided"
        return (f"in_features={self.in_features}, out_features={self.out_features}, act_quant={self.act_quant}, "
                f"weight_scale={scale}, packed={self.packed is not None}")


class HostEmbedding(torch.nn.Module):
    """The model's own token-embedding module, kept in host memory: each call looks up the
    rows of its ids there and sends only those to the ids' device (as llama.cpp keeps its
    token table). The table is not registered with the model, so moving the model leaves it
    where it is, and the model's device (its first parameter's) stays the GPU."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_host", inner.cpu())

    @property
    def weight(self) -> torch.Tensor:
        return self._host.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._host(ids.cpu()).to(ids.device, non_blocking=True)


def host_embedding(device: str | torch.device, config) -> bool:
    """True where a ternary model keeps its token table in host memory: on CUDA, when the
    table is not also the output head (tied), unless ``BITQUANT_HOST_EMBEDDING=0``."""
    return (torch.device(device).type == "cuda" and not getattr(config, "tie_word_embeddings", False)
            and os.environ.get("BITQUANT_HOST_EMBEDDING", "1") != "0")


def packed_kernel(device: str | torch.device, act_quant: bool) -> bool:
    """True where W1.58A8 layers run the packed W2A8 kernel: CUDA with Triton, unless
    ``BITQUANT_W2A8=0``."""
    return (torch.device(device).type == "cuda" and act_quant and w2a8.available()
            and os.environ.get("BITQUANT_W2A8", "1") != "0")


def ternary_weight(name: str, tensor: torch.Tensor, weight_scale: torch.Tensor | None,
                   layout: Layout, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(codes, weight_scale, multiply)`` of one ternary weight of a ternary checkpoint:
    a master's latent weight ternarized with absmean (fp32 s, multiplied), or the stored
    codes (packed, or unpacked floats) with the stored scale in the source's convention.
    With ``packed``, stored packed codes are returned as they are (uint8)."""
    if layout.kind == "master":
        s = absmean_scale(tensor, name=name)
        return ternarize(tensor, s), s.reshape(1), True
    if tensor.dtype == torch.uint8:
        codes = tensor if packed else unpack_ternary(tensor)
    else:
        codes = tensor.to(torch.int8)
    return codes, weight_scale.reshape(1), layout.linear_class == "autobitlinear"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; refuses ``cuda`` without one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def is_ternary(folder: Path) -> bool:
    """True for a checkpoint that runs ternary: the transformers BitNet layout (packed, or a
    master quantized online) or a BitNetForCausalLM."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return runs_ternary(config)


def load_fp(folder: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """An FP16/BF16/FP32 checkpoint, through transformers (validated first)."""
    from transformers import AutoModelForCausalLM

    open_checkpoint(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval()


def load_ternary(folder: Path | Checkpoint, dtype: torch.dtype, device: str, act_quant: bool = True) -> torch.nn.Module:
    """A ternary checkpoint (packed in either convention, or a master), each ternary
    weight turned into a :class:`TernaryLinear` once."""
    from transformers import AutoConfig

    ckpt = folder if isinstance(folder, Checkpoint) else open_checkpoint(folder)
    config = AutoConfig.from_pretrained(ckpt.path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build plain Linear layers; ternary ones are swapped in
    model = empty_model(config, dtype)  # every weight is replaced or loaded below
    packed = packed_kernel(device, act_quant)
    state: dict[str, torch.Tensor] = {}
    names = {spec.name for _, spec in ckpt.iter_specs()}
    for f in ckpt.files:
        with SafetensorsReader(f) as reader:
            for name in reader.names():
                if ckpt.weight_map and ckpt.weight_map.get(name) != f:
                    continue
                if name.endswith(SCALE_SUFFIX) and is_ternary_weight(name.removesuffix(SCALE_SUFFIX), ckpt.layout, names, PROJECTIONS):
                    continue
                tensor = reader.get(name)
                if is_ternary_weight(name, ckpt.layout, names, PROJECTIONS):
                    scale = ckpt.read([name + SCALE_SUFFIX])[name + SCALE_SUFFIX] if ckpt.layout.kind == "packed" else None
                    install(model, name, *ternary_weight(name, tensor, scale, ckpt.layout, packed), dtype, act_quant,
                             packed)
                else:
                    state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor.clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not _ternary_param(model, m) and not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SourceError(
            f"{ckpt.path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); re-convert it"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    if host_embedding(device, config):
        model.set_input_embeddings(HostEmbedding(model.get_input_embeddings()))
    return model.to(device).eval()


def empty_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """The architecture of ``config`` (a transformers config) in ``dtype``, its weights not
    initialized (every one is replaced or loaded by the caller)."""
    from transformers import AutoModelForCausalLM

    with _no_init():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _no_init():
    """transformers' context that skips weight initialization (nothing when it has none)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return nullcontext()
    return no_init_weights()


def install(model, name: str, codes: torch.Tensor, weight_scale: torch.Tensor, multiply: bool, dtype,
            act_quant: bool, packed: bool = False) -> None:
    """Put a :class:`TernaryLinear` of ``codes`` and ``weight_scale`` (stored in ``dtype``) in
    place of the linear layer whose weight is ``name``."""
    module_name = name.removesuffix(".weight")
    parent_name, _, leaf = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, leaf)
    bias = None if old.bias is None else old.bias.detach()  # replaced by load_state_dict below
    new = TernaryLinear(codes, weight_scale.to(dtype), bias, act_quant, multiply, packed)
    shape = (new.out_features, new.in_features)
    if shape != (old.out_features, old.in_features):
        raise SourceError(f"ternary weight {name} has shape {shape}, expected {(old.out_features, old.in_features)}")
    setattr(parent, leaf, new)


def _ternary_param(model, key: str) -> bool:
    module_name, _, attr = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(module_name), TernaryLinear) and attr in ("codes_t", "codes_f", "packed",
                                                                                         "weight_scale")
    except AttributeError:
        return False


def mode_label(folder: Path, act_quant: bool = True) -> str:
    """How a checkpoint runs: ``full precision``, ``ternary W1.58A8`` or ``ternary weights-only``."""
    if is_ternary(folder):
        return "ternary W1.58A8" if act_quant else "ternary weights-only"
    return "full precision"


def load_model(folder: Path, dtype: torch.dtype, device: str, act_quant: bool = True) -> tuple[torch.nn.Module, str]:
    """Load any supported checkpoint; returns the model and its mode label."""
    if is_ternary(folder):
        return load_ternary(folder, dtype, device, act_quant), mode_label(folder, act_quant)
    return load_fp(folder, dtype, device), mode_label(folder, act_quant)


def check_evaluable(folder: Path) -> None:
    """Refuse folders that bitquant's torch runtime cannot run, with the reason."""
    if not (folder / "config.json").is_file() and any(folder.glob("*.gguf")):
        raise UnsupportedModelError(
            f"{folder} holds a GGUF for llama.cpp; bitquant eval runs the transformers layout: "
            "convert without --format to evaluate, or measure the GGUF with llama.cpp (see README)"
        )


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise SourceError(f"{folder} has no tokenizer files; evaluation needs the tokenizer of the model")
    return AutoTokenizer.from_pretrained(folder)
