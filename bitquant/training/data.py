"""Training data for heal: text sampled from the teacher, and the user's own text, as
fixed-length token sequences, served in a deterministic order.

Sampling starts every sequence at BOS and draws each next token from the teacher's
distribution at the recipe's temperature (``sample_top_p``: from the smallest set of tokens
whose probability reaches it) with EOS masked, so every sequence has the full length.
``sample_greedy_tokens`` > 0 starts as LLM-QAT does (arXiv 2305.17888): one token drawn
uniformly from the vocabulary after BOS, then that many greedy tokens, then sampling.
``sample_min_distinct`` drops sequences whose share of distinct 4-grams is below it
(repetition in the training text becomes repetition in the student's, arXiv 2310.10226).
It runs :mod:`bitquant.decode`'s loop: a static KV cache over the model's own blocks, many
sequences at a time; on CUDA each full batch goes through one
:class:`bitquant.decode.StaticDecoder` (a token step is one CUDA graph replay). On an H100,
2,048 sequences of SmolLM2: its first batch 10.1 s against the eager loop's 30.4 s (whose
first batch warms up a kernel per length), then 103k against 114k tokens/s
(``bench/heal_speed.py --samplers decode:2048,graph:2048``), so for fewer than about 20
batches it is the faster of the two. Samples are cached in bitquant's cache
(``$BITQUANT_CACHE/heal-data``), keyed by the model's fingerprint and every sampling setting, so a re-run or a resume
never samples again. Token ids are stored as uint16 where the vocabulary fits (half the
bytes). The user's own text is read by :mod:`bitquant.training.texts`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bitquant import decode
from bitquant.training.distributed import World

#: Called while sampling: (tokens sampled, tokens to sample).
SampleProgress = Callable[[int, int], None]

CACHE_FORMAT = 3  # 3: through a StaticDecoder on CUDA; 2: bitquant.decode's eager loop; 1: transformers' generate
#: With a time budget, sampling stops once it has used this share of the budget.
SAMPLE_SHARE = 0.25


@dataclass(frozen=True)
class SampleSettings:
    tokens: int
    seq_len: int
    temperature: float
    seed: int
    batch: int  # sequences sampled at once
    seconds: float | None = None  # stop after the batch that passes this much sampling time (one process only)
    top_p: float = 1.0
    greedy: int = 0  # > 0: a uniformly drawn token after BOS, then this many greedy tokens (LLM-QAT)
    min_distinct: float = 0.0  # drop sequences whose share of distinct 4-grams is below this

    @property
    def sequences(self) -> int:
        return max(1, self.tokens // self.seq_len)

    def key(self, model_fingerprint: str, device_type: str) -> str:
        """Cache key: the model, every setting that changes the samples, and the device
        type (CUDA and CPU draw different random streams)."""
        payload = {"format": CACHE_FORMAT, "model": model_fingerprint, "tokens": self.sequences * self.seq_len,
                   "seq_len": self.seq_len, "temperature": self.temperature, "seed": self.seed, "batch": self.batch,
                   "device": device_type, **({"seconds": self.seconds} if self.seconds is not None else {}),
                   **({"top_p": self.top_p} if self.top_p != 1 else {}), **({"greedy": self.greedy} if self.greedy else {}),
                   **({"min_distinct": self.min_distinct} if self.min_distinct else {})}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@torch.inference_mode()
def sample(model, settings: SampleSettings, bos_id: int, eos_ids: list[int], progress: SampleProgress | None = None,
           part: tuple[int, int] = (0, 1), static: bool | None = None) -> torch.Tensor:
    """``settings.sequences`` sequences of ``settings.seq_len`` token ids (int64, on CPU),
    each starting with ``bos_id``; batch ``i`` is drawn from seed ``settings.seed + i``
    by :mod:`bitquant.decode`'s loop (a static KV cache over the model's own blocks).
    ``part`` = (k, n) draws only the batches i with i % n == k (the other rows stay 0), so
    that n processes together draw exactly what one would. ``settings.seconds`` (one
    process): stop after the batch that passes this much time, keeping whole batches.
    ``static``: full batches through a :class:`bitquant.decode.StaticDecoder` (default: on
    CUDA, where its step is a CUDA graph; elsewhere it runs eagerly: how the tests check it)."""
    device = next(model.parameters()).device
    n, length = settings.sequences, settings.seq_len
    out = torch.zeros(n, length, dtype=torch.int64)
    stop_at = time.monotonic() + settings.seconds if settings.seconds is not None and part[1] == 1 else None
    decoder = None
    for i, begin in enumerate(range(0, n, settings.batch)):
        if i % part[1] != part[0]:
            continue
        rows = min(settings.batch, n - begin)
        generator = torch.Generator(device=device).manual_seed(settings.seed + i)
        prompts = _random_starts(rows, bos_id, eos_ids, model.config.vocab_size, settings.seed + i) if settings.greedy else None
        if rows == settings.batch and (static if static is not None else device.type == "cuda"):
            decoder = decoder or decode.StaticDecoder(model, rows, length)
            ids = decode.sample_graph(decoder, length, bos_id, settings.temperature, eos_ids, generator, prompts=prompts,
                                      top_p=settings.top_p, greedy=settings.greedy)
        else:  # the CPU, and a last batch shorter than the rest
            ids = decode.sample_batch(model, rows, length, bos_id, settings.temperature, eos_ids, generator,
                                      prompts=prompts, top_p=settings.top_p, greedy=settings.greedy)
        out[begin : begin + rows] = ids.cpu()
        if progress:
            progress((begin + rows) * length, n * length)
        if stop_at is not None and time.monotonic() > stop_at and begin + rows < n:
            return out[: begin + rows]
    return out


def _random_starts(rows: int, bos_id: int, banned: list[int], vocab: int, seed: int) -> torch.Tensor:
    """[rows, 2] prompts: BOS, then a token drawn uniformly from the vocabulary (not BOS or a banned one)."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[bos_id, *banned]] = False
    pool = allowed.nonzero().squeeze(1)
    picks = pool[torch.randint(len(pool), (rows,), generator=g)]
    return torch.stack([torch.full((rows,), bos_id, dtype=torch.int64), picks], dim=1)


def row_distinct(ids: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Each row's share of distinct n-grams among its n-grams (float32 [rows]; 1 when nothing
    repeats). n-grams are hashed to int64 (a collision merely counts two n-grams as one)."""
    rows, length = ids.shape
    if length < n:
        return torch.ones(rows)
    h = torch.zeros(rows, length - n + 1, dtype=torch.int64)
    for k in range(n):
        h = h * 1_000_003 + ids[:, k : length - n + 1 + k].to(torch.int64)
    s = h.sort(dim=1).values
    return ((s[:, 1:] != s[:, :-1]).sum(1) + 1).float() / s.shape[1]


def cached_samples(model, settings: SampleSettings, key: str, cache_dir: Path, bos_id: int, eos_ids: list[int],
                   vocab_size: int, progress: SampleProgress | None = None, world: World = World()) -> tuple[torch.Tensor, dict]:
    """Samples from the cache, or drawn now and cached. Returns the ids and a description:
    ``tokens``, ``sequences``, ``seq_len``, ``temperature``, ``seed``, ``seconds`` and
    ``tokens_per_second`` of the sampling run, ``cached`` (found in the cache), ``path``.
    Under a launcher (``world``), every process draws its share of the batches (their
    seeds do not depend on the number of processes), all of them get every sample, and the
    main process writes the cache."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / f"{key}.safetensors"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        try:
            ids = load_file(path)["ids"].to(torch.int64)
            info = json.loads(meta_path.read_text(encoding="utf-8"))
            return ids, {**info, "cached": True, "path": str(path)}
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is sampled again
    started = time.perf_counter()
    ids = sample(model, settings, bos_id, eos_ids, progress, part=(world.rank, world.size))
    if world.distributed:
        device = next(model.parameters()).device
        ids = world.sum(ids.to(device)).cpu()
    seconds = time.perf_counter() - started
    drawn = ids.numel()
    distinct = row_distinct(ids)
    kept = distinct >= settings.min_distinct
    if settings.min_distinct and kept.any():
        ids = ids[kept]
    info = {"tokens": ids.numel(), "sequences": ids.shape[0], "seq_len": ids.shape[1], "temperature": settings.temperature,
            "top_p": settings.top_p, "greedy_tokens": settings.greedy, "min_distinct": settings.min_distinct,
            "dropped_sequences": int((~kept).sum()) if settings.min_distinct else 0,
            "distinct_4grams": round(float(distinct.mean()), 4),
            "seed": settings.seed, "seconds": round(seconds, 3), "tokens_per_second": round(drawn / seconds, 1),
            "sha256": tensor_sha256(ids)}
    if not world.main:
        world.barrier()  # the main process writes the cache
        return ids, {**info, "cached": False, "path": str(path)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    stored = ids.to(torch.uint16) if vocab_size <= 65536 else ids.to(torch.int32)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"ids": stored.contiguous()}, tmp)
    meta_path.write_text(json.dumps(info), encoding="utf-8")
    os.replace(tmp, path)
    world.barrier()
    return ids, {**info, "cached": False, "path": str(path)}


def tensor_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()


class Batches:
    """Deterministic batches from pools of sequences: batch ``step`` takes ``per_batch[i]``
    sequences from pool ``i``, walking each pool in a fresh random order per pass (seeded),
    so any step's batch can be rebuilt after a resume without replaying the ones before."""

    def __init__(self, pools: list[torch.Tensor], per_batch: list[int], seed: int):
        if any(k > 0 and len(p) == 0 for p, k in zip(pools, per_batch)):
            raise ValueError("a data pool with a share of the batch is empty")
        self.pools = [p for p, k in zip(pools, per_batch) if k > 0]
        self.per_batch = [k for k in per_batch if k > 0]
        self.seed = seed
        self._orders: dict[tuple[int, int], torch.Tensor] = {}

    def _order(self, pool: int, epoch: int) -> torch.Tensor:
        key = (pool, epoch)
        if key not in self._orders:
            if len(self._orders) > 8:
                self._orders.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + pool * 7919 + epoch)
            self._orders[key] = torch.randperm(len(self.pools[pool]), generator=g)
        return self._orders[key]

    def picks(self, step: int) -> list[tuple[int, int]]:
        """Batch ``step``'s sequences as (pool, row in that pool), in the batch's order."""
        out = []
        for i, (pool, k) in enumerate(zip(self.pools, self.per_batch)):
            n = len(pool)
            out += [(i, int(self._order(i, j // n)[j % n])) for j in range(step * k, (step + 1) * k)]
        return out

    def batch(self, step: int) -> torch.Tensor:
        return torch.stack([self.pools[i][row] for i, row in self.picks(step)])

    def passes(self, steps: int) -> list[float]:
        """How many times each pool is read in ``steps`` steps."""
        return [steps * k / len(p) for p, k in zip(self.pools, self.per_batch)]


def samples_needed(recipe, per_batch: int, timed: bool = False) -> int:
    """Teacher tokens to sample: what the run reads (``per_batch`` sampled sequences a step),
    at most the recipe's ``sample_tokens``; with a time budget the step count is not known
    before sampling, so the recipe's count (and sampling stops at ``SAMPLE_SHARE`` of the
    budget)."""
    if timed:
        return recipe.sample_tokens
    return max(recipe.seq_len, min(recipe.sample_tokens, recipe.steps * per_batch * recipe.seq_len))


def split_batch(sequences: int, share: float) -> tuple[int, int]:
    """(sequences from user text, sequences from teacher samples) of one batch."""
    text = round(sequences * share)
    return text, sequences - text
