"""Sensitivity-driven mixed precision: which units of projections stay in full precision.

Each unit's *damage* is measured on calibration text by the caller (in bitquant: the KL
divergence of the model's output when that unit alone is ternarized, see
:func:`bitquant.calibrate.measure_damage`; a unit is a block's attention or MLP
projections). Keeping a unit costs the bits of its full-precision weights instead of 2
bits each (the packed ternary codes). Units are kept greedily by damage per extra bit,
skipping those that no longer fit, while the average over all projection weights stays
within the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bits per weight of a packed ternary matrix (4 codes a byte; the scale is negligible).
TERNARY_BITS = 2.0


@dataclass(frozen=True)
class Choice:
    name: str
    params: int
    damage: float
    kept: bool
    rank: int  # 1 = most damage per extra bit


def choose(damage: dict[str, float], params: dict[str, int], target_bits: float, full_bits: float) -> list[Choice]:
    """Keep the projections with the most damage per extra bit within ``target_bits``.

    ``damage`` and ``params`` are keyed by projection name; ``full_bits`` is the bits per
    weight of a kept matrix (16 for FP16/BF16). The result is sorted by rank.
    """
    if not damage:
        return []
    total = sum(params[n] for n in damage)
    budget = (target_bits - TERNARY_BITS) * total  # extra bits we may spend
    extra = full_bits - TERNARY_BITS
    order = sorted(damage, key=lambda n: damage[n] / (params[n] * extra), reverse=True)
    spent = 0.0
    out = []
    for rank, name in enumerate(order, start=1):
        cost = params[name] * extra
        keep = damage[name] > 0 and spent + cost <= budget
        if keep:
            spent += cost
        out.append(Choice(name, params[name], damage[name], keep, rank))
    return out


def bits_per_weight(choices: list[Choice], full_bits: float) -> float:
    """Average bits per projection weight of a choice."""
    total = sum(c.params for c in choices)
    bits = sum(c.params * (full_bits if c.kept else TERNARY_BITS) for c in choices)
    return bits / total if total else TERNARY_BITS
