"""The model families bitquant converts: one table, one row per transformers architecture.

Everything that differs between families is a field of :class:`Family`; the rest of the
code reads these fields and has no per-family branch. Adding a family is a row here plus a
test that builds a tiny random checkpoint of it (tests/test_families.py).

What every family shares: a ``model.embed_tokens`` / ``model.layers.N`` / ``model.norm`` /
``lm_head`` layout; every linear layer inside the decoder blocks (:attr:`Family.projections`)
is ternarized, and everything else (embeddings, norms, biases, the output head) stays in
full precision. A fused projection (Phi-3's ``qkv_proj`` and ``gate_up_proj``) is one
ternary matrix with one scale, as transformers' BitLinear sees it.

Pure data and small functions over configs and tensors; nothing here reads a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bitquant.errors import UnsupportedModelError

#: The per-block norms of a Llama-style block.
LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
LLAMA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Family:
    """What bitquant needs to know about one transformers architecture."""

    architecture: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    name: str  # for people (README, errors)
    projections: tuple[str, ...] = LLAMA_PROJECTIONS  # module paths inside a block; all ternarized
    norms: tuple[str, ...] = LLAMA_NORMS  # module paths inside a block; kept in full precision
    #: fused projection leaf -> the config sizes of its parts, stacked along the output rows
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): Gemma stores w for (1 + w)
    embed_scale: bool = False  # token embeddings are multiplied by sqrt(hidden_size) (Gemma)
    rope_by_layer_type: bool = False  # one rotary embedding per attention type (Gemma 3: local and global)
    nope_layers: bool = False  # some layers have no rotary embedding; the attention's ``use_rope`` says which
    #: norms after attention and after the MLP too (Gemma: post_attention_layernorm normalizes
    #: the attention's output, pre/post_feedforward_layernorm wrap the MLP)
    sandwich_norms: bool = False
    #: the block is the Llama one (norm, attention, residual, norm, MLP, residual, with
    #: separate q/k/v and gate/up): calibrated recipes fold scales through its norms
    llama_block: bool = True
    #: where a layer's sliding window comes from: "layer" (the attention's own
    #: ``sliding_window``, None for full-attention layers), "config" (config.sliding_window
    #: for every layer) or None (no sliding window)
    window: str | None = None
    gguf: str | None = None  # llama.cpp architecture name; None: GGUF export is refused
    gguf_rope_permute: bool = False  # llama.cpp's "normal" rope order: q/k rows permuted (Llama)
    gguf_norms: dict[str, str] = field(default_factory=dict)  # extra block norm -> llama.cpp leaf
    gguf_no_rope_step: int | None = None  # llama.cpp skips rotary embedding in every Nth layer (fixed N)


_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_GGUF_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}

FAMILIES: tuple[Family, ...] = (
    Family("LlamaForCausalLM", "llama", "Llama", gguf="llama", gguf_rope_permute=True),
    Family("MistralForCausalLM", "mistral", "Mistral", window="config", gguf="llama", gguf_rope_permute=True),
    Family("Qwen2ForCausalLM", "qwen2", "Qwen2", window="layer", gguf="qwen2"),
    Family("Qwen3ForCausalLM", "qwen3", "Qwen3", norms=LLAMA_NORMS + _QK_NORMS, window="layer", gguf="qwen3",
           gguf_norms=_GGUF_QK_NORMS),
    Family("SmolLM3ForCausalLM", "smollm3", "SmolLM3", nope_layers=True, window="layer", gguf="smollm3",
           gguf_rope_permute=True, gguf_no_rope_step=4),
    Family("Gemma3ForCausalLM", "gemma3_text", "Gemma 3",
           norms=LLAMA_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm") + _QK_NORMS,
           norm_offset=1.0, embed_scale=True, rope_by_layer_type=True, sandwich_norms=True, llama_block=False,
           window="layer", gguf="gemma3",
           gguf_norms={**_GGUF_QK_NORMS, "post_attention_layernorm": "post_attention_norm",
                       "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}),
    Family("Phi3ForCausalLM", "phi3", "Phi-3",
           projections=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
           fused={"qkv_proj": ("q", "kv", "kv"), "gate_up_proj": ("intermediate", "intermediate")},
           llama_block=False, window="config", gguf="phi3"),
    Family("BitNetForCausalLM", "bitnet", "BitNet",
           norms=LLAMA_NORMS + ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
           gguf="bitnet", gguf_norms={"self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}),
)

BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES}
SUPPORTED_ARCHITECTURES = tuple(BY_ARCHITECTURE)

#: Every projection leaf name of every family (a recipe's ``projections`` names these).
PROJECTIONS: tuple[str, ...] = tuple(dict.fromkeys(p.rsplit(".", 1)[-1] for f in FAMILIES for p in f.projections))

#: Config fields that mark a mixture-of-experts model.
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def family_of(config: dict) -> Family:
    """The family of a config.json, refusing unsupported and mixture-of-experts models in one line."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch in BY_ARCHITECTURE:
        return BY_ARCHITECTURE[arch]
    if any(config.get(k) for k in _MOE_FIELDS):
        raise UnsupportedModelError(
            f"{arch or config.get('model_type')} is a mixture-of-experts model, which bitquant does not convert yet "
            f"(its experts are fused 3-D tensors); bitquant converts {', '.join(SUPPORTED_ARCHITECTURES)}")
    name = arch or f"model_type {config.get('model_type')!r}"
    raise UnsupportedModelError(
        f"architecture {name} is not supported; bitquant converts {', '.join(SUPPORTED_ARCHITECTURES)}")


BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


def family_of_model(model: torch.nn.Module) -> Family:
    """The family of a transformers model object, or of its decoder (``model.model``)."""
    family = BY_MODEL_TYPE.get(getattr(model.config, "model_type", None))
    return family or family_of({"architectures": [type(model).__name__], "model_type": model.config.model_type})


def head_dim(config: dict) -> int:
    """Per-head width of a config.json (``head_dim``, else hidden / heads)."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def expected_shape(config: dict, name: str) -> tuple[int, int] | None:
    """The [out, in] shape that ``config`` gives projection ``name`` (None when unknown).
    A fused projection's rows are its parts' sizes added up."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not hidden or not heads:
        return None
    hd = head_dim(config)
    sizes = {"q": heads * hd, "kv": (config.get("num_key_value_heads") or heads) * hd,
             "intermediate": config.get("intermediate_size"), "hidden": hidden}
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    shapes = {"q_proj": ("q", "hidden"), "k_proj": ("kv", "hidden"), "v_proj": ("kv", "hidden"),
              "o_proj": ("hidden", "q"), "gate_proj": ("intermediate", "hidden"), "up_proj": ("intermediate", "hidden"),
              "down_proj": ("hidden", "intermediate")}
    arch = (config.get("architectures") or [""])[0]
    fused = BY_ARCHITECTURE[arch].fused if arch in BY_ARCHITECTURE else {}
    if leaf in fused:
        parts = [sizes[p] for p in fused[leaf]]
        return None if None in parts else (sum(parts), hidden)
    if leaf not in shapes:
        return None
    out, inp = (sizes[k] for k in shapes[leaf])
    return None if out is None or inp is None else (out, inp)


def embed_multiplier(family: Family, config) -> float:
    """What token embeddings are multiplied by (1.0 but for Gemma's sqrt(hidden_size))."""
    return math.sqrt(config.hidden_size) if family.embed_scale else 1.0


def layer_types(config) -> list[str]:
    """Each layer's attention type (``full_attention`` where the config names none)."""
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def position_embeddings(family: Family, rotary: torch.nn.Module, config, h: torch.Tensor,
                        positions: torch.Tensor) -> list:
    """Each decoder layer's rotary (cos, sin) for ``positions``: one per attention type
    where the family has several (Gemma 3), else one shared by every layer."""
    if not family.rope_by_layer_type:
        pe = rotary(h, positions)
        return [pe] * config.num_hidden_layers
    types = layer_types(config)
    by_type = {t: rotary(h, positions, t) for t in set(types)}
    return [by_type[t] for t in types]


def sliding_window(family: Family, config, attention: torch.nn.Module) -> int | None:
    """The sliding window (in positions, exclusive) of one layer, or None for full attention."""
    if family.window == "layer":
        return getattr(attention, "sliding_window", None)
    if family.window == "config":
        return getattr(config, "sliding_window", None)
    return None


def layer_mask(family: Family, config, attention: torch.nn.Module, length: int, device) -> torch.Tensor | None:
    """The attention mask of one layer for sequences of ``length`` (None: plain causal)."""
    return attention_mask(length, sliding_window(family, config, attention), device)


def attention_mask(length: int, window: int | None, device) -> torch.Tensor | None:
    """A boolean [1, 1, length, length] mask (True: attend) for a causal sliding window,
    or None where plain causal attention is the same (no window, or one that covers all)."""
    if window is None or window >= length:
        return None
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]
    return ((d >= 0) & (d < window))[None, None]


def soft_cap(logits: torch.Tensor, config) -> torch.Tensor:
    """tanh soft-capping of the final logits, where the config asks for it (Gemma)."""
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap
