"""Decoder blocks of a checkpoint, built and run one at a time (for calibration).

:class:`Blocks` reads one block's tensors from the memory-mapped checkpoint, builds the
model's own decoder-layer module around them (transformers' class for the architecture,
in float32 on the chosen device), and runs calibration hidden states through it, in
batches of sequences, optionally stopping as soon as a given projection's input is seen.
Only one block is ever in memory; nothing here quantizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from bitquant import families
from bitquant.scoring import Head
from bitquant.source import Checkpoint

LAYER_PREFIX = "model.layers."


def layer_index(name: str) -> int:
    """Decoder block of a tensor name (``model.layers.I....``), -1 outside the blocks."""
    return int(name.split(".")[2]) if name.startswith(LAYER_PREFIX) else -1


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


class _Capture:
    """Accumulates H = X^T X / n and mean |x| per channel of a module's input."""

    def __init__(self, module: torch.nn.Module, stop: bool = False):
        self.h = None
        self.abs_sum = None
        self.rows = 0
        self.stop = stop
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if self.h is None:
            self.h = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.abs_sum = torch.zeros(x.shape[1], device=x.device)
        self.h.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(0)
        self.rows += x.shape[0]
        if self.stop:
            raise _Stop

    def remove(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._handle.remove()
        return self.h / self.rows, self.abs_sum / self.rows


class Blocks:
    """Builds a checkpoint's decoder blocks one at a time, in ``dtype`` (float32 unless
    asked) on ``device``. The ternary weights of a ternary checkpoint (packed in either
    convention, or a master's latent weights) become the runtime's
    :class:`~bitquant.runtime.TernaryLinear` (W1.58A8, or weights only)."""

    def __init__(self, ckpt: Checkpoint, device: str, batch: int = 4, dtype: torch.dtype = torch.float32,
                 act_quant: bool = True):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(ckpt.path)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # plain Linear layers; packed ones are swapped in by load()
        config._attn_implementation = "sdpa"
        self.dtype = dtype
        self.act_quant = act_quant
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        self.config = config
        self.ckpt = ckpt
        self.family = families.family_of(ckpt.config)
        self.device = device
        self.batch = batch
        self.layer_cls = type(skeleton.model.layers[0])
        self.norm_cls = type(skeleton.model.norm)
        self.rotary = type(skeleton.model.rotary_emb)(config=config).to(device)
        self.n_layers = config.num_hidden_layers
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.names: dict[int, list[str]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for _, spec in ckpt.iter_specs():
            if layer_index(spec.name) >= 0:
                self.names.setdefault(layer_index(spec.name), []).append(spec.name)
                self.dtypes[spec.name] = spec.dtype
        self._pe = None

    def head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Final norm and output projection: hidden states -> next-token log-probabilities."""
        logits = self.output()

        @torch.inference_mode()
        def head(x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(logits(x).float(), dim=-1)

        return head

    @property
    def _head_name(self) -> str:
        return "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"

    def _final_norm(self) -> torch.nn.Module:
        """The model's own final norm module, in ``dtype`` on the device."""
        norm = self.norm_cls(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = self.ckpt.read(["model.norm.weight"])["model.norm.weight"].to(self.device, self.dtype)
        return norm.eval()

    def output(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Final hidden states -> logits: the model's own final norm module, the output head
        (in ``dtype`` on the device) and the family's logit soft-capping, if any."""
        norm = self._final_norm()
        head = self.ckpt.read([self._head_name])[self._head_name].to(self.device, self.dtype)

        def logits(x: torch.Tensor) -> torch.Tensor:
            return families.soft_cap(F.linear(norm(x), head), self.config)

        return logits

    def scorer(self) -> tuple[torch.nn.Module, Head]:
        """The model's own final norm (in ``dtype`` on the device) and its output head for
        :mod:`bitquant.scoring`: on the CPU the stored matrix itself, memory-mapped and
        read a block of vocabulary rows at a time (whose pages are dropped after use); on a
        GPU a copy there, in its stored dtype."""
        weight, release = self.ckpt.mapped(self._head_name)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if self.device != "cpu":
            return self._final_norm(), Head(weight.to(self.device), self.dtype, cap)
        return self._final_norm(), Head(weight, self.dtype, cap, release)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (times the family's embedding scale), in ``dtype`` on the device:
        only the rows of ``ids`` are read from the mapped table, in its stored dtype."""
        table, release = self.ckpt.mapped("model.embed_tokens.weight")
        h = table[ids].to(self.device, self.dtype)
        release(0, table.shape[0])
        scale = families.embed_multiplier(self.family, self.config)
        return h if scale == 1.0 else h * torch.tensor(scale, dtype=self.dtype)

    def load(self, i: int) -> torch.nn.Module:
        from bitquant.formats.hf_bitnet import SCALE_SUFFIX
        from bitquant.inputs import is_ternary_weight
        from bitquant.recipe import PROJECTIONS
        from bitquant.runtime import TernaryLinear, packed_kernel, ternary_weight

        prefix = f"{LAYER_PREFIX}{i}."
        layout = self.ckpt.layout
        raw = self.ckpt.read(self.names[i])
        ternary = {n for n in raw if is_ternary_weight(n, layout, raw, PROJECTIONS)}
        state = {n[len(prefix):]: t.to(self.device, self.dtype) for n, t in raw.items()
                 if n not in ternary and n.removesuffix(SCALE_SUFFIX) not in ternary}
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        packed = packed_kernel(self.device, self.act_quant)
        for name in ternary:
            module = name[len(prefix):].removesuffix(".weight")
            parent, _, leaf = module.rpartition(".")
            bias = state.pop(module + ".bias", None)
            codes, scale, multiply = ternary_weight(name, raw[name], raw.get(name + SCALE_SUFFIX), layout, packed)
            setattr(layer.get_submodule(parent), leaf,
                    TernaryLinear(codes.to(self.device), scale.to(self.device, self.dtype), bias, self.act_quant, multiply,
                                  packed))
        missing, unexpected = layer.load_state_dict(state, assign=True, strict=False)
        missing = [m for m in missing if not isinstance(layer.get_submodule(m.rpartition(".")[0]), TernaryLinear)]
        if missing or unexpected:
            raise ValueError(f"decoder block {i} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return layer.eval()

    def block_inputs(self, layer: torch.nn.Module, h: torch.Tensor) -> tuple:
        """What ``layer`` takes besides ``h``: its rotary (cos, sin) for positions 0..n-1 (per
        attention type where the family has several) and its attention mask (None: causal;
        a sliding-window layer's mask where the window is shorter than the sequences)."""
        if self._pe is None or self._pe[0] != h.shape[1]:
            pos = torch.arange(h.shape[1], device=self.device)[None]
            self._pe = (h.shape[1], families.position_embeddings(self.family, self.rotary, self.config, h[:1], pos))
        mask = families.layer_mask(self.family, self.config, layer.self_attn, h.shape[1], self.device)
        return self._pe[1][layer.self_attn.layer_idx], mask

    @torch.inference_mode()
    def run(self, layer: torch.nn.Module, h: torch.Tensor, until: torch.nn.Module | None = None):
        """The block's output for every sequence of ``h``; with ``until``, stop as soon as
        that module's input is captured and return its (H, mean |x|)."""
        capture = _Capture(until, stop=True) if until is not None else None
        outs = []
        pe, mask = self.block_inputs(layer, h)
        for b in range(0, h.shape[0], self.batch):
            try:
                outs.append(layer(h[b : b + self.batch], position_embeddings=pe, attention_mask=mask))
            except _Stop:
                pass
        if capture is not None:
            return capture.remove()
        return torch.cat(outs) if outs else None

    @torch.inference_mode()
    def inputs(self, layer: torch.nn.Module, h: torch.Tensor, modules: list[str]) -> dict[str, tuple]:
        """(H, mean |x|) of each named module's input, from one full forward pass."""
        captures = {m: _Capture(layer.get_submodule(m)) for m in modules}
        self.run(layer, h)
        return {m: c.remove() for m, c in captures.items()}
