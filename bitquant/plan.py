"""Planning an output from a checkpoint's headers alone: which tensors are ternarized,
which are kept, and the spec of every output tensor in write order.

Shared by every pipeline that writes a ternary checkpoint (``convert``, ``heal``); nothing
here reads a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitquant.blocks import layer_index
from bitquant.errors import SourceError, TensorError
from bitquant.formats import hf_bitnet
from bitquant.recipe import Recipe
from bitquant.report import KeptTensor
from bitquant.source import Checkpoint
from bitquant.tensorfile import TensorSpec
from bitquant.ternary import check_float


@dataclass
class Plan:
    """What happens to each source tensor, decided from headers alone."""

    quantize: set[str]  # source weight names to ternarize
    outputs: dict[str, list[str]]  # source name -> output names
    specs: list[TensorSpec]  # output tensors, in write order
    kept: list[KeptTensor]
    source_count: int  # source tensors
    total_params: int  # every weight of the model

    @property
    def quantized_modules(self) -> set[str]:
        """Module names (no ``.weight``) of the projections to ternarize."""
        return {name.removesuffix(".weight") for name in self.quantize}


def plan_conversion(ckpt: Checkpoint, recipe: Recipe, keep: dict[str, str] | None = None) -> Plan:
    """Decide every source tensor's fate and every output tensor's spec.

    ``keep`` maps projections (module names) chosen to stay in full precision to the
    reason. Calibrated recipes write tensors block by block (the order calibration
    produces them): every tensor outside the decoder blocks first, then block 0, 1, ...
    """
    keep = keep or {}
    quantize: set[str] = set()
    outputs: dict[str, list[str]] = {}
    specs: list[TensorSpec] = []
    kept: list[KeptTensor] = []
    total_params = 0
    for _, spec in ckpt.iter_specs():
        total_params += spec.numel
        module, _, leaf = spec.name.rpartition(".")
        is_projection = leaf == "weight" and module.rsplit(".", 1)[-1] in recipe.projections and ".layers." in spec.name
        out = [spec]
        if is_projection and not recipe.is_target(module):
            kept.append(KeptTensor(module, "excluded by the recipe"))
        elif is_projection and module in keep:
            kept.append(KeptTensor(module, keep[module]))
        elif is_projection:
            check_float(torch.empty((), dtype=spec.dtype), spec.name)
            if len(spec.shape) == 2 and spec.shape[0] % 4 and recipe.indivisible == "keep":
                kept.append(KeptTensor(module, f"{spec.shape[0]} output rows is not a multiple of 4"))
            else:
                out = hf_bitnet.packed_specs(spec.name, spec)  # raises the explanatory TensorError
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
    return Plan(quantize, outputs, specs, kept, len(outputs), total_params)
