"""Streaming safetensors I/O: memory-mapped reads and tensor-by-tensor writes.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping
each tensor name to ``{dtype, shape, data_offsets}``, then the raw bytes. Because the
header comes first, a writer that knows every output tensor's dtype and shape in advance
can write the header, then stream each tensor's bytes as soon as it is computed, holding
only one tensor in memory. The files are readable by the ``safetensors`` library and by
transformers; the header keys are written in the order given, so the bytes are
deterministic.

The reader maps the file (copy-on-write, never written) and returns zero-copy tensor
views that keep the mapping alive, after validating the header against the file size so that truncated or corrupted
files are reported clearly instead of crashing later.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

from bitquant.errors import SourceError, WriteFailure

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100_000_000
_ALIGN = 8


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives (reader side) or will live (writer side)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class SafetensorsReader:
    """Read-only, memory-mapped view of one ``.safetensors`` file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise SourceError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self.header, self.metadata, self._data_start = self._read_header()
            size = os.fstat(self._file.fileno()).st_size
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        except BaseException:
            self._file.close()
            raise

    def _corrupt(self, why: str) -> SourceError:
        return SourceError(
            f"{self.path} is not a valid safetensors file ({why}); the download or export was "
            "probably truncated or corrupted: fetch it again"
        )

    def _read_header(self) -> tuple[dict[str, dict], dict[str, str], int]:
        size = os.fstat(self._file.fileno()).st_size
        raw = self._file.read(8)
        if len(raw) < 8:
            raise self._corrupt("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise self._corrupt("header length points past the end of the file")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._corrupt("header is not JSON") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        data_len = size - data_start
        for name, info in header.items():
            try:
                start, end = info["data_offsets"]
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"entry {name!r} is malformed or has an unknown dtype") from None
            if not 0 <= start <= end <= data_len:
                raise self._corrupt(f"tensor {name!r} extends past the end of the file")
            if TensorSpec(name, dtype, shape).nbytes != end - start:
                raise self._corrupt(f"tensor {name!r} has a size that does not match its shape")
        return header, metadata, data_start

    def names(self) -> list[str]:
        """Tensor names in the order their bytes appear in the file (sequential reads)."""
        return sorted(self.header, key=lambda k: self.header[k]["data_offsets"][0])

    def spec(self, name: str) -> TensorSpec:
        info = self.header[name]
        return TensorSpec(name, DTYPES[info["dtype"]], tuple(info["shape"]))

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy tensor view of ``name`` backed by the memory map."""
        spec = self.spec(name)
        start, end = self.header[name]["data_offsets"]
        if end == start:
            return torch.empty(spec.shape, dtype=spec.dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - start, offset=self._data_start + start)
        return flat.view(spec.dtype).view(spec.shape)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop ``name``'s pages (bytes ``begin:end`` of it, all by default) from this
        process's memory (they stay in the page cache).

        Touched pages of a file mapping count towards the process's resident memory
        until unmapped; streaming a model through one mapping would otherwise end with
        the whole shard resident. Pages are re-read from the file if touched again."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, stop = self.header[name]["data_offsets"]
        end = stop - start if end is None else min(end, stop - start)
        first = (self._data_start + start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        last = self._data_start + start + end
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Close the file. The mapping is not unmapped here: tensors returned by ``get``
        keep it alive and it is released with the last of them (unmapping under a live
        view would crash)."""
        self._map = None
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The serialized header (length prefix included) for tensors laid out in order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % _ALIGN)
    return struct.pack("<Q", len(body)) + body


class SafetensorsStreamWriter:
    """Write a safetensors file whose tensors are known up front, one tensor at a time.

    ``write`` must be called once per spec, in spec order; each tensor's dtype and shape
    are checked against its spec. The bytes are written and hashed by a background
    thread (both release the GIL, so they overlap the caller's quantization of the next
    tensor); at most ``QUEUE`` tensors wait for it. A write error surfaces as
    :class:`WriteFailure` from the next ``write`` or from ``close``. The sha256 of the
    file and its size are available after ``close`` (``sha256``, ``nbytes``).
    """

    QUEUE = 4

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        self._hash = hashlib.sha256()
        self.nbytes = 0
        self._error: OSError | None = None
        self._f: BinaryIO = open(self.path, "wb")
        self._queue: queue.Queue = queue.Queue(maxsize=self.QUEUE)
        self._thread = threading.Thread(target=self._drain, name=f"write {self.path.name}", daemon=True)
        self._thread.start()
        self._put(build_header(self.specs, metadata))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                self._f.write(item)
                self._hash.update(item)
                self.nbytes += item.nbytes if isinstance(item, memoryview) else len(item)
            except OSError as e:
                self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise WriteFailure(
                f"writing {self.path.name} failed: {self._error.strerror}; free some space or choose another output folder"
            ) from None

    def _put(self, data: bytes | memoryview) -> None:
        self._raise_if_failed()
        self._queue.put(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"unexpected tensor {name!r}: all {len(self.specs)} tensors were written")
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r} {tensor.dtype} {tuple(tensor.shape)} does not match the planned "
                f"{spec.name!r} {spec.dtype} {spec.shape}"
            )
        if tensor.numel():
            self._put(memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> None:
        """Wait for the queued bytes, flush them to disk; raises if tensors are missing."""
        self._stop()
        try:
            if self._next != len(self.specs):
                raise ValueError(f"{self.path}: {len(self.specs) - self._next} planned tensors were never written")
            self._raise_if_failed()
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            except OSError as e:
                self._error = e
                self._raise_if_failed()
        finally:
            self._f.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._stop()
        self._f.close()
