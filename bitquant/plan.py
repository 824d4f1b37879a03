"""Planning an output from a checkpoint's headers alone: which tensors are ternarized,
which are kept, and the spec of every output tensor in write order.

Shared by every pipeline that writes a ternary checkpoint (``convert``, ``heal``); nothing
here reads a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitquant.blocks import layer_index
from bitquant.errors import SourceError, TensorError, UsageError
from bitquant.families import family_of
from bitquant.formats import hf_bitnet
from bitquant.inputs import BITNET_ARCHITECTURE, Layout, check_shape, is_projection
from bitquant.recipe import Recipe
from bitquant.report import KeptTensor
from bitquant.source import Checkpoint
from bitquant.tensorfile import TensorSpec
from bitquant.ternary import check_float


@dataclass
class Plan:
    """What happens to each source tensor, decided from headers alone."""

    quantize: set[str]  # source weight names that become ternary outputs
    outputs: dict[str, list[str]]  # source name -> output names ([] for a consumed weight_scale)
    specs: list[TensorSpec]  # output tensors, in write order
    kept: list[KeptTensor]
    source_count: int  # source tensors that are written (consumed weight_scales not counted)
    total_params: int  # every weight of the model (a packed matrix counts out*in)
    layout: Layout = Layout("fp")  # what the source holds
    linear_class: str = "bitlinear"  # the output's transformers linear class (hf-bitnet)
    logical: dict[str, TensorSpec] | None = None  # written source tensors with their unpacked shapes

    @property
    def quantized_modules(self) -> set[str]:
        """Module names (no ``.weight``) of the projections to ternarize."""
        return {name.removesuffix(".weight") for name in self.quantize}


def output_linear_class(ckpt: Checkpoint, recipe: Recipe) -> str:
    """The recipe's ``linear_class``, with ``auto`` resolved (see ``LINEAR_CLASS_CHOICES``)."""
    if recipe.linear_class != "auto":
        return recipe.linear_class
    if ckpt.layout.kind == "packed":
        return ckpt.layout.linear_class
    return "autobitlinear" if ckpt.architecture == BITNET_ARCHITECTURE else "bitlinear"


def check_recipe(ckpt: Checkpoint, recipe: Recipe) -> None:
    """Ternary-trained inputs take the plain recipe: their codes are given (packed) or
    defined by absmean (masters), so calibration or keeping projections would change the model.
    Calibrated recipes fold scales through the norms of a Llama-style block, so families
    with another block shape (:attr:`Family.llama_block`) take absmean."""
    family = family_of(ckpt.config)
    if recipe.calibrated and not family.llama_block:
        raise UsageError(f"calibrated recipe {recipe.name!r} needs the Llama block layout, which {family.name} "
                         f"({family.architecture}) does not have; convert it with the default recipe (absmean)")
    if not ckpt.layout.ternary_trained:
        return
    what = "is already packed ternary" if ckpt.layout.kind == "packed" else "is a ternary-trained master"
    if recipe.calibrated:
        raise UsageError(f"{ckpt.path} {what}, so calibrated recipe {recipe.name!r} does not apply; convert it with "
                         "the default recipe (absmean), which is lossless for it")
    if recipe.exclude:
        raise UsageError(f"{ckpt.path} {what}; keeping projections in full precision (--exclude, recipe "
                         f"{recipe.name!r}) would change the model it was trained as: drop the exclusions")


def plan_conversion(ckpt: Checkpoint, recipe: Recipe, keep: dict[str, str] | None = None) -> Plan:
    """Decide every source tensor's fate and every output tensor's spec.

    ``keep`` maps projections (module names) chosen to stay in full precision to the
    reason. Calibrated recipes write tensors block by block (the order calibration
    produces them): every tensor outside the decoder blocks first, then block 0, 1, ...
    A packed source's ``weight_scale`` tensors are consumed by their weights.
    """
    keep = keep or {}
    check_recipe(ckpt, recipe)
    layout = ckpt.layout
    linear_class = output_linear_class(ckpt, recipe)
    sources = {spec.name: spec for _, spec in ckpt.iter_specs()}
    scales = set()
    if layout.kind == "packed":
        scales = {n + hf_bitnet.SCALE_SUFFIX for n in sources if is_projection(n, recipe.projections)
                  and not layout.keeps(n.removesuffix(".weight"))}
    quantize: set[str] = set()
    outputs: dict[str, list[str]] = {}
    specs: list[TensorSpec] = []
    kept: list[KeptTensor] = []
    logical: dict[str, TensorSpec] = {}
    total_params = 0
    family_leaves = tuple(p.rsplit(".", 1)[-1] for p in family_of(ckpt.config).projections)
    for spec in sources.values():
        if spec.name in scales:
            outputs[spec.name] = []
            continue
        module = spec.name.removesuffix(".weight")
        projection = is_projection(spec.name, recipe.projections)
        if projection and spec.dtype == torch.uint8:  # packed source: [out/4, in] codes
            scale_spec = sources[spec.name + hf_bitnet.SCALE_SUFFIX]
            spec = TensorSpec(spec.name, scale_spec.dtype, (4 * spec.shape[0], *spec.shape[1:]))
        linear = is_projection(spec.name, family_leaves)  # a linear layer of the family's blocks
        if projection or linear:
            check_shape(ckpt.config, spec.name, spec.shape, str(ckpt.path), packed=False)
        logical[spec.name] = spec
        total_params += spec.numel
        out = [spec]
        if linear and not projection:  # one the recipe leaves alone
            kept.append(KeptTensor(module, "not among the recipe's projections"))
        elif projection and layout.kind == "packed" and layout.keeps(module):
            kept.append(KeptTensor(module, "kept in full precision by the source checkpoint"))
        elif projection and not recipe.is_target(module):
            kept.append(KeptTensor(module, "excluded by the recipe"))
        elif projection and module in keep:
            kept.append(KeptTensor(module, keep[module]))
        elif projection:
            check_float(torch.empty((), dtype=spec.dtype), spec.name)
            if len(spec.shape) == 2 and spec.shape[0] % 4 and recipe.indivisible == "keep":
                kept.append(KeptTensor(module, f"{spec.shape[0]} output rows is not a multiple of 4"))
            else:
                out = hf_bitnet.packed_specs(spec.name, spec, linear_class)  # raises the explanatory TensorError
                quantize.add(spec.name)
        outputs[spec.name] = [s.name for s in out]
        specs.extend(out)
    if recipe.calibrated:
        position = {s.name: i for i, s in enumerate(specs)}
        specs.sort(key=lambda s: (layer_index(s.name), position[s.name]))
    if not quantize:
        raise TensorError(
            f"no projection of {ckpt.path} matches the recipe, so nothing would be quantized; check its exclude patterns"
        )
    if not ckpt.tie_word_embeddings and "lm_head.weight" not in outputs:
        raise SourceError(
            f"{ckpt.path} has untied embeddings but no lm_head.weight; the checkpoint is incomplete, download it again"
        )
    return Plan(quantize, outputs, specs, kept, len(logical), total_params, layout, linear_class, logical)
