"""heal's resume checkpoints, written with ``torch.distributed.checkpoint`` (DCP).

The ``checkpoint`` folder in heal's state folder holds the trainable parameters and the
optimizer state under their module names (``student.model.layers.0...``), whatever the
wrapping (none, DDP or FSDP2), so that a run stopped on N processes resumes on any other
number; ``progress.json`` beside them holds the step and the loss curve, and
``extra.safetensors`` what else a resumed run needs to repeat the uninterrupted one (the
on-policy sequences in use). Every process
writes its part into ``checkpoint.next``; the main process then swaps the folders, so a
crash mid-write keeps the previous checkpoint. In one process DCP needs no process group.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

from bitquant.training.distributed import World

CHECKPOINT = "checkpoint"
PROGRESS = "progress.json"
EXTRA = "extra.safetensors"


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optim": osd}


def save(path: Path, model, optimizer, step: int, curve: list[dict], world: World, extra: dict | None = None) -> None:
    """Replace the checkpoint at ``path`` (every process writes its part; then the main one
    swaps the folders, so a crash mid-write keeps the previous checkpoint). ``extra``: named
    CPU tensors kept beside it (the main process's)."""
    import torch.distributed.checkpoint as dcp

    fresh = path.with_name(path.name + ".next")
    if world.main and fresh.exists():
        shutil.rmtree(fresh)
    world.barrier()
    with _single_process_ok():
        dcp.save(_state(model, optimizer), checkpoint_id=str(fresh))
    world.barrier()
    if world.main:
        if extra:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in extra.items()}, fresh / EXTRA)
        (fresh / PROGRESS).write_text(json.dumps({"step": step, "curve": curve}), encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        fresh.rename(path)
    world.barrier()


@contextmanager
def _single_process_ok():
    """torch.distributed.checkpoint warns that it assumes one process when no process
    group exists: that is right here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def saved_step(path: Path) -> int:
    """The step a checkpoint folder was written at."""
    return int(json.loads((path / PROGRESS).read_text(encoding="utf-8"))["step"])


def load(path: Path, model, optimizer) -> tuple[int, list[dict], dict]:
    """The step, the loss curve and the extra tensors of the checkpoint at ``path``, its
    weights and optimizer state loaded into ``model`` and ``optimizer`` (step 0 and nothing
    loaded when it holds another set of trainable parameters)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(model, optimizer)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if {k.removeprefix("model.") for k in saved if k.startswith("model.")} != set(state["model"]):
        return 0, [], {}  # another set of trainable parameters: start over
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    progress = json.loads((path / PROGRESS).read_text(encoding="utf-8"))
    extra = {}
    if (path / EXTRA).is_file():
        from safetensors.torch import load_file

        extra = load_file(path / EXTRA)
    return int(progress["step"]), list(progress["curve"]), extra
