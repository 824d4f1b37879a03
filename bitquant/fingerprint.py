"""What identifies a conversion's inputs, for the up-to-date check and for resuming.

Two conversions with the same fingerprint produce the same model files. It covers the
bitquant version, the resolved recipe, the evaluation text and settings, and the source:
its Hub commit sha when it came from the Hub, otherwise the name, size and modification
time of every file that is read, plus the content of ``config.json`` and the index.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bitquant.source import CARRIED_FILES, Checkpoint, ModelSource


def source_fingerprint(source: ModelSource, ckpt: Checkpoint) -> str:
    h = hashlib.sha256()
    if source.kind == "hub" and source.commit_sha:
        h.update(f"hub:{source.spec}@{source.commit_sha}".encode())
        return h.hexdigest()
    for name in ("config.json", "model.safetensors.index.json"):
        p = ckpt.path / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    files = list(ckpt.files) + [ckpt.path / n for n in CARRIED_FILES if (ckpt.path / n).is_file()]
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def conversion_fingerprint(version: str, recipe_sha256: str, source_fp: str, eval_key: dict | None) -> str:
    """One sha256 over everything that decides the output."""
    payload = {"bitquant": version, "recipe": recipe_sha256, "source": source_fp, "eval": eval_key}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
