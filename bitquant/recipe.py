"""Quantization recipes: small, frozen, versioned dataclasses loaded from YAML.

A recipe holds everything that decides the converted model's bytes. The resolved recipe
(after command-line overrides) and its hash are written into every output, so a
conversion can be reproduced and compared.

Recipes live in ``configs/*.yaml`` (installed as ``bitquant.configs``); ``load_recipe``
takes either a bundled name (``absmean``) or a path to a YAML file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bitquant.errors import RecipeError
from bitquant.families import PROJECTIONS  # every family's projection leaf names

#: Version of the recipe schema. Bump when a field's meaning changes.
SCHEMA_VERSION = 1

#: transformers' BitNet linear classes the hf-bitnet format can write; ``auto`` keeps a
#: packed input's own class and otherwise picks autobitlinear for BitNetForCausalLM (the
#: layout of the BitNet b1.58 2B-4T release) and bitlinear for the rest.
LINEAR_CLASS_CHOICES = ("auto", "bitlinear", "autobitlinear")

#: ``absmean``: BitNet b1.58 rounding, no calibration (exact for ternary-trained models).
#: ``gptq``: error feedback while rounding, on calibration text (:mod:`bitquant.methods.gptq`).
METHODS = ("absmean", "gptq")
FORMATS = ("hf-bitnet", "gguf-tq2_0", "gguf-tq1_0")
INDIVISIBLE_POLICIES = ("error", "keep")

DEFAULT_RECIPE = "absmean"


@dataclass(frozen=True)
class Recipe:
    """What to quantize and how.

    ``exclude`` holds shell-style patterns (``fnmatch``) matched against module names such
    as ``model.layers.0.mlp.down_proj``; matching projections stay in full precision.
    ``indivisible`` says what to do with a projection whose output size is not a multiple
    of 4 (the packed layout needs it): ``error`` stops, ``keep`` keeps it in full precision
    and lists it in the report. ``linear_class`` is the transformers BitNet class that the
    ``hf-bitnet`` format is written for (``LINEAR_CLASS_CHOICES``).

    Calibrated recipes (``method: gptq``, ``equalize: true`` or a
    ``target_bits_per_weight``) run ``calib_tokens`` tokens of calibration text, in
    sequences of ``calib_context``, through the model layer by layer (see
    :mod:`bitquant.calibrate`). ``equalize`` folds per-channel scales into the RMSNorm
    gains and between v/o and up/down; ``target_bits_per_weight`` keeps the projections
    that ternarizing damages most in full precision, while the average bits per projection
    weight stays within it; ``damp`` is GPTQ's Hessian dampening (share of the mean diagonal);
    ``tune_steps`` > 0 fits each block's RMSNorm gains and ternary scales to the FP block's
    output for that many Adam steps (:mod:`bitquant.methods.tune`).

    ``eval_*`` are the evaluation settings of ``convert --eval-text``; ``max_ppl_ratio`` and
    ``max_kl`` are quality gates checked against that evaluation (``None``: no gate).
    """

    name: str = DEFAULT_RECIPE
    schema: int = SCHEMA_VERSION
    method: str = "absmean"
    eps: float = 1e-5
    format: str = "hf-bitnet"
    linear_class: str = "auto"
    projections: tuple[str, ...] = PROJECTIONS
    exclude: tuple[str, ...] = ()
    indivisible: str = "error"
    equalize: bool = False
    target_bits_per_weight: float | None = None
    calib_tokens: int = 16384
    calib_context: int = 512
    damp: float = 0.01
    tune_steps: int = 0
    eval_context: int = 512
    eval_stride: int | None = None
    eval_max_tokens: int = 16384
    max_ppl_ratio: float | None = None
    max_kl: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["projections"] = list(self.projections)
        d["exclude"] = list(self.exclude)
        return d

    def sha256(self) -> str:
        """Hash of the resolved recipe, minus its free-text description."""
        d = self.to_dict()
        d.pop("description")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with the given fields overridden (command-line options); ``None`` values
        mean "not given" and leave the field as it is. Validated again."""
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **_coerce(given)) if given else self

    @property
    def gates(self) -> dict[str, float]:
        """The quality gates that are set."""
        return {k: v for k, v in (("max_ppl_ratio", self.max_ppl_ratio), ("max_kl", self.max_kl)) if v is not None}

    @property
    def calibrated(self) -> bool:
        """True when the recipe needs calibration text."""
        return (self.method != "absmean" or self.equalize or self.target_bits_per_weight is not None
                or self.tune_steps > 0)

    def is_target(self, module: str) -> bool:
        """True when ``module`` (e.g. ``model.layers.3.mlp.up_proj``) is to be ternarized."""
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in self.projections or ".layers." not in f".{module}":
            return False
        return not any(fnmatch.fnmatchcase(module, pat) for pat in self.exclude)


_FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "schema": (int,),
    "method": (str,),
    "eps": (float, int),
    "format": (str,),
    "linear_class": (str,),
    "projections": (tuple,),
    "exclude": (tuple,),
    "indivisible": (str,),
    "equalize": (bool,),
    "target_bits_per_weight": (float, int, type(None)),
    "calib_tokens": (int,),
    "calib_context": (int,),
    "damp": (float, int),
    "tune_steps": (int,),
    "eval_context": (int,),
    "eval_stride": (int, type(None)),
    "eval_max_tokens": (int,),
    "max_ppl_ratio": (float, int, type(None)),
    "max_kl": (float, int, type(None)),
    "description": (str,),
}


def _coerce(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for key in ("projections", "exclude", "train", "betas"):
        if key in out and isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def check_types(r: Any, types: dict[str, tuple[type, ...]]) -> None:
    """Raise a :class:`RecipeError` naming the first field of ``r`` whose value has the wrong type."""
    for name, allowed in types.items():
        value = getattr(r, name)
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            want = " or ".join({tuple: "list", type(None): "null"}.get(t, t.__name__) for t in allowed)
            raise RecipeError(f"recipe field {name!r} must be a {want}, got {value!r}")


def check_common(r: Any) -> None:
    """The checks every recipe kind shares: schema, what is ternarized, format, evaluation, gates."""
    for name in ("projections", "exclude"):
        for item in getattr(r, name):
            if not isinstance(item, str) or not item:
                raise RecipeError(f"recipe field {name!r} must hold non-empty strings, got {item!r}")
    if r.schema != SCHEMA_VERSION:
        raise RecipeError(
            f"recipe field 'schema' is {r.schema}, but this bitquant reads schema {SCHEMA_VERSION}"
        )
    check_choice("format", r.format, FORMATS)
    check_choice("indivisible", r.indivisible, INDIVISIBLE_POLICIES)
    unknown = sorted(set(r.projections) - set(PROJECTIONS))
    if unknown:
        raise RecipeError(f"recipe field 'projections' names unknown projections {unknown}; known: {list(PROJECTIONS)}")
    if not 0 < r.eps < 1:
        raise RecipeError(f"recipe field 'eps' must be between 0 and 1, got {r.eps}")
    if r.eval_context < 2 or r.eval_max_tokens < r.eval_context:
        raise RecipeError(
            f"recipe fields 'eval_context' ({r.eval_context}) and 'eval_max_tokens' ({r.eval_max_tokens}) "
            "need 2 <= eval_context <= eval_max_tokens"
        )
    if r.eval_stride is not None and not 1 <= r.eval_stride <= r.eval_context:
        raise RecipeError(f"recipe field 'eval_stride' must be between 1 and eval_context, got {r.eval_stride}")
    for gate in ("max_ppl_ratio", "max_kl"):
        value = getattr(r, gate)
        if value is not None and value <= 0:
            raise RecipeError(f"recipe field {gate!r} must be positive, got {value}")


def _validate(r: Recipe) -> None:
    check_types(r, _TYPES)
    check_common(r)
    check_choice("method", r.method, METHODS)
    check_choice("linear_class", r.linear_class, LINEAR_CLASS_CHOICES)
    if r.target_bits_per_weight is not None and not 2 <= r.target_bits_per_weight <= 16:
        raise RecipeError(
            f"recipe field 'target_bits_per_weight' must be between 2 (all ternary) and 16 (all kept), "
            f"got {r.target_bits_per_weight}"
        )
    if r.calib_context < 2 or r.calib_tokens < r.calib_context:
        raise RecipeError(
            f"recipe fields 'calib_context' ({r.calib_context}) and 'calib_tokens' ({r.calib_tokens}) "
            "need 2 <= calib_context <= calib_tokens"
        )
    if r.tune_steps < 0:
        raise RecipeError(f"recipe field 'tune_steps' must be 0 (off) or more, got {r.tune_steps}")
    if not 0 < r.damp < 1:
        raise RecipeError(f"recipe field 'damp' must be between 0 and 1, got {r.damp}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RecipeError(f"recipe field {name!r} is {value!r}; choose one of {', '.join(choices)}")


def bundled_recipes(kind: str = "convert") -> list[str]:
    """Names of the recipes of this ``kind`` (``convert`` or ``heal``) shipped in ``configs/``."""
    folder = resources.files("bitquant.configs")
    names = []
    for p in sorted(folder.iterdir(), key=lambda p: p.name.removesuffix(".yaml")):
        if p.name.endswith(".yaml"):
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("kind", "convert") == kind:
                names.append(p.name[: -len(".yaml")])
    return names


def recipe_from_dict(data: Any, origin: str) -> Recipe:
    """Build a validated :class:`Recipe` from parsed YAML; errors name ``origin`` and the field."""
    return build(Recipe, _FIELDS, data, origin)


def build(cls, fields: dict, data: Any, origin: str):
    """A validated recipe dataclass ``cls`` from parsed YAML (``fields``: its field map)."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {origin} must be a YAML mapping of field: value")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(
            f"recipe {origin} has unknown field {unknown[0]!r}; known fields: {', '.join(fields)}"
        )
    try:
        return cls(**_coerce(data))
    except RecipeError as e:
        raise RecipeError(f"recipe {origin}: {e.message.removeprefix('recipe ')}") from None


def read_yaml(spec: str | Path, kind: str = "convert") -> tuple[Any, str]:
    """Parsed YAML of a bundled recipe of ``kind`` (by name) or of a file (by path), and a
    label for messages."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist; pass a YAML file or one of {bundled_recipes(kind)}")
        text = path.read_text(encoding="utf-8", errors="replace")
        origin = str(path)
    else:
        names = bundled_recipes(kind)
        if str(spec) not in names:
            which = "" if kind == "convert" else f"{kind} "
            raise RecipeError(f"no bundled {which}recipe named {str(spec)!r}; choose one of {names} or pass a YAML file")
        text = resources.files("bitquant.configs").joinpath(f"{spec}.yaml").read_text(encoding="utf-8")
        origin = f"{spec!s} (bundled)"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise RecipeError(f"recipe {origin} is not valid YAML{at}; fix the syntax") from None
    found = data.get("kind", "convert") if isinstance(data, dict) else kind
    if found != kind:
        raise RecipeError(f"recipe {origin} is a {found} recipe, not a {kind} recipe; use it with bitquant {found}"
                          + ("" if found in ("convert", "heal") else f", or set 'kind: {kind}'"))
    return data, origin


def load_recipe(spec: str | Path | None = None) -> Recipe:
    """Load a bundled recipe by name, or a YAML file by path. ``None`` gives the default."""
    data, origin = read_yaml(DEFAULT_RECIPE if spec is None else spec)
    return recipe_from_dict(data, origin)
