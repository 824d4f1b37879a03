"""Layer-by-layer calibration: calibration text runs through the model one decoder block
at a time, and the methods of :mod:`bitquant.methods` see each projection's real inputs.

Memory stays bounded: only one decoder block (in float32, on ``device``) and the hidden
states of the calibration sequences (``tokens x hidden_size`` floats) are held at once.
Each block's inputs come from the blocks before it *as quantized*, so every block is
calibrated on what the converted model will actually feed it (GPTQ's sequential order).
Within a block, the projections are quantized in the order data flows (q/k/v, o,
gate/up, down), each on inputs produced by the already quantized ones before it.

Two passes over the layers are possible:

* :func:`measure_damage` (mixed precision): with the FP model, how much ternarizing each
  projection alone changes its block's output;
* :func:`quantize_layers`: equalize, then ternarize (GPTQ or absmean), yielding every
  tensor of every block in the order the writer wants them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch

from bitquant import runtime
from bitquant.blocks import LAYER_PREFIX, Blocks
from bitquant.methods import equalize
from bitquant.methods.gptq import output_error, ternary_gptq
from bitquant.methods.tune import ScaledTernary, tune
from bitquant.packing import pack_ternary
from bitquant.ternary import (
    absmean_roundtrip,
    absmean_scale,
    relative_error,
    ternarize,
    zero_fraction,
)
from bitquant.text import sequences, tokenize_file

#: Bundled calibration text (public domain; not the evaluation text used in the README).
DEFAULT_TEXT = "paradise-lost.txt"

#: Projections in the order data reaches them, grouped by shared input.
GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

#: Called after each decoder block: (blocks done, blocks in all, what was done).
LayerProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Calibration:
    ids: torch.Tensor  # int64 [sequences, context]
    path: str
    sha256: str

    @property
    def tokens(self) -> int:
        return self.ids.numel()


def default_text() -> Path:
    return Path(str(resources.files("bitquant.data").joinpath(DEFAULT_TEXT)))


def load_calibration(folder: Path, text: str | Path | None, tokens: int, context: int) -> Calibration:
    """The first ``tokens`` tokens of ``text`` (the bundled text when ``None``), cut into
    sequences of ``context`` positions, each starting with BOS where the model's tokenizer
    adds one (:func:`bitquant.text.sequences`; a partial last sequence is dropped)."""
    path = Path(text) if text is not None else default_text()
    tokenized = tokenize_file(path, runtime.load_tokenizer(folder), min_tokens=context, max_tokens=tokens,
                              purpose="calibrate on")
    return Calibration(sequences(tokenized.ids, context, tokenized.bos), str(path), tokenized.sha256)


@dataclass(frozen=True)
class QuantizedWeight:
    """A ternarized projection: ``W ~ scale * codes``, with what the method achieved."""

    codes: torch.Tensor  # int8 [out, in]
    scale: float
    zero_fraction: float
    relative_error: float  # ||W - s*codes|| / ||W|| (W after equalization)
    output_error: float  # relative squared error of the layer output on calibration inputs
    absmean_output_error: float  # the same for absmean rounding of the original weight
    scale_clamped: bool = False

    @property
    def packed(self) -> torch.Tensor:
        """The codes in the transformers 2-bit layout."""
        return pack_ternary(self.codes)


@dataclass
class CalibrationLog:
    """What calibration did, for the report."""

    transforms: list[dict] = field(default_factory=list)  # one per applied equivalence transform
    tuning: list[dict] = field(default_factory=list)  # one per block whose gains and scales were fitted


#: Calibration tokens the damage pass uses (it runs each block once per projection).
DAMAGE_TOKENS = 4096


#: Units whose damage is measured together (and which are kept or ternarized together):
#: the attention and the MLP of each block. Damage is far from additive inside a unit
#: (e.g. ternarizing gate_proj alone hurts less than with up_proj), so units are chosen whole.
UNITS = (("self_attn", GROUPS[0] + GROUPS[1]), ("mlp", GROUPS[2] + GROUPS[3]))


def measure_damage(blocks: Blocks, calib: Calibration, targets: set[str],
                   progress: LayerProgress | None = None) -> dict[str, tuple[float, list[str]]]:
    """For each unit (``model.layers.I.self_attn`` / ``.mlp``) holding target projections:
    the mean KL divergence (nats) of the model's next-token distribution from the FP
    model's when that unit's target projections, and nothing else, are ternarized with
    absmean. Returns ``unit -> (KL, its target projections)``.

    Measured end to end, because a block-local measure misleads (a unit that barely
    changes its own block can be amplified by every later one). Bounded memory still: the
    FP hidden state entering each block is kept for the first :data:`DAMAGE_TOKENS`
    calibration tokens, and each trial runs the blocks after the unit one at a time."""
    sequences = max(1, DAMAGE_TOKENS // calib.ids.shape[1])
    h = blocks.embed(calib.ids[:sequences])
    states = [h]
    for i in range(blocks.n_layers):
        states.append(blocks.run(blocks.load(i), states[-1]))
    head = blocks.head()
    reference = head(states[-1])
    damage: dict[str, tuple[float, list[str]]] = {}
    for i in range(blocks.n_layers):
        layer = blocks.load(i)
        for unit, projs in UNITS:
            members = [p for p in projs if f"{LAYER_PREFIX}{i}.{p}" in targets]
            if not members:
                continue
            saved = {p: layer.get_submodule(p).weight.data for p in members}
            for p in members:
                layer.get_submodule(p).weight.data = absmean_roundtrip(saved[p])
            x = blocks.run(layer, states[i])
            for p in members:
                layer.get_submodule(p).weight.data = saved[p]
            for k in range(i + 1, blocks.n_layers):
                x = blocks.run(blocks.load(k), x)
            damage[f"{LAYER_PREFIX}{i}.{unit}"] = (_kl(reference, head(x)), [f"{LAYER_PREFIX}{i}.{p}" for p in members])
        del layer
        if progress:
            progress(i + 1, blocks.n_layers, "measured")
    return damage


@torch.inference_mode()
def _kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> float:
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def _equalize(blocks: Blocks, layer, h, prefix: str, targets: set[str], log: CalibrationLog) -> None:
    """Choose and fold the four equivalence transforms of one block (see methods.equalize)."""
    stats = blocks.inputs(layer, h, [g[0] for g in GROUPS])
    (h_attn, a_attn), (h_o, a_o) = stats["self_attn.q_proj"], stats["self_attn.o_proj"]
    (h_mlp, a_mlp), (h_down, a_down) = stats["mlp.gate_proj"], stats["mlp.down_proj"]

    def targeted(*projs):
        return [p for p in projs if f"{prefix}{p}" in targets]

    def record(kind, sc):
        log.transforms.append({"layer": prefix.rstrip("."), "transform": kind, "alpha": sc.alpha, "beta": sc.beta,
                               "error_before": round(sc.error_before, 6), "error_after": round(sc.error, 6)})

    def norm_fold(norm, projs, hess, stat, kind):
        sel = targeted(*projs)
        if not sel:
            return hess
        sc = equalize.search(stat, [(layer.get_submodule(p).weight.data, hess) for p in sel])
        if sc.error >= sc.error_before:
            return hess
        norm.weight.data = equalize.scale_rows(norm.weight.data, sc.c)
        for p in projs:
            lin = layer.get_submodule(p)
            lin.weight.data = equalize.scale_columns(lin.weight.data, sc.c)
        record(kind, sc)
        return hess / (sc.c[:, None] * sc.c[None, :])

    def pair_fold(producer, consumer, hess_p, hess_c, stat, groups, kind):
        cons = targeted(consumer)
        prod = targeted(producer)
        if not cons and not prod:
            return
        hd = blocks.head_dim if groups > 1 else 0
        stat = equalize.reduce(stat, groups, blocks.head_dim) if groups > 1 else stat
        p_lin, c_lin = layer.get_submodule(producer), layer.get_submodule(consumer)
        sc = equalize.search(stat, [(c_lin.weight.data, hess_c)] if cons else [],
                             [(p_lin.weight.data, hess_p)] if prod else [], groups=groups, head_dim=hd)
        if sc.error >= sc.error_before:
            return
        p_lin.weight.data = equalize.scale_rows(p_lin.weight.data, sc.c)
        if p_lin.bias is not None:
            p_lin.bias.data = equalize.scale_rows(p_lin.bias.data, sc.c)
        c_lin.weight.data = equalize.scale_columns(c_lin.weight.data, equalize.expand(sc.c, groups, blocks.head_dim))
        record(kind, sc)

    h_attn = norm_fold(layer.input_layernorm, GROUPS[0], h_attn, a_attn, "input_layernorm -> q/k/v")
    pair_fold("self_attn.v_proj", "self_attn.o_proj", h_attn, h_o, a_o, blocks.groups, "v_proj -> o_proj")
    h_mlp = norm_fold(layer.post_attention_layernorm, GROUPS[2], h_mlp, a_mlp, "post_attention_layernorm -> gate/up")
    pair_fold("mlp.up_proj", "mlp.down_proj", h_mlp, h_down, a_down, 1, "up_proj -> down_proj")


def quantize_layers(blocks: Blocks, calib: Calibration, targets: set[str], *, method: str, equalize_scales: bool,
                    damp: float, eps: float, log: CalibrationLog, tune_steps: int = 0,
                    progress: LayerProgress | None = None) -> Iterator[tuple[str, torch.Tensor, QuantizedWeight | None]]:
    """Yield ``(name, tensor, quantized)`` for every tensor of every decoder block, block
    by block in checkpoint order. ``quantized`` is set for the projections in ``targets``
    (module names); ``tensor`` is then the (equalized) FP weight it was made from. Other
    tensors (norm gains, kept projections, biases) come back in the source dtype, with
    any equivalence transform folded in. ``method`` is ``gptq`` or ``absmean``."""
    h = blocks.embed(calib.ids)
    h_fp = h.clone() if tune_steps else None
    for i in range(blocks.n_layers):
        prefix = f"{LAYER_PREFIX}{i}."
        layer = blocks.load(i)
        if equalize_scales:
            _equalize(blocks, layer, h, prefix, targets, log)
        reference = copy.deepcopy(layer) if tune_steps else None  # the block unquantized
        results: dict[str, tuple[torch.Tensor, QuantizedWeight]] = {}  # weight name -> (FP weight, result)
        for group in GROUPS:
            members = [p for p in group if f"{prefix}{p}" in targets]
            if not members:
                continue
            hess, _ = blocks.run(layer, h, until=layer.get_submodule(group[0]))
            for p in members:
                lin = layer.get_submodule(p)
                w = lin.weight.data
                q = _quantize(w, hess, method, damp, eps)
                results[f"{prefix}{p}.weight"] = (w, q)
                lin.weight.data = q.scale * q.codes.float().to(blocks.device)  # later inputs see the quantized layer
        if tune_steps and results:
            target = blocks.run(reference, h_fp)
            results = _tune(blocks, layer, prefix, results, h, target, tune_steps, log)
            h_fp = target
        h = blocks.run(layer, h)
        del reference
        state = layer.state_dict()
        for name in blocks.names[i]:
            fp, q = results.get(name, (state[name[len(prefix):]], None))
            yield name, fp.to(blocks.dtypes[name]).cpu(), q
        del layer, results, state
        if progress:
            progress(i + 1, blocks.n_layers, "quantized")


def _tune(blocks: Blocks, layer, prefix: str, results: dict, h: torch.Tensor, target: torch.Tensor, steps: int,
          log: CalibrationLog) -> dict:
    """Fit the block's RMSNorm gains and ternary scales to the FP block's output
    (:mod:`bitquant.methods.tune`); returns ``results`` with the fitted scales."""
    for prm in layer.parameters():
        prm.requires_grad_(False)
    swapped = {}
    for name, (_, q) in results.items():
        module = name[len(prefix):].removesuffix(".weight")
        parent, _, leaf = module.rpartition(".")
        swapped[name] = ScaledTernary(q.codes.to(blocks.device), q.scale)
        setattr(layer.get_submodule(parent), leaf, swapped[name])
    gains = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
    for g in gains:
        g.requires_grad_(True)
    pe, mask = blocks.block_inputs(layer, h)
    cos, sin = (t.clone() for t in pe)  # made outside inference mode, so autograd can use them
    fit = tune(lambda x: layer(x, position_embeddings=(cos, sin), attention_mask=mask),
               gains + [m.log_scale for m in swapped.values()],
               h.clone(), target.clone(), steps=steps, batch=blocks.batch)
    for g in gains:
        g.requires_grad_(False)
    log.tuning.append({"layer": prefix.rstrip("."), "error_before": round(fit.loss_before, 6),
                       "error_after": round(fit.loss_after, 6), "steps": fit.steps})
    out = {}
    for name, (w, q) in results.items():
        module = name[len(prefix):].removesuffix(".weight")
        parent, _, leaf = module.rpartition(".")
        scale = swapped[name].scale
        lin = torch.nn.Linear(q.codes.shape[1], q.codes.shape[0], bias=False, device=blocks.device)
        lin.weight.data = scale * q.codes.float().to(blocks.device)
        lin.weight.requires_grad_(False)
        setattr(layer.get_submodule(parent), leaf, lin)
        out[name] = (w, replace(q, scale=scale))
    return out


def _quantize(w: torch.Tensor, hess: torch.Tensor, method: str, damp: float, eps: float) -> QuantizedWeight:
    w32 = w.float()
    if method == "gptq":
        r = ternary_gptq(w32, hess, damp=damp, eps=eps)
        codes, scale, err, base_err = r.codes, r.scale, r.output_error, r.absmean_output_error
    else:
        s = float(absmean_scale(w32, eps))
        codes = ternarize(w32, s)
        err = base_err = output_error(w32, s * codes.float(), hess)
        scale = s
    return QuantizedWeight(codes.cpu(), scale, zero_fraction(codes), relative_error(w32, codes, scale), err, base_err)
