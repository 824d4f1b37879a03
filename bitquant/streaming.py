"""Evaluation in bounded memory: every evaluated window runs through one decoder block at
a time, so only one block and the windows' hidden states are ever in memory (16k tokens
of a 4096-wide model: 270 MB in float32), whatever the model's size.

The windows are embedded once (only their rows of the embedding table are read), run
through block 0, then block 1, and so on (blocks are built by
:class:`~bitquant.blocks.Blocks` from the memory-mapped checkpoint: FP blocks as they are,
packed ternary ones with the runtime's W1.58A8 layers), and the final norm is applied one
window at a time; :mod:`bitquant.scoring` then takes the output head a block of
vocabulary rows at a time, straight from the memory map, so neither a window's logits nor
a float32 copy of a 152k-token head ever exist. On a GPU, blocks move there one at a
time. :func:`fits` decides when the simpler in-memory path is used instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from bitquant.blocks import Blocks
from bitquant.scoring import Head
from bitquant.source import open_checkpoint
from bitquant.text import scored_rows, window_input

#: Called as work is done: (steps done, steps in all); a step is a block or a window.
StepProgress = Callable[[int, int], None]

#: Share of the machine's memory (CPU) or of the free GPU memory that the in-memory path
#: may take before streaming is chosen.
MEMORY_SHARE = 0.25


def model_bytes(folder: Path, dtype: torch.dtype, act_quant: bool = True) -> int:
    """Memory the in-memory path needs for this model: every weight in ``dtype``, packed
    ternary ones unpacked to int8 codes (W1.58A8) or to ``dtype`` (weights only)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for _, spec in open_checkpoint(folder).iter_specs():
        if spec.dtype == torch.uint8:
            total += 4 * spec.numel * (1 if act_quant else itemsize)
        else:
            total += spec.numel * itemsize
    return total


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits(folders: list[Path], dtype: torch.dtype, device: str, act_quant: bool = True) -> bool:
    """True when all these models together fit comfortably in memory at once."""
    return sum(model_bytes(f, dtype, act_quant) for f in folders) <= MEMORY_SHARE * available_bytes(device)


class Streamed(NamedTuple):
    """Every window's final hidden states, grouped by length, and what scores them."""

    hidden: dict[int, torch.Tensor]  # windows of one length, stacked
    where: dict[int, tuple[int, int]]  # window -> (length, row)
    norm: torch.nn.Module  # the model's final norm
    head: Head  # its output head, for bitquant.scoring


def final_hidden(folder: Path, ids: torch.Tensor, spans: list[tuple[int, int, int]], dtype: torch.dtype, device: str,
                 act_quant: bool = True, progress: Callable[[], None] | None = None, bos: int | None = None):
    """Final hidden states of every window (each after ``bos`` where there is one), block by
    block (:class:`Streamed`; the head is :meth:`~bitquant.blocks.Blocks.scorer`'s)."""
    blocks = Blocks(open_checkpoint(folder), device, dtype=dtype, act_quant=act_quant)
    groups: dict[int, list[int]] = {}
    for j, (begin, end, _) in enumerate(spans):
        groups.setdefault(end - begin, []).append(j)
    where = {j: (length, row) for length, members in groups.items() for row, j in enumerate(members)}
    hidden = {length: blocks.embed(torch.stack([window_input(ids, spans[j], bos) for j in members]))
              for length, members in groups.items()}
    for i in range(blocks.n_layers):
        layer = blocks.load(i)
        hidden = {length: blocks.run(layer, h) for length, h in hidden.items()}
        del layer
        if progress:
            progress()
    return Streamed(hidden, where, *blocks.scorer())


@torch.inference_mode()
def window_rows(streamed: Streamed, spans: list[tuple[int, int, int]], bos: int | None = None) -> Iterator[torch.Tensor]:
    """Each window's final hidden states (after the final norm) at its scored positions,
    one window at a time; the head is applied by :mod:`bitquant.scoring`."""
    hidden, where, norm, _ = streamed
    for j, span in enumerate(spans):
        length, row = where[j]
        yield norm(hidden[length][row, scored_rows(span, bos)])
