"""The transformers BitNet "offline" layout (FORMATS.md sections 1 and 5).

For each ternarized projection ``P``:

* ``P.weight``: ``uint8 [out/4, in]``, codes + 1 packed in row-block order
  (:mod:`bitquant.packing`);
* ``P.weight_scale``: shape ``[1]``, in one of transformers' two inverse conventions:

  - ``linear_class: bitlinear`` (``BitLinear``) divides by it, so it holds **1/s**, in the
    model dtype (storing s loads fine and gives garbage);
  - ``linear_class: autobitlinear`` (``AutoBitLinear``, offline) multiplies by it, so it
    holds **s**, in float32: rounding s to bf16 (0.2%) moves a BitNet model's logits by
    several percent, because the 8-bit activation rounding amplifies it.

``config.json`` keeps the source architecture and gains a ``quantization_config``. With
every projection quantized, ``modules_to_not_convert`` is ``null`` (transformers' default:
the output head stays a normal Linear). When a recipe keeps some projections in full
precision, the list names them *and* ``lm_head``, because an explicit list replaces the
defaults. transformers matches these names at module boundaries, so full dotted names
are exact.

This module plans and encodes tensors and writes the small JSON files; the bytes of the
weights go through :class:`bitquant.tensorfile.SafetensorsStreamWriter`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bitquant.packing import packed_shape
from bitquant.report import OutputFile
from bitquant.tensorfile import SafetensorsStreamWriter, TensorSpec
from bitquant.ternary import inverse_scale

SCALE_SUFFIX = "_scale"  # weight -> weight_scale
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def packed_specs(name: str, spec: TensorSpec, linear_class: str = "bitlinear") -> list[TensorSpec]:
    """Output specs for a ternarized ``[out, in]`` weight: packed codes, then ``weight_scale``.
    ``spec.dtype`` is the model dtype (for a packed source: its scale's dtype)."""
    return [
        TensorSpec(name, torch.uint8, packed_shape(spec.shape, name)),
        TensorSpec(scale_name(name), scale_dtype(spec.dtype, linear_class), (1,)),
    ]


def encode(name: str, packed: torch.Tensor, scale: float, dtype: torch.dtype,
           linear_class: str = "bitlinear") -> list[tuple[str, torch.Tensor]]:
    """The tensors stored for one ternarized weight (order matches :func:`packed_specs`):
    the packed codes, and ``weight_scale`` in ``linear_class``'s convention."""
    out_dtype = scale_dtype(dtype, linear_class)
    if linear_class == "autobitlinear":
        stored = torch.tensor([scale], dtype=torch.float64).to(out_dtype)
    else:
        stored = inverse_scale(scale, out_dtype).reshape(1)
    return [(name, packed), (scale_name(name), stored)]


def scale_dtype(weight_dtype: torch.dtype, linear_class: str = "bitlinear") -> torch.dtype:
    """The dtype ``weight_scale`` is stored in: float32 for autobitlinear, else the model dtype."""
    return torch.float32 if linear_class == "autobitlinear" else weight_dtype


def quantization_config(kept_modules: list[str], linear_class: str = "bitlinear") -> dict:
    """The ``quantization_config`` block of ``config.json``."""
    not_convert = None if not kept_modules else ["lm_head", *sorted(kept_modules)]
    return {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": "offline",
        "modules_to_not_convert": not_convert,
    }


@dataclass(frozen=True)
class Shard:
    filename: str
    specs: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[Shard]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes.

    A tensor larger than the limit gets a shard of its own. One shard is written as
    ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors`` with an index.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    n = len(groups)
    if n == 1:
        return [Shard(SINGLE_FILE, tuple(groups[0]))]
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


class ShardedWriter:
    """Streams tensors into the planned shards, opening each file when the previous fills.

    Shards named in ``done`` (finished by an interrupted run and verified) are not
    written again: tensors planned for them are ignored. ``on_shard`` is called with each
    shard's :class:`OutputFile` once it is flushed.
    """

    def __init__(self, folder: Path, shards: list[Shard], done: dict[str, OutputFile] | None = None,
                 on_shard: Callable[[OutputFile], None] | None = None):
        self.folder = folder
        self.done = dict(done or {})
        self._pending = [s for s in shards if s.filename not in self.done]
        self._shard_of = {spec.name: shard.filename for shard in shards for spec in shard.specs}
        self._on_shard = on_shard
        self._writer: SafetensorsStreamWriter | None = None
        self._left = 0
        self.files: list[OutputFile] = list(self.done.values())

    def shard_of(self, name: str) -> str:
        """The file that output tensor ``name`` is planned into."""
        return self._shard_of[name]

    def skips(self, name: str) -> bool:
        """True when ``name`` belongs to a shard that is already finished."""
        return self.shard_of(name) in self.done

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.skips(name):
            return
        if self._writer is None:
            shard = self._pending.pop(0)
            self._writer = SafetensorsStreamWriter(self.folder / shard.filename, list(shard.specs))
            self._left = len(shard.specs)
        self._writer.write(name, tensor)
        self._left -= 1
        if self._left == 0:
            self._writer.close()
            done = OutputFile(self._writer.path.name, self._writer.nbytes, self._writer.sha256)
            self.files.append(done)
            self._writer = None
            if self._on_shard:
                self._on_shard(done)

    def close(self) -> list[OutputFile]:
        if self._writer is not None or self._pending:
            raise ValueError("some planned tensors were never written")
        return self.files

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def write_index(folder: Path, shards: list[Shard]) -> None:
    if len(shards) < 2:
        return
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {spec.name: shard.filename for shard in shards for spec in shard.specs},
    }
    _write_json(folder / INDEX_FILE, index)


def write_config(folder: Path, source_config: dict, kept_modules: list[str], linear_class: str = "bitlinear") -> None:
    config = dict(source_config)
    config["quantization_config"] = quantization_config(kept_modules, linear_class)
    _write_json(folder / "config.json", config)


def copy_files(source: Path, folder: Path, names: list[str]) -> list[str]:
    """Copy the named files (tokenizer, generation config) that exist in ``source``."""
    copied = []
    for name in names:
        src = source / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
            copied.append(name)
    return copied


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
