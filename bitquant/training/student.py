"""The student: the source model with every ternarized projection replaced by a
:class:`FakeTernaryLinear` whose forward pass is the exported model's, computed from
latent weights that train.

Forward, exactly as the export and the runtime compute it (:mod:`bitquant.ternary` is the
one quantizer): s = absmean of the latent weight in float32; codes =
clamp(round(W / s), -1, 1); ``weight_scale`` = 1/s rounded to the dtype the export stores
it in, so the student sees the rounded scale the output carries; activations are
quantized per token to 8 bits (absmax); the product is the runtime's,
``(q @ codes^T) / (scale * weight_scale)``. Backward: the straight-through estimator,
i.e. the gradient of each rounding is taken as the identity, for the weights and for the
activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from bitquant import families
from bitquant.ternary import absmean, inverse_scale, quantize_activations, ternarize


def quantized_weight(weight: torch.Tensor, eps: float, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported form of a latent weight: int8 codes and ``weight_scale`` = 1/s rounded to
    the dtype the export stores it in, read back as float32 (the exporter's quantizer,
    :mod:`bitquant.ternary`)."""
    w = weight.detach()
    s = absmean(w, eps)
    return ternarize(w, s), inverse_scale(s, scale_dtype).to(torch.float32)


class _ExportedLinear(torch.autograd.Function):
    """Forward: the exported layer's own arithmetic, ``(q @ codes^T) / (scale * weight_scale)``
    on integer-valued activations ``q`` and codes, as :class:`bitquant.runtime.TernaryLinear`
    computes it (in float32 every product and sum is an exact integer, so the two agree bit
    for bit). Backward: straight through both roundings, i.e. the gradients of a linear
    layer of the dequantized values ``q / scale`` and ``codes / weight_scale``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, scale_dtype: torch.dtype):
        codes, weight_scale = quantized_weight(weight, eps, scale_dtype)
        q, scale = quantize_activations(x.detach().float())
        acc = F.linear(q.to(x.dtype), codes.to(x.dtype))
        y = (acc / (scale * weight_scale)).to(acc.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(q.to(torch.int8), scale, codes, weight_scale)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        q, scale, codes, weight_scale = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1])
        wq = (codes.to(torch.float32) / weight_scale).to(g.dtype)
        xq = (q.to(torch.float32) / scale).to(g.dtype).reshape(-1, q.shape[-1])
        grad_x = (g @ wq).reshape(*grad.shape[:-1], wq.shape[1]).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g.T @ xq).to(w_dtype) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0).to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def fake_ternary_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                        scale_dtype: torch.dtype) -> torch.Tensor:
    """W1.58A8 linear layer of the latent ``weight``, computed as exported, with
    straight-through gradients."""
    return _ExportedLinear.apply(x, weight, bias, eps, scale_dtype)


class FakeTernaryLinear(torch.nn.Module):
    """A projection that trains its latent weight through the exported W1.58A8 forward."""

    def __init__(self, linear: torch.nn.Linear, eps: float, scale_dtype: torch.dtype,
                 fn: Callable = fake_ternary_linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.eps = eps
        self.scale_dtype = scale_dtype
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.bias, self.eps, self.scale_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, eps={self.eps}"


def make_student(model: torch.nn.Module, modules: set[str], eps: float, scale_dtype: torch.dtype,
                 train: tuple[str, ...], compiled: bool = False) -> list[torch.nn.Parameter]:
    """Swap ``modules`` (e.g. ``model.layers.0.mlp.up_proj``) of ``model`` for fake-ternary
    projections, in place, and set which parameters train (``train``: ``projections``,
    ``norms``, ``embeddings``). Returns the trainable parameters.

    ``compiled`` runs the projection through ``torch.compile`` (fusing the quantizers
    into a few kernels; same arithmetic)."""
    fn = fake_ternary_linear
    if compiled:
        _allow_recompiles()
        fn = torch.compile(fake_ternary_linear, dynamic=False)
    for name in sorted(modules):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, FakeTernaryLinear(getattr(parent, leaf), eps, scale_dtype, fn))
    trainable = []
    seen: set[int] = set()
    for pname, p in model.named_parameters(remove_duplicate=False):
        module_name = pname.rpartition(".")[0]
        wants = (
            ("projections" in train and module_name in modules)
            or ("norms" in train and "norm" in module_name.rsplit(".", 1)[-1])
            or ("embeddings" in train and (module_name.endswith("embed_tokens") or module_name == "lm_head"))
        )
        p.requires_grad_(wants)
        if wants and id(p) not in seen:
            seen.add(id(p))
            trainable.append(p)
    return trainable


def _position_embeddings(body: torch.nn.Module, h: torch.Tensor) -> list:
    """Each block's rotary (cos, sin) for positions 0..n-1 (per attention type where the family has several)."""
    positions = torch.arange(h.shape[1], device=h.device)[None]
    return families.position_embeddings(families.family_of_model(body), body.rotary_emb, body.config, h, positions)


def _mask(body: torch.nn.Module, layer: torch.nn.Module, length: int, device) -> torch.Tensor | None:
    return families.layer_mask(families.family_of_model(body), body.config, layer.self_attn, length, device)


def block_states(body: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """The decoder's hidden states around every block: ``[embeddings, after block 0, ...,
    after the last block]`` (before the final norm), one block at a time (causal
    attention, positions 0..n-1, no padding), for the block-wise stage."""
    h = body.embed_tokens(ids)
    pes = _position_embeddings(body, h)
    states = [h]
    for layer, pe in zip(body.layers, pes):
        h = layer(h, position_embeddings=pe, attention_mask=_mask(body, layer, h.shape[1], h.device))
        states.append(h)
    return states


def run_blocks(body: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each decoder block of ``body`` on its own input (block i on ``inputs[i]``)."""
    pes = _position_embeddings(body, inputs[0])
    return [layer(h, position_embeddings=pe, attention_mask=_mask(body, layer, h.shape[1], h.device))
            for layer, h, pe in zip(body.layers, inputs, pes)]


def _allow_recompiles() -> None:
    """One compiled graph per projection shape and input dtype (fp32 after a norm, bf16
    after attention or the MLP under autocast): more than dynamo's default of 8."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` every decoder block of ``model`` in place (norms, rotary embedding,
    attention, activation and, in a student, the quantizers fused into few kernels)."""
    _allow_recompiles()
    for layer in model.get_decoder().layers:
        layer.compile(dynamic=False)


def uncompile(model: torch.nn.Module) -> None:
    """Undo :func:`compile_blocks` and compiled projections: run ``model`` eagerly again."""
    for m in model.modules():
        if isinstance(m, FakeTernaryLinear):
            m.fn = fake_ternary_linear
        if getattr(m, "_compiled_call_impl", None) is not None:  # set by nn.Module.compile
            m._compiled_call_impl = None
