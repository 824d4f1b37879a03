"""Where a model comes from: a Hub id, a local folder, or the embedded example.

``resolve_source`` turns what the user typed into a local folder of safetensors files
(downloading through huggingface_hub when needed, which honours ``HF_TOKEN``,
``HF_HOME`` and ``HF_HUB_OFFLINE``). ``open_checkpoint`` then validates the folder
(config, architecture, index, shards) and gives a :class:`Checkpoint` whose tensors are
read one at a time from memory-mapped files. Nothing here loads a whole model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from bitquant import embedded, families, inputs
from bitquant.errors import SourceError, unreachable
from bitquant.inputs import Layout
from bitquant.recipe import PROJECTIONS
from bitquant.tensorfile import SafetensorsReader, TensorSpec

#: Architectures bitquant converts (one row each in :mod:`bitquant.families`).
SUPPORTED_ARCHITECTURES = families.SUPPORTED_ARCHITECTURES

#: Files fetched from the Hub: configuration, tokenizer and safetensors weights only.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]

#: Non-weight files carried over into every output.
CARRIED_FILES = [p for p in HUB_PATTERNS if "safetensors" not in p and p != "config.json"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder, and where it came from."""

    spec: str  # what the user typed
    path: Path  # local folder holding config.json and the safetensors files
    kind: str  # "hub", "local" or "embedded"
    revision: str | None = None
    commit_sha: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"id": self.spec, "kind": self.kind, "path": str(self.path), "revision": self.revision, "commit_sha": self.commit_sha}


def resolve_source(spec: str, revision: str | None = None, token: str | None = None) -> ModelSource:
    """Resolve a model argument to a local folder.

    An existing path is a local folder; ``embedded:NAME`` is a model shipped in a Python
    package (see :mod:`bitquant.embedded`); anything else is a Hub repo id.
    """
    if spec.startswith(embedded.PREFIX):
        return ModelSource(spec, embedded.materialize(spec[len(embedded.PREFIX) :]), "embedded")
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        if not path.exists():
            raise SourceError(f"{spec!r} does not exist; pass a checkpoint folder or a Hub model id")
        if not path.is_dir():
            raise SourceError(f"{spec!r} is not a folder; pass a checkpoint folder or a Hub model id")
        return ModelSource(spec, path.resolve(), "local", revision)
    return _download(spec, revision, token)


def _download(repo_id: str, revision: str | None, token: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SourceError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub model id (like 'org/name')"
        ) from None
    try:
        folder = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=HUB_PATTERNS)
    except GatedRepoError:
        raise SourceError(
            f"{repo_id} is a gated model: accept its licence on the Hub, then set HF_TOKEN or pass --token"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"model {repo_id!r} was not found on the Hub; check the id, or set HF_TOKEN / --token if it is private"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"model {repo_id} has no revision {revision!r}; check --revision") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise SourceError(
            f"model {repo_id} is not in the local Hub cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); connect once, or pass a local folder"
        ) from None
    except Exception as e:
        if not unreachable(e):
            raise
        raise SourceError(f"downloading {repo_id} failed: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    path = Path(folder)
    sha = path.name if _COMMIT_RE.match(path.name) else None
    return ModelSource(repo_id, path, "hub", revision or "main", sha)


@dataclass
class Checkpoint:
    """A validated checkpoint folder whose tensors are streamed from memory-mapped files."""

    path: Path
    config: dict
    files: list[Path]
    weight_map: dict[str, Path] = field(default_factory=dict)
    layout: Layout = field(default_factory=lambda: Layout("fp"))

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def source_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def iter_specs(self) -> Iterator[tuple[Path, TensorSpec]]:
        """Every tensor's spec, file by file, in on-disk order (reads headers only)."""
        for f in self.files:
            with SafetensorsReader(f) as r:
                for name in r.names():
                    if self.weight_map and self.weight_map.get(name) != f:
                        continue
                    yield f, r.spec(name)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors (e.g. one decoder layer's), read from their files."""
        wanted = set(names)
        out: dict[str, torch.Tensor] = {}
        files = {self.weight_map[n] for n in wanted if n in self.weight_map} if self.weight_map else self.files
        for f in sorted(files):
            with SafetensorsReader(f) as r:
                for name in wanted.intersection(r.header):
                    out[name] = r.get(name).clone()
        missing = sorted(wanted - set(out))
        if missing:
            raise SourceError(f"{self.path} has no tensor {missing[0]!r}; the checkpoint is incomplete, download it again")
        return out

    def mapped(self, name: str) -> tuple[torch.Tensor, Callable[[int, int], None]]:
        """A zero-copy view of tensor ``name`` (pages are read as they are touched) and a
        function ``release(first_row, end_row)`` that drops those rows' pages from this
        process's memory again (for a vocabulary-sized matrix used a block at a time)."""
        files = [self.weight_map[name]] if name in self.weight_map else self.files
        for f in files:
            reader = SafetensorsReader(f)
            if name in reader.header:
                view = reader.get(name)
                row = view[0].numel() * view.element_size() if view.dim() > 1 else view.element_size()
                return view, lambda a, b: reader.release(name, a * row, b * row)
            reader.close()
        raise SourceError(f"{self.path} has no tensor {name!r}; the checkpoint is incomplete, download it again")

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs, one at a time; each tensor is a view of a memory map,
        valid until the next pair is requested (its pages are then released)."""
        for f in self.files:
            reader = SafetensorsReader(f)
            try:
                for name in reader.names():
                    if self.weight_map and self.weight_map.get(name) != f:
                        continue
                    yield name, reader.get(name)
                    reader.release(name)
            finally:
                reader.close()


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path} is not valid JSON ({e.__class__.__name__}); re-export the {what}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a JSON object; re-export the {what}")
    return data


def _inside(folder: Path, name: str) -> Path:
    """``folder/name``, refusing names that would escape the folder."""
    candidate = (folder / name).resolve()
    if Path(name).is_absolute() or folder.resolve() not in candidate.parents:
        raise SourceError(f"the checkpoint index names {name!r}, which is outside {folder}; refusing to read it")
    return candidate


def checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, Path]]:
    """The safetensors files of a checkpoint folder and, when sharded, its weight map.

    The index is checked: every shard it names must exist inside the folder. A folder
    with only pickle weights is refused, saying why.
    """
    index_path = folder / "model.safetensors.index.json"
    weight_map: dict[str, Path] = {}
    if index_path.is_file():
        index = _read_json(index_path, "checkpoint index")
        raw_map = index.get("weight_map")
        if not isinstance(raw_map, dict) or not raw_map:
            raise SourceError(f"{index_path} has no weight_map; re-export the checkpoint")
        weight_map = {k: _inside(folder, v) for k, v in raw_map.items()}
        files = sorted(set(weight_map.values()))
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise SourceError(
                f"the checkpoint index names shard {missing[0]}, which is missing from {folder}; download it again"
            )
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise SourceError(
                f"{folder} holds only pickle weights ({pickles[0]}); bitquant reads safetensors only, because "
                "unpickling can run arbitrary code: convert the checkpoint to safetensors first"
            )
        raise SourceError(f"{folder} has no *.safetensors weights; point at a checkpoint folder")
    return files, weight_map


def open_checkpoint(folder: Path) -> Checkpoint:
    """Validate a checkpoint folder: config, supported architecture, safetensors shards, and
    what it holds (:func:`bitquant.inputs.detect`: FP, ternary-trained master or packed)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{folder} has no config.json; point at a Hugging Face checkpoint folder")
    config = _read_json(config_path, "config")
    families.family_of(config)  # refuses unsupported architectures in one line
    files, weight_map = checkpoint_files(folder)
    ckpt = Checkpoint(folder, config, files, weight_map)
    ckpt.layout = inputs.detect(config, {s.name: s for _, s in ckpt.iter_specs()}, PROJECTIONS, str(folder))
    return ckpt
