"""The resume journal: which output shards of an interrupted conversion are finished.

It lives in the staging folder beside the output. After each shard is written and
flushed, its name, size, sha256 and the stats of the matrices it holds are recorded
(written atomically). A later run with the same fingerprint re-checks every recorded
shard against its sha256 and reuses the ones that match; anything else is redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bitquant.fingerprint import file_sha256

JOURNAL = "bitquant-progress.json"


class Journal:
    def __init__(self, folder: Path, fingerprint: str, shards: dict[str, dict] | None = None):
        self.path = folder / JOURNAL
        self.fingerprint = fingerprint
        self.shards: dict[str, dict] = shards or {}

    @classmethod
    def load(cls, folder: Path, fingerprint: str) -> "Journal":
        """The finished shards of a previous run with this fingerprint, verified by hash."""
        path = folder / JOURNAL
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls(folder, fingerprint)
        if data.get("fingerprint") != fingerprint:
            return cls(folder, fingerprint)
        good = {}
        for name, info in data.get("shards", {}).items():
            f = folder / name
            if f.is_file() and f.stat().st_size == info.get("bytes") and file_sha256(f) == info.get("sha256"):
                good[name] = info
        return cls(folder, fingerprint, good)

    def record(self, filename: str, nbytes: int, sha256: str, layers: list[dict]) -> None:
        self.shards[filename] = {"bytes": nbytes, "sha256": sha256, "layers": layers}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards": self.shards}), encoding="utf-8")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
