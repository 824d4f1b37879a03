"""Atomic output folders: write beside the target, rename at the end.

``staged_output(out)`` yields a fresh hidden folder next to ``out`` (same filesystem, so
the final rename is atomic). If the body raises (an error, Ctrl-C, a SIGTERM turned into
an exception by the CLI) the staging folder is removed and ``out`` is untouched. An
existing ``out`` is refused unless ``overwrite``; then it is replaced only after the new
output is complete, by renaming it aside first, so a failure never loses it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bitquant.errors import OutputError

STAGING_PREFIX = ".bitquant-tmp-"


def check_target(out: Path, overwrite: bool) -> None:
    """Raise :class:`OutputError` if ``out`` cannot be (re)placed."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(f"output folder {out} already exists; pass --overwrite to replace it, or choose another -o")
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a folder; remove it or choose another -o")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: its parent folder {parent} does not exist")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    out = Path(out).absolute()
    check_target(out, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out.name}-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write into {out.parent}: {e.strerror}; choose another -o") from None
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the output should look like any new folder
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
