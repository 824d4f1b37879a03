"""What a conversion measured, as plain dataclasses and their JSON form.

No terminal rendering here (that is ``cli/render.py``) and no file I/O beyond turning a
report into JSON text. Field meanings are documented in the README ("The report").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


#: A healed model whose greedy completions have fewer distinct 4-grams than this share of the
#: source's is said to loop.
LOOPING = 0.8


def own_repeats(on_policy: dict, digits: int = 0) -> str:
    """The on-policy rollouts' share of tokens that repeat an n-gram of their own sequence, in
    words for the card and the summary ("" when no rollout was written)."""
    shares = on_policy.get("repeated_shares") or []
    if not shares:
        return ""
    said = f"; its own text repeated a {on_policy.get('unlikelihood_n', 4)}-gram at {shares[0]['share']:.{digits}%} of its tokens"
    return said + (" (one rollout)" if len(shares) == 1 else f" at the first rollout, {shares[-1]['share']:.{digits}%} at the last")


@dataclass(frozen=True)
class LayerStats:
    """One ternarized weight matrix."""

    name: str
    shape: tuple[int, int]
    scale: float  # s = max(mean|W|, eps), float32, the multiplier of the codes
    zero_fraction: float
    relative_error: float  # ||W - s*Wq|| / ||W||
    scale_clamped: bool = False  # mean|W| was below eps (e.g. an all-zero matrix)
    # Calibrated recipes only: relative squared error of the layer's output on calibration
    # inputs, tr(dW H dW^T) / tr(W H W^T), for the method and for absmean rounding.
    output_error: float | None = None
    absmean_output_error: float | None = None
    # True when codes and scale were copied from an already-ternary source (packed, or
    # dense ternary values): no quantization error was added.
    copied: bool = False

    @classmethod
    def of(cls, weight_name: str, shape, result) -> "LayerStats":
        """From a quantization result (``scale``, ``zero_fraction``, ``relative_error``,
        ``scale_clamped``, optionally ``output_error`` and ``absmean_output_error``) of the
        weight ``weight_name`` (``....weight``)."""
        return cls(weight_name.removesuffix(".weight"), tuple(shape), result.scale, result.zero_fraction,
                   result.relative_error, result.scale_clamped, getattr(result, "output_error", None),
                   getattr(result, "absmean_output_error", None), bool(getattr(result, "copied", False)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerStats":
        """Inverse of its JSON form (where ``shape`` is a list)."""
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclass(frozen=True)
class KeptTensor:
    """A projection left in full precision, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class SizeStats:
    source_bytes: int  # bytes of the source *.safetensors files on disk
    output_bytes: int  # bytes of the output *.safetensors files on disk (headers included)
    compression_ratio: float  # source_bytes / output_bytes
    quantized_params: int  # weights in ternarized matrices
    quantized_bytes: int  # their packed codes + scales
    bits_per_weight_quantized: float  # 8 * quantized_bytes / quantized_params
    total_params: int  # every weight of the model (a packed matrix counts out*in)
    total_tensor_bytes: int  # every stored tensor's data
    bits_per_weight_model: float  # 8 * total_tensor_bytes / total_params

    @classmethod
    def from_counts(cls, source_bytes: int, output_bytes: int, quantized_params: int, quantized_bytes: int,
                    total_params: int, total_tensor_bytes: int) -> "SizeStats":
        """The ratios derived from the raw byte and parameter counts."""
        return cls(
            source_bytes=source_bytes,
            output_bytes=output_bytes,
            compression_ratio=round(source_bytes / output_bytes, 4),
            quantized_params=quantized_params,
            quantized_bytes=quantized_bytes,
            bits_per_weight_quantized=round(8 * quantized_bytes / quantized_params, 4),
            total_params=total_params,
            total_tensor_bytes=total_tensor_bytes,
            bits_per_weight_model=round(8 * total_tensor_bytes / total_params, 4),
        )


@dataclass(frozen=True)
class OutputFile:
    name: str
    bytes: int
    sha256: str


@dataclass
class ConvertReport:
    bitquant_version: str
    source: dict[str, Any]
    architecture: str
    recipe: dict[str, Any]
    recipe_sha256: str
    fingerprint: str  # sha256 over source (commit or file stats), recipe, bitquant version, eval text
    format: str
    size: SizeStats
    layers: list[LayerStats]
    kept_full_precision: list[KeptTensor]
    files: list[OutputFile]
    versions: dict[str, str]
    elapsed_seconds: float
    created_at: str
    perplexity: dict[str, Any] | None = None
    gates: list[dict[str, Any]] | None = None  # one GateResult per gate that was set
    resumed_shards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    published: dict[str, Any] | None = None  # where --push-to-hub uploaded it
    gguf: dict[str, Any] | None = None  # GGUF outputs: file, type, bytes_by_type, not_tq
    calibration: dict[str, Any] | None = None  # calibrated recipes: text, tokens, methods, transforms, mixed precision
    input: dict[str, Any] | None = None  # what the source held (FP, master, packed, ternary-valued) and what was copied
    heal: dict[str, Any] | None = None  # bitquant heal: training data, schedule, speed, loss curve, exactness
    generation: dict[str, Any] | None = None  # heal: greedy completions of fixed prompts, source and result, distinct 4-grams
    up_to_date: bool = False  # set when convert found OUT already up to date (not saved)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("up_to_date")
        for layer in d["layers"]:
            layer["shape"] = list(layer["shape"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConvertReport":
        d = dict(d)
        d["size"] = SizeStats(**d["size"])
        d["layers"] = [LayerStats.from_dict(l) for l in d["layers"]]
        d["kept_full_precision"] = [KeptTensor(**k) for k in d["kept_full_precision"]]
        d["files"] = [OutputFile(**f) for f in d["files"]]
        return cls(**d)

    def gates_failed(self) -> list[dict[str, Any]]:
        return [g for g in self.gates or [] if not g["passed"]]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n"

    def unmeasured_perplexity(self) -> str | None:
        """What to do when no perplexity was measured (None when one was): one piece of
        advice per situation, shown alike in the card and the summary."""
        if self.perplexity:
            return None
        if self.gguf:
            return "not measured here: measure the GGUF with llama.cpp (see bitquant's README)"
        if self.heal:
            return "not measured: run `bitquant eval OUT TEXT` on text it was not trained on, or heal with --eval-text FILE"
        return "not measured: convert with --eval-text FILE, or run `bitquant eval OUT TEXT`"

    def heal_findings(self) -> list[str]:
        """Plain statements about a healed model from what was measured: completions that
        loop, a loss that did not fall. The same sentences go into the card and the summary."""
        if not self.heal:
            return []
        found = []
        g = self.generation
        if g:
            src, healed = g["models"]["source"]["distinct_4grams"], g["models"]["healed"]["distinct_4grams"]
            if healed < LOOPING * src:
                found.append(f"its greedy completions repeat themselves (distinct 4-grams {healed:.2f}, the source "
                             f"{src:.2f}): it is not usable for generation as it is")
                if not any(d.get("kind") == "text" for d in self.heal.get("data") or []):
                    found.append("it trained on the teacher's samples alone; half real text (--data FILE --data-share "
                                 "0.5) gave SmolLM2-135M 1.6x lower perplexity on alice29.txt (not on Paradise Lost) at an "
                                 "equal token count, but no recipe measured so far, real text included, stops the "
                                 "repetition (bitquant's docs/heal.md)")
        op = self.heal.get("on_policy")
        if op and not op.get("rollouts") and op.get("first_step", 0) >= self.heal.get("steps", 0):
            found.append(f"no on-policy step ran: the run's {self.heal.get('steps', 0):,} steps ended before the first "
                         f"rollout at step {op['first_step']:,}; train longer, or lower --on-policy-start or "
                         "on_policy_every")
        last_stage = [c for c in self.heal.get("curve") or [] if c.get("stage", "kl") == "kl"]
        if len(last_stage) >= 2 and last_stage[-1]["loss"] >= last_stage[0]["loss"]:
            found.append(f"the training loss did not fall ({last_stage[0]['loss']:.4g} at step {last_stage[0]['step']}, "
                         f"{last_stage[-1]['loss']:.4g} at step {last_stage[-1]['step']}): train longer, or lower --lr")
        return found

    def summary(self) -> dict[str, float]:
        """Aggregates over the ternarized matrices, for tables and cards."""
        n = len(self.layers)
        if not n:
            return {"matrices": 0, "mean_zero_fraction": 0.0, "mean_relative_error": 0.0}
        return {
            "matrices": n,
            "mean_zero_fraction": sum(l.zero_fraction for l in self.layers) / n,
            "mean_relative_error": sum(l.relative_error for l in self.layers) / n,
        }
