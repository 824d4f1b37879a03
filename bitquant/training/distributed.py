"""heal on several processes: the launcher's world, data parallelism or sharding, and the
collectives the loop needs. One process (no launcher) needs none of it.

``torchrun --nproc-per-node N`` and ``accelerate launch`` both start N copies of the
command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
set; :func:`setup` joins them into one process group (NCCL on GPUs, gloo on CPUs) and
gives each process its GPU. The student is then wrapped by torch's own
``DistributedDataParallel`` (a full copy per GPU; gradients averaged) or FSDP2's
``fully_shard`` (each decoder block's parameters, gradients and optimizer state split over
the GPUs), chosen by :func:`choose_parallel` from the memory that training needs.
Checkpoints are written with ``torch.distributed.checkpoint`` by :mod:`bitquant.training.loop`,
so a run resumes on another number of processes.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bitquant.errors import UsageError

PARALLEL_CHOICES = ("auto", "ddp", "fsdp")

#: Bytes per parameter that training holds on one GPU without sharding: fp32 latent
#: weights (4), their gradients (4) and AdamW's two moments (8), plus the bf16 teacher (2).
TRAIN_BYTES_PER_PARAM = 18
#: Share of a GPU's memory that parameters and optimizer state may take before sharding
#: is chosen (the rest: activations, the loss's chunks, the CUDA context).
FIT_SHARE = 0.7


@dataclass(frozen=True)
class World:
    """This process's place among the launched processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over all processes (``value`` itself in one process)."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.size

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over all processes, in place (as it is in one process)."""
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def to_dict(self) -> dict:
        return {"world_size": self.size}


def world_from_env() -> World:
    """The world that a launcher (torchrun, accelerate) describes in the environment."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(world: World, device: str, timeout_minutes: int = 30) -> str:
    """Join the launched processes (once) and return this process's device: ``cuda:LOCAL_RANK``
    on GPUs, ``cpu`` otherwise."""
    if not world.distributed:
        return device
    if device == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(f"process {world.rank} is local rank {world.local_rank}, but torch sees "
                             f"{torch.cuda.device_count()} GPUs; launch at most that many processes per node")
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return f"cuda:{world.local_rank}" if device == "cuda" else "cpu"


def choose_parallel(choice: str, params: int, device: str, world: World) -> str | None:
    """``None`` in one process; else ``ddp`` or ``fsdp``: ``auto`` shards (FSDP2) when
    training would not fit one GPU (``TRAIN_BYTES_PER_PARAM`` per parameter above
    ``FIT_SHARE`` of its memory), and keeps a full copy per GPU (DDP) otherwise."""
    if choice not in PARALLEL_CHOICES:
        raise UsageError(f"--parallel is {choice!r}; choose one of {', '.join(PARALLEL_CHOICES)}")
    if not world.distributed:
        return None
    if choice != "auto":
        return choice
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return "fsdp" if params * TRAIN_BYTES_PER_PARAM > FIT_SHARE * total else "ddp"
    return "ddp"


#: Bytes per parameter of the one-GPU low-memory road: bf16 latent weights (2) and
#: gradients (2), 8-bit AdamW moments (2, plus a scale per 256), the bf16 teacher (2).
LOW_MEMORY_BYTES_PER_PARAM = 8


def choose_low_memory(choice: bool | None, params: int, device: str, world: World) -> bool:
    """Whether to train on the low-memory road (bf16 latent weights, torchao's 8-bit AdamW):
    as asked, or by default in one process on a GPU that the plain road would not fit."""
    if choice is not None:
        wanted = choice
    else:
        wanted = (not world.distributed and device.startswith("cuda") and params * TRAIN_BYTES_PER_PARAM
                  > FIT_SHARE * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    if wanted:
        try:
            import torchao.optim  # noqa: F401  (only whether it is installed)
        except ImportError:
            raise UsageError(
                f"training this model ({params / 1e9:.1f}B parameters) needs about {params * TRAIN_BYTES_PER_PARAM / 1e9:.0f} GB "
                "with fp32 weights; the one-GPU low-memory road (bf16 weights, 8-bit AdamW) needs torchao: "
                "pip install 'bitquant-llm[low-memory]', or launch on several GPUs with torchrun (FSDP2)") from None
    return wanted


def wrap(module: torch.nn.Module, blocks: list[torch.nn.Module], parallel: str | None, device: str,
         unused_ok: bool = False) -> torch.nn.Module:
    """``module`` wrapped for ``parallel``: DDP, or FSDP2 with every block in ``blocks``
    sharded on its own (so one block is gathered at a time) and the rest at the root.
    ``unused_ok``: some steps leave trainable parameters unused (heal's block-wise stage
    trains no final norm or head), which DDP must be told."""
    if parallel is None:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=unused_ok)
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(module)
    return module


def no_sync(model: torch.nn.Module, last: bool):
    """A context in which backward accumulates gradients without averaging them over the
    processes, except for the last micro-batch of a step."""
    if hasattr(model, "no_sync"):  # DDP
        return nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return nullcontext()


def rows_of(world: World, rows: int, what: str = "sequences per batch") -> slice:
    """This process's share of a global batch of ``rows`` sequences (equal shares, so the
    mean of the processes' mean losses is the mean over the whole batch)."""
    if rows % world.size:
        raise UsageError(f"{rows} {what} cannot be split evenly over {world.size} processes; "
                         f"choose --batch-tokens so that batch_tokens / seq_len is a multiple of {world.size}")
    share = rows // world.size
    return slice(world.rank * share, (world.rank + 1) * share)
