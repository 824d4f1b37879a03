"""Atomic output folders: write beside the target, rename at the end.

``staged_output(out, key)`` yields a hidden folder next to ``out`` (same filesystem, so the
final rename is atomic). ``out`` is untouched until the body has succeeded. An existing
``out`` is refused unless ``overwrite``; then it is replaced only after the new output is
complete, by renaming it aside first, so a failure never loses it.

The staging folder is named after ``key`` (the conversion fingerprint), so an
interrupted run can be resumed: on Ctrl-C or SIGTERM (``KeyboardInterrupt``) the folder is
kept, and after SIGKILL it is simply still there. On any other error it is removed, unless
``keep_on_error`` says it holds something worth resuming from.
Staging folders of the same output with another key are stale and are removed.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from bitquant.errors import OutputError, WriteFailure

STAGING_PREFIX = ".bitquant-tmp-"


def check_target(out: Path, overwrite: bool) -> None:
    """Raise :class:`OutputError` if ``out`` cannot be (re)placed."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a folder; remove it or choose another -o")
        if not overwrite:
            raise OutputError(f"output folder {out} already exists; pass --overwrite to replace it, or choose another -o")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: its parent folder {parent} does not exist")


def staging_path(out: Path, key: str) -> Path:
    """Where :func:`staged_output` stages ``out`` for ``key`` (other processes of a
    launched run work in the folder that the main process created)."""
    return out.parent / f"{STAGING_PREFIX}{out.name}-{key[:16]}"


def _make_staging(out: Path, key: str) -> Path:
    tmp = staging_path(out, key)
    for stale in out.parent.glob(f"{STAGING_PREFIX}{out.name}-*"):
        if stale != tmp and stale.is_dir() and len(stale.name) == len(tmp.name):
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    return tmp


_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


@contextmanager
def staged_output(out: Path, key: str, overwrite: bool = False,
                  keep_on_error: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A staging folder for ``out``, renamed to ``out`` when the body succeeds.

    ``keep_on_error(folder)`` returning True keeps the folder on any error too (heal keeps
    its training checkpoints that way, so a crash or a diverged run can be resumed)."""
    out = Path(out).absolute()
    check_target(out, overwrite)
    try:
        tmp = _make_staging(out, key)
    except OSError as e:
        raise OutputError(f"cannot write into {out.parent}: {e.strerror}; choose another -o") from None
    try:
        yield tmp
        check_target(out, overwrite)  # something may have appeared meanwhile
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-{out.name}-", dir=out.parent))
            out.rename(aside / out.name)
            tmp.rename(out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            tmp.rename(out)
    except KeyboardInterrupt:  # keep the finished shards for a re-run to resume
        raise
    except OSError as e:
        if not (keep_on_error and keep_on_error(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _WRITE_ERRNOS:
            raise WriteFailure(
                f"writing the output beside {out} failed: {e.strerror}; free some space or choose another -o"
            ) from e
        raise
    except BaseException:
        if not (keep_on_error and keep_on_error(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
