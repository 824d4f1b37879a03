"""On-policy steps: a share of every batch is written by the student itself.

A student trained only on sequences its teacher wrote never sees the contexts its own
mistakes lead to: once its greedy text repeats a word, it is somewhere no training
sequence has been, and it loops. On-policy distillation (GKD, arXiv 2306.13649; MiniLLM,
arXiv 2306.08543) trains on sequences the student samples, with the teacher's
distributions over every one of the student's tokens as the target.

Here, every ``every`` optimizer steps the student continues ``prompt``-token prefixes of
the training data (teacher samples or text) to the full sequence length, at
``temperature`` (0: greedy), in the exported W1.58A8 arithmetic: a copy of the student's
current weights as the exporter would write them (:func:`bitquant.training.student.quantized_weight`,
the exporter's quantizer) run by bitquant's own runtime (:class:`bitquant.runtime.TernaryLinear`:
on CUDA the packed W2A8 kernels, as ``bitquant generate`` runs OUT), decoded by
:class:`bitquant.decode.StaticDecoder` (a static cache; on CUDA each step one CUDA graph
replay). The copy and the graph are built once and updated in place. The sequences of a
rollout serve the next ``every`` steps, each trained on ``reuse`` times (DistiLLM's replay,
arXiv 2402.03898, which keeps on-policy training affordable). The loss is taken only on
the student's tokens (the positions after the prompt); the teacher scores all of them.

Unlikelihood (``unlikelihood`` α > 0; Welleck et al., arXiv 1908.04319, sequence level):
where the student's own text repeats itself (a token that ends an ``ngram``-gram already
written earlier in the sequence, :func:`bitquant.training.loss.repeated`), the position
that wrote it also gets α · −log(1 − q(token)). The teacher's targets alone do not remove a
loop: on text that already repeats, the FP model too predicts the repeat. Every rollout's
share of such tokens is kept for the report, with or without the term: how much the student
repeats itself as it trains.

``start`` (a share of the steps) trains the first steps on data alone: their on-policy rows
are whole data sequences instead, scored everywhere, and the first rollout is written at
the first multiple of ``every`` from there. A student fresh from absmean writes noise, and
the on-policy methods start from a trained student (GKD and MiniLLM from a fine-tuned one).

Determinism: rollout ``w`` (for steps ``w * every`` ... ) draws its prompts and its
tokens from seeds that depend on ``w`` and the recipe's seed alone, from the weights at
step ``w * every``; the data rows before ``start`` are drawn from seeds of their step; a
checkpoint taken inside a window keeps that window's sequences, so a resumed run trains on
exactly the sequences the uninterrupted one did.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from bitquant import decode, runtime
from bitquant.errors import UsageError
from bitquant.training.loss import repeated
from bitquant.training.student import FakeTernaryLinear, quantized_weight

#: Seed offsets, so that prompts and draws never share a stream with the teacher's samples.
PROMPT_SEED, DRAW_SEED, DATA_SEED = 104_729, 1_299_709, 15_485_863


@dataclass(frozen=True)
class OnPolicy:
    """What the recipe says of on-policy steps."""

    share: float  # of each batch's sequences
    temperature: float
    prompt: int  # tokens of a data sequence given as the prompt
    every: int  # optimizer steps between rollouts
    reuse: int  # times each written sequence is trained on
    start: float = 0.0  # share of the steps trained on data alone before the first rollout
    unlikelihood: float = 0.0  # weight of the unlikelihood term on tokens that repeat an n-gram
    ngram: int = 4  # the n of those n-grams

    def rows(self, batch_sequences: int) -> int:
        """Sequences of each batch written by the student."""
        return round(batch_sequences * self.share)

    def size(self, batch_sequences: int) -> int:
        """Sequences written per rollout."""
        return max(1, math.ceil(self.rows(batch_sequences) * self.every / self.reuse))

    def first_step(self, steps: int) -> int:
        """The first step that trains on the student's own text: ``start`` of ``steps``,
        rounded up to a rollout boundary (a multiple of ``every``)."""
        return math.ceil(round(self.start * steps) / self.every) * self.every


class Snapshot:
    """The student as exported: its projections as :class:`~bitquant.runtime.TernaryLinear`
    layers of the codes and ``weight_scale`` the exporter would write for its current latent
    weights, every other weight copied, in ``dtype`` on ``device``. :meth:`update` refreshes
    it in place."""

    def __init__(self, student: torch.nn.Module, eps: float, scale_dtype: torch.dtype, dtype: torch.dtype, device):
        config = student.config.__class__.from_dict(student.config.to_dict())
        self.eps, self.scale_dtype, self.dtype = eps, scale_dtype, dtype
        self.model = runtime.empty_model(config, dtype)
        packed = runtime.packed_kernel(device, True)
        self.names = [n for n, m in student.named_modules() if isinstance(m, FakeTernaryLinear)]
        for name in self.names:
            m = student.get_submodule(name)
            codes, weight_scale = quantized_weight(m.weight, eps, scale_dtype)
            runtime.install(self.model, name + ".weight", codes.cpu(), weight_scale.cpu(), False, dtype, True, packed)
        self.model.to(device).eval()
        if getattr(config, "tie_word_embeddings", False):
            self.model.tie_weights()
        self.update(student)

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        """Copy the student's current weights in (same buffers: a captured graph stays valid)."""
        mine = dict(self.model.named_parameters())
        for name, p in student.named_parameters():
            module = name.rpartition(".")[0]
            if module in self.names:
                continue
            if name in mine:
                mine[name].copy_(p.detach().to(self.dtype))
        for name in self.names:
            m = student.get_submodule(name)
            codes, weight_scale = quantized_weight(m.weight, self.eps, self.scale_dtype)
            layer = self.model.get_submodule(name)
            layer.set_codes(codes.to(layer.weight_scale.device), weight_scale.to(layer.weight_scale.dtype))
            if m.bias is not None:
                layer.bias.copy_(m.bias.detach().to(layer.bias.dtype))


class Rollouts:
    """The on-policy rows of every batch: ``rows`` sequences per step, written by the
    student every ``settings.every`` steps from prompts drawn from ``pools`` (the training
    data: lists of [sequences, seq_len] token tensors)."""

    def __init__(self, student: torch.nn.Module, settings: OnPolicy, batch_sequences: int, seq_len: int,
                 pools: list[torch.Tensor], seed: int, banned: list[int], eps: float, scale_dtype: torch.dtype):
        if settings.prompt >= seq_len:
            raise UsageError(f"on-policy prompts of {settings.prompt} tokens leave nothing to write in sequences of "
                             f"{seq_len}; lower on_policy_prompt")
        if not pools or not any(len(p) for p in pools):
            raise UsageError("on-policy steps need training data to draw their prompts from")
        self.settings, self.seq_len, self.seed, self.banned = settings, seq_len, seed, banned
        self.rows = settings.rows(batch_sequences)
        self.size = settings.size(batch_sequences)
        self.pools = [p for p in pools if len(p)]
        self.student, self.eps, self.scale_dtype = student, eps, scale_dtype
        self.snapshot: Snapshot | None = None
        self.decoder: decode.StaticDecoder | None = None
        self.window: int | None = None
        self.ids: torch.Tensor | None = None
        self.seconds = 0.0  # writing (after the first build)
        self.build_seconds = 0.0
        self.rollouts = 0
        self.tokens = 0  # tokens written by the student
        self.first = 0  # the first on-policy step (set by begin_at once the step count is known)
        self.warm_seconds = 0.0  # a rollout written only to time the writer (see warm_up)
        self.repeats: torch.Tensor | None = None  # [size, seq_len] bool, for ids (loss.repeated)
        self.repeated_shares: list[dict] = []  # per rollout: the share of written tokens that repeat

    def begin_at(self, steps: int) -> None:
        """Fix the first on-policy step for a run of ``steps`` steps (``settings.start``)."""
        self.first = self.settings.first_step(steps)

    def never_message(self, steps: int) -> str:
        """What to tell the user when the run ends before its first on-policy step."""
        return (f"no on-policy step in this run: its {steps:,} steps end before the first rollout at step "
                f"{self.first:,} (on_policy_start {self.settings.start:g} of the steps, rounded up to a multiple of "
                f"on_policy_every {self.settings.every}); train longer, or lower --on-policy-start or on_policy_every")

    @property
    def start(self) -> int:
        """The first position whose output is scored: it predicts the student's first token."""
        return self.settings.prompt - 1

    def scored_from(self, step: int) -> int:
        """Where the scored positions of step ``step``'s rows start: 0 for the data rows
        before the first on-policy step, else :attr:`start`."""
        return 0 if step < self.first else self.start

    def _draw(self, n: int, seed: int) -> torch.Tensor:
        """``n`` data sequences drawn from all pools together, from ``seed``."""
        sizes = torch.tensor([len(p) for p in self.pools])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + seed)
        picks = torch.randint(int(sizes.sum()), (n,), generator=g)
        ends = sizes.cumsum(0)
        which = torch.searchsorted(ends, picks, right=True)
        offset = picks - (ends - sizes)[which]
        return torch.stack([self.pools[int(k)][int(i)] for k, i in zip(which, offset)])

    def prompts(self, window: int) -> torch.Tensor:
        """``size`` prompts for rollout ``window``: the first tokens of data sequences drawn
        (with a seed of their own) from all pools together."""
        return self._draw(self.size, PROMPT_SEED + window)[:, : self.settings.prompt]

    def _build(self) -> None:
        began = time.perf_counter()
        device = next(self.student.parameters()).device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.snapshot = Snapshot(self.student, self.eps, self.scale_dtype, dtype, device)
        self.decoder = decode.StaticDecoder(self.snapshot.model, self.size, self.seq_len)
        self.build_seconds += time.perf_counter() - began

    def warm_up(self, probe_steps: int) -> float:
        """Build the writer and write one rollout that is thrown away; return its seconds
        (a time budget's probe needs the cost of a rollout before the first one is due).
        Until :meth:`begin_at`, the first on-policy step is the first rollout boundary after
        the probe's ``probe_steps`` steps, so that the probe trains on data rows."""
        self.first = math.ceil(probe_steps / self.settings.every) * self.settings.every
        if self.decoder is None:
            self._build()
        saved = (self.window, self.ids, self.seconds, self.rollouts, self.tokens, self.repeats,
                 list(self.repeated_shares))
        self.roll(self.first // self.settings.every)
        took = self.seconds - saved[2]
        (self.window, self.ids, self.seconds, self.rollouts, self.tokens, self.repeats,
         self.repeated_shares) = saved
        self.warm_seconds += took
        return took

    @torch.no_grad()
    def roll(self, window: int) -> None:
        """Write rollout ``window`` with the student's current weights."""
        if self.decoder is None:
            self._build()
        else:
            self.snapshot.update(self.student)
        device = self.decoder.h.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        g = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + DRAW_SEED + window)
        ids = decode.sample_graph(self.decoder, self.seq_len, 0, self.settings.temperature, self.banned, g,
                                  prompts=self.prompts(window))
        self.ids = ids.cpu()
        self.seconds += time.perf_counter() - began
        self.window = window
        self.rollouts += 1
        self.tokens += self.size * (self.seq_len - self.settings.prompt)
        self._mark()
        written = self.repeats[:, self.settings.prompt :]
        self.repeated_shares.append({"step": window * self.settings.every,
                                     "share": round(float(written.float().mean()), 4)})

    def _mark(self) -> None:
        """Which of :attr:`ids`' written tokens repeat an n-gram of their own sequence."""
        self.repeats = repeated(self.ids, self.settings.ngram)
        self.repeats[:, : self.settings.prompt] = False

    def data_rows(self, step: int) -> torch.Tensor:
        """Before the first on-policy step, the on-policy rows are whole data sequences,
        drawn (with a seed of the step's own) from all pools together."""
        return self._draw(self.rows, DATA_SEED + step)

    def batch(self, step: int) -> torch.Tensor:
        """The on-policy rows of step ``step`` ([rows, seq_len], on the CPU)."""
        if step < self.first:
            return self.data_rows(step)
        index = self._rows_of(step)  # first: it may write the rollout that self.ids then holds
        return self.ids[index]

    def _rows_of(self, step: int) -> torch.Tensor:
        """Which sequences of the current rollout (written now if due) step ``step`` trains on."""
        window = step // self.settings.every
        if window != self.window:
            self.roll(window)
        first = (step % self.settings.every) * self.rows
        return torch.arange(first, first + self.rows) % self.size

    def negatives(self, step: int) -> torch.Tensor | None:
        """For step ``step``'s on-policy rows ([rows, seq_len], on the CPU): at each position,
        the token it wrote that repeats an n-gram (the unlikelihood term's target), else -1.
        None without the term, or before the first on-policy step."""
        if self.settings.unlikelihood <= 0 or step < self.first:
            return None
        index = self._rows_of(step)
        ids, marks = self.ids[index], self.repeats[index]
        out = torch.full_like(ids, -1)
        out[:, :-1] = torch.where(marks[:, 1:], ids[:, 1:], -1)
        return out

    def state(self, step: int) -> dict[str, torch.Tensor]:
        """What a checkpoint after ``step`` steps keeps: the window in use, when the next step
        still reads it, and the rollouts' repeated shares so far (for the report)."""
        out = {}
        if self.repeated_shares:
            out["on_policy_repeated"] = torch.tensor([[d["step"], d["share"]] for d in self.repeated_shares],
                                                     dtype=torch.float64)
        if self.window is None or step // self.settings.every != self.window or step % self.settings.every == 0:
            return out
        return {**out, "on_policy_ids": self.ids, "on_policy_window": torch.tensor([self.window])}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        if "on_policy_repeated" in saved:
            self.repeated_shares = [{"step": int(a), "share": round(float(b), 4)}
                                    for a, b in saved["on_policy_repeated"].tolist()]
        if "on_policy_ids" in saved:
            self.ids = saved["on_policy_ids"].to(torch.int64)
            self.window = int(saved["on_policy_window"][0])
            self._mark()

    def report(self) -> dict:
        s = self.settings
        return {"share": s.share, "rows_per_step": self.rows, "temperature": s.temperature, "prompt_tokens": s.prompt,
                "every": s.every, "reuse": s.reuse, "start": s.start, "first_step": self.first,
                "unlikelihood": s.unlikelihood, "unlikelihood_n": s.ngram, "repeated_shares": self.repeated_shares,
                "sequences_per_rollout": self.size, "rollouts": self.rollouts,
                "tokens_written": self.tokens, "seconds": round(self.seconds, 3),
                "build_seconds": round(self.build_seconds + self.warm_seconds, 3),
                "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds > 0 else 0.0}
