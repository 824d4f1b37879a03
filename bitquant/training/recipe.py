"""The heal recipe: a frozen, versioned dataclass loaded from ``configs/heal.yaml`` (or any
YAML file with ``kind: heal``).

It holds everything that decides a healed model: what is ternarized (as a conversion
recipe does), the training data (teacher samples and their settings, the share of user
text), the schedule, what trains, and the evaluation and gates of the result.
:meth:`HealRecipe.conversion` gives the absmean :class:`~bitquant.recipe.Recipe` the
exporter writes the healed weights with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitquant.errors import RecipeError
from bitquant.recipe import PROJECTIONS, SCHEMA_VERSION, Recipe, _coerce, build, check_choice, check_common, check_types, read_yaml

DEFAULT_HEAL_RECIPE = "heal"

#: Parameter groups that can train: the latent weights of the ternary projections (and
#: their biases), the RMSNorm gains, the embeddings (with a tied output head).
TRAINABLE = ("projections", "norms", "embeddings")
INITS = ("absmean",)
LOSSES = ("forward_kl", "reverse_kl", "jsd")
SCHEDULES = ("cosine", "constant")
#: Seconds held back from a time budget for what follows training (export, the exactness
#: check, evaluation, completions): this share of the budget, at least MIN_RESERVE.
RESERVE_SHARE = 0.08
MIN_RESERVE = 20.0


@dataclass(frozen=True)
class HealRecipe:
    """How to heal. Token counts are totals; ``batch_tokens`` = sequences x ``seq_len`` per
    optimizer step, run in micro-batches of at most ``micro_batch_tokens`` (a budget too
    small for ``min_steps`` steps gets smaller batches, see :meth:`fitted`). The warm-up
    lasts ``warmup_steps``, at most a quarter of the steps.

    Data: ``sample_tokens`` tokens are sampled from the FP model (the teacher), starting
    at BOS, at ``sample_temperature``, in sequences of ``seq_len`` (EOS is never sampled,
    so every sequence is full), ``sample_batch`` sequences at a time, from ``seed``. With
    user text (``--data``), ``data_share`` of every batch comes from it and the rest from
    samples (1.0: user text only, nothing sampled).
    """

    name: str = DEFAULT_HEAL_RECIPE
    kind: str = "heal"
    schema: int = SCHEMA_VERSION
    # what is ternarized (as in a conversion recipe) and how the result is written
    eps: float = 1e-5
    format: str = "hf-bitnet"
    projections: tuple[str, ...] = PROJECTIONS
    exclude: tuple[str, ...] = ()
    indivisible: str = "error"
    init: str = "absmean"
    # training
    tokens: int = 22_937_600
    lr: float = 2e-3
    schedule: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_tokens: int = 32768
    micro_batch_tokens: int = 32768
    seq_len: int = 512
    train: tuple[str, ...] = ("projections", "norms")
    checkpoint_every: int = 250
    min_steps: int = 16
    block_stage: float = 0.0
    time_budget: float | None = None
    # the divergence (training/loss.py) and on-policy steps (training/on_policy.py)
    loss: str = "forward_kl"
    loss_beta: float = 0.5
    loss_temperature: float = 1.0
    on_policy: float = 0.0
    on_policy_temperature: float = 1.0
    on_policy_prompt: int = 16
    on_policy_every: int = 32
    on_policy_reuse: int = 1
    on_policy_start: float = 0.0
    unlikelihood: float = 0.0
    unlikelihood_n: int = 4
    # data
    seed: int = 0
    sample_tokens: int = 4_194_304
    sample_temperature: float = 1.0
    sample_batch: int = 2048
    sample_top_p: float = 1.0
    sample_greedy_tokens: int = 0
    sample_min_distinct: float = 0.0
    data_share: float = 1.0
    data_tokens: int = 16_777_216
    # evaluation of the result and quality gates (as for convert --eval-text)
    eval_context: int = 512
    eval_stride: int | None = None
    eval_max_tokens: int = 16384
    max_ppl_ratio: float | None = None
    max_kl: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens

    @property
    def block_steps(self) -> int:
        """Optimizer steps of the block-wise stage (the first ones)."""
        return round(self.steps * self.block_stage)

    @property
    def batch_sequences(self) -> int:
        return self.batch_tokens // self.seq_len

    @property
    def divergence(self):
        from bitquant.training.loss import Divergence

        return Divergence(self.loss, self.loss_beta, self.loss_temperature)

    @property
    def on_policy_settings(self):
        from bitquant.training.on_policy import OnPolicy

        return OnPolicy(self.on_policy, self.on_policy_temperature, self.on_policy_prompt, self.on_policy_every,
                        self.on_policy_reuse, self.on_policy_start, self.unlikelihood, self.unlikelihood_n)

    @property
    def on_policy_rows(self) -> int:
        """Sequences of each batch written by the student."""
        return self.on_policy_settings.rows(self.batch_sequences)

    @property
    def gates(self) -> dict[str, float]:
        return self.conversion().gates

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("projections", "exclude", "train", "betas"):
            d[key] = list(d[key])
        return d

    def sha256(self) -> str:
        """Hash of the resolved recipe, minus its free-text description."""
        d = self.to_dict()
        d.pop("description")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def replace(self, **changes: Any) -> "HealRecipe":
        """A copy with the given fields overridden (``None``: not given). Validated again.
        A token count replaces a time budget (the two set the same thing)."""
        given = {k: v for k, v in changes.items() if v is not None}
        if "tokens" in given and "time_budget" not in given:
            given["time_budget"] = None
        return dataclasses.replace(self, **_coerce(given)) if given else self

    def fitted(self) -> "HealRecipe":
        """This recipe with the batch lowered (to a multiple of ``seq_len``, at least one
        sequence) so that the token budget makes at least ``min_steps`` optimizer steps:
        ``--tokens 32768`` alone trains in 16 steps of 2,048 tokens, not one of 32,768."""
        if self.steps >= self.min_steps:
            return self
        batch = max(self.seq_len, self.tokens // self.min_steps // self.seq_len * self.seq_len)
        return self.replace(batch_tokens=batch, micro_batch_tokens=min(self.micro_batch_tokens, batch))

    def conversion(self) -> Recipe:
        """The absmean conversion recipe that exports the healed weights."""
        return Recipe(name=self.name, method="absmean", eps=self.eps, format=self.format, projections=self.projections,
                      exclude=self.exclude, indivisible=self.indivisible, eval_context=self.eval_context,
                      eval_stride=self.eval_stride, eval_max_tokens=self.eval_max_tokens,
                      max_ppl_ratio=self.max_ppl_ratio, max_kl=self.max_kl, description=self.description)


_FIELDS = {f.name: f for f in dataclasses.fields(HealRecipe)}
_NUMBER = (float, int)
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "schema": (int,), "eps": _NUMBER, "format": (str,), "projections": (tuple,),
    "exclude": (tuple,), "indivisible": (str,), "init": (str,), "tokens": (int,), "lr": _NUMBER, "schedule": (str,),
    "warmup_steps": (int,), "min_lr_ratio": _NUMBER, "betas": (tuple,), "weight_decay": _NUMBER, "grad_clip": _NUMBER,
    "batch_tokens": (int,), "micro_batch_tokens": (int,), "seq_len": (int,), "train": (tuple,),
    "checkpoint_every": (int,), "min_steps": (int,), "block_stage": _NUMBER,
    "time_budget": (float, int, type(None)), "loss": (str,), "loss_beta": _NUMBER, "loss_temperature": _NUMBER,
    "on_policy": _NUMBER, "on_policy_temperature": _NUMBER, "on_policy_prompt": (int,), "on_policy_every": (int,),
    "on_policy_reuse": (int,), "on_policy_start": _NUMBER,
    "unlikelihood": _NUMBER, "unlikelihood_n": (int,), "seed": (int,), "sample_tokens": (int,), "sample_temperature": _NUMBER,
    "sample_batch": (int,), "sample_top_p": _NUMBER, "sample_greedy_tokens": (int,), "sample_min_distinct": _NUMBER,
    "data_share": _NUMBER, "data_tokens": (int,), "eval_context": (int,), "eval_stride": (int, type(None)),
    "eval_max_tokens": (int,), "max_ppl_ratio": (float, int, type(None)), "max_kl": (float, int, type(None)),
    "description": (str,),
}


def _validate(r: HealRecipe) -> None:
    check_types(r, _TYPES)
    check_common(r)
    if r.kind != "heal":
        raise RecipeError(f"recipe field 'kind' must be 'heal' for bitquant heal, got {r.kind!r}")
    check_choice("init", r.init, INITS)
    check_choice("schedule", r.schedule, SCHEDULES)
    check_choice("loss", r.loss, LOSSES)
    if r.loss == "jsd" and not 0 < r.loss_beta < 1:
        raise RecipeError(f"recipe field 'loss_beta' must be between 0 and 1 (exclusive) for loss: jsd, got {r.loss_beta} "
                          "(0 and 1 are loss: forward_kl and reverse_kl)")
    if r.loss_temperature <= 0:
        raise RecipeError(f"recipe field 'loss_temperature' must be positive, got {r.loss_temperature}")
    if not 0 <= r.on_policy <= 1:
        raise RecipeError(f"the on-policy share (--on-policy, recipe field 'on_policy') must be between 0 and 1, "
                          f"got {r.on_policy:g}")
    if not 0 <= r.on_policy_start < 1:
        raise RecipeError(f"the share of the steps before on-policy steps begin (--on-policy-start, recipe field "
                          f"'on_policy_start') must be at least 0 and below 1, got {r.on_policy_start:g}")
    if r.on_policy_temperature < 0 or r.sample_min_distinct < 0 or r.sample_min_distinct > 1 or r.sample_greedy_tokens < 0:
        raise RecipeError("recipe fields 'on_policy_temperature' and 'sample_greedy_tokens' must be 0 or more, and "
                          "'sample_min_distinct' between 0 and 1")
    if r.unlikelihood < 0 or r.unlikelihood_n < 2:
        raise RecipeError(f"the unlikelihood weight (--unlikelihood, recipe field 'unlikelihood') must be 0 or more "
                          f"and 'unlikelihood_n' at least 2, got {r.unlikelihood:g} and {r.unlikelihood_n}")
    if r.unlikelihood > 0 and r.on_policy == 0:
        raise RecipeError("the unlikelihood term (--unlikelihood, recipe field 'unlikelihood') acts on the text the "
                          "student writes itself: give on-policy steps too (--on-policy X, above 0), or drop it")
    if not 0 < r.sample_top_p <= 1:
        raise RecipeError(f"recipe field 'sample_top_p' must be in (0, 1], got {r.sample_top_p}")
    for name in ("on_policy_every", "on_policy_reuse", "on_policy_prompt", "data_tokens"):
        if getattr(r, name) < 1:
            raise RecipeError(f"recipe field {name!r} must be at least 1, got {getattr(r, name)}")
    if r.on_policy > 0 and r.on_policy_prompt >= r.seq_len:
        raise RecipeError(f"recipe field 'on_policy_prompt' ({r.on_policy_prompt}) must be shorter than 'seq_len' "
                          f"({r.seq_len}): the student writes the rest of each sequence")
    for part in r.train:
        check_choice("train", part, TRAINABLE)
    if "projections" not in r.train:
        raise RecipeError("recipe field 'train' must include 'projections' (the ternary weights are what heal trains)")
    if r.min_steps < 1:
        raise RecipeError(f"recipe field 'min_steps' must be at least 1, got {r.min_steps}")
    positive = ("tokens", "lr", "batch_tokens", "micro_batch_tokens", "seq_len", "checkpoint_every", "sample_tokens",
                "sample_temperature", "sample_batch")
    for name in positive:
        if getattr(r, name) <= 0:
            raise RecipeError(f"recipe field {name!r} must be positive, got {getattr(r, name)}")
    if r.seq_len < 2:
        raise RecipeError(f"recipe field 'seq_len' must be at least 2, got {r.seq_len}")
    if r.batch_tokens % r.seq_len or r.micro_batch_tokens % r.seq_len:
        raise RecipeError(f"recipe fields 'batch_tokens' ({r.batch_tokens}) and 'micro_batch_tokens' "
                          f"({r.micro_batch_tokens}) must be multiples of 'seq_len' ({r.seq_len}); e.g. "
                          f"--batch-tokens {max(1, r.batch_tokens // r.seq_len) * r.seq_len}")
    if r.tokens < r.seq_len:
        raise RecipeError(f"a token budget of {r.tokens:,} is smaller than one sequence of {r.seq_len} tokens; "
                          f"raise --tokens to at least {r.seq_len}")
    if r.sample_tokens < r.seq_len:
        raise RecipeError(f"recipe field 'sample_tokens' ({r.sample_tokens}) must hold at least one sequence "
                          f"of 'seq_len' ({r.seq_len}) tokens")
    if len(r.betas) != 2 or not all(isinstance(b, (float, int)) and 0 <= b < 1 for b in r.betas):
        raise RecipeError(f"recipe field 'betas' must be two numbers in [0, 1), got {list(r.betas)}")
    if not 0 <= r.min_lr_ratio <= 1 or not 0 <= r.data_share <= 1 or not 0 <= r.block_stage < 1:
        raise RecipeError("recipe fields 'min_lr_ratio' and 'data_share' must be between 0 and 1, and "
                          "'block_stage' at least 0 and below 1")
    if r.time_budget is not None and r.time_budget <= 0:
        raise RecipeError(f"recipe field 'time_budget' must be a positive number of seconds, got {r.time_budget}")
    if r.warmup_steps < 0 or r.weight_decay < 0 or r.grad_clip < 0:
        raise RecipeError("recipe fields 'warmup_steps', 'weight_decay' and 'grad_clip' must be 0 or more")


def load_heal_recipe(spec: str | Path | None = None) -> HealRecipe:
    """The bundled ``heal`` recipe, another bundled heal recipe by name, or a YAML file."""
    data, origin = read_yaml(DEFAULT_HEAL_RECIPE if spec is None else spec, kind="heal")
    return build(HealRecipe, _FIELDS, data, origin)
