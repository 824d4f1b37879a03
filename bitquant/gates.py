"""Quality gates: limits on what ``convert --eval-text`` measured. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

#: gate name -> (key in the perplexity object, command-line option)
GATES = {"max_ppl_ratio": ("ratio", "--max-ppl-ratio"), "max_kl": ("kl_mean", "--max-kl")}


@dataclass(frozen=True)
class GateResult:
    gate: str
    option: str
    limit: float
    value: float
    passed: bool


def check(limits: dict[str, float], perplexity: dict) -> list[GateResult]:
    """Compare each set limit with the measured value (NaN or Inf fails)."""
    results = []
    for gate, limit in limits.items():
        key, option = GATES[gate]
        value = float(perplexity[key])
        passed = value <= limit  # False for NaN
        results.append(GateResult(gate, option, float(limit), value, passed))
    return results
