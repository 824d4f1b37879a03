"""2-bit packing of ternary codes in transformers' BitNet row-block order.

Layout (transformers ``integrations/bitnet.py``, ``pack_weights`` / ``unpack_weights``):
a code matrix ``[out, in]`` with values in {-1, 0, 1} is stored as ``uint8 [out/4, in]``.
Each code is stored as ``code + 1`` (0, 1 or 2). With ``R = out / 4``, output row
``i * R + r`` lives in bits ``2i .. 2i+1`` of packed row ``r``: four contiguous row
blocks share a byte, they are not interleaved row by row.

Pure functions, no I/O.
"""

from __future__ import annotations

import torch

from bitquant.errors import TensorError

CODES_PER_BYTE = 4


def packed_shape(shape: tuple[int, ...] | torch.Size, name: str = "weight") -> tuple[int, int]:
    """Shape of the packed tensor for a ``[out, in]`` matrix; raises if ``out % 4 != 0``."""
    if len(shape) != 2:
        raise TensorError(f"tensor {name!r} has shape {tuple(shape)}; only 2-D weights can be packed")
    out, inp = shape
    if out % CODES_PER_BYTE:
        raise TensorError(
            f"tensor {name!r} has {out} output rows, not a multiple of 4, so it cannot be packed "
            "in the transformers BitNet layout; exclude it in the recipe to keep it in full precision"
        )
    return out // CODES_PER_BYTE, inp


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack int codes in {-1, 0, 1} of shape ``[out, in]`` into ``uint8 [out/4, in]``."""
    rows, cols = packed_shape(codes.shape)
    c = (codes.to(torch.int16) + 1).to(torch.uint8).view(CODES_PER_BYTE, rows, cols)
    packed = c[0].clone()
    packed |= c[1] << 2
    packed |= c[2] << 4
    packed |= c[3] << 6
    return packed


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``uint8 [R, in]`` to int8 codes ``[4R, in]``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TensorError(f"packed weights must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    blocks = [((packed >> (2 * i)) & 3) for i in range(CODES_PER_BYTE)]
    return (torch.cat(blocks, dim=0).to(torch.int8) - 1)
