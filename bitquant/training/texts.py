"""heal's training text, the way people hold it: UTF-8 text files, JSON Lines and Parquet
files, and Hub data sets streamed through the ``datasets`` library.

``--data`` takes a path (``.txt`` or any other suffix: UTF-8 text; ``.jsonl``/``.json``:
one JSON object per line; ``.parquet``) or ``hf:ORG/NAME`` (a Hub data set; ``--data-config``,
``--data-split``, and ``--data-field`` name the column that holds the text, ``text`` by
default, for JSON Lines and Parquet too). Documents are tokenized one by one without special
tokens, each followed by the model's EOS, concatenated, and cut into sequences of
``seq_len`` tokens (:func:`bitquant.text.sequences`: each starting with BOS where the
tokenizer adds one); reading stops once ``max_tokens`` tokens are in hand, so a Hub data set
is streamed only as far as the run needs. A Hub data set's token ids are cached in
bitquant's cache, keyed like the teacher samples (the data set's commit, its config,
split and field, the model, the sequence length and the token count).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bitquant.errors import TextError, UsageError, describe, unreachable
from bitquant.text import sequences, tokenize_file

HUB_PREFIX = "hf:"
JSONL = (".jsonl", ".json")
PARQUET = (".parquet",)
#: Documents tokenized at once.
DOC_BATCH = 256
CACHE_FORMAT = 1


@dataclass(frozen=True)
class DataSpec:
    """One ``--data`` source and how to read its text."""

    source: str  # a path, or hf:ORG/NAME
    field: str = "text"
    config: str | None = None
    split: str = "train"

    @property
    def hub(self) -> bool:
        return self.source.startswith(HUB_PREFIX)

    @property
    def repo(self) -> str:
        return self.source[len(HUB_PREFIX):]

    @property
    def kind(self) -> str:
        if self.hub:
            return "hub"
        suffix = Path(self.source).suffix.lower()
        return "jsonl" if suffix in JSONL else "parquet" if suffix in PARQUET else "text"

    def check(self) -> None:
        """Refuse what can be refused before anything is loaded: a missing file, a bad id."""
        if self.hub:
            from huggingface_hub.errors import HFValidationError
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(self.repo)
            except HFValidationError:
                raise UsageError(f"--data {self.source}: {self.repo!r} is not a Hub data set id (like hf:org/name)") from None
        elif not Path(self.source).is_file():
            raise TextError(f"--data {self.source} does not exist; pass a text, .jsonl or .parquet file, or hf:ORG/NAME")


def _jsonl(spec: DataSpec) -> Iterator[str]:
    with open(spec.source, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TextError(f"{spec.source} line {n} is not JSON ({e.msg}); pass JSON Lines: one object per line") from None
            yield _field(row, spec, f"line {n}")


def _field(row, spec: DataSpec, where: str) -> str:
    if not isinstance(row, dict) or spec.field not in row:
        keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
        raise UsageError(f"--data {spec.source} has no field {spec.field!r} ({where} has: {keys}); "
                         f"name the text column with --data-field")
    value = row[spec.field]
    if not isinstance(value, str):
        raise UsageError(f"--data {spec.source}: field {spec.field!r} holds {type(value).__name__}, not text; "
                         "name the text column with --data-field")
    return value


def _parquet(spec: DataSpec) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("reading .parquet needs pyarrow: pip install 'bitquant-llm[data]'") from None
    try:
        f = pq.ParquetFile(spec.source)
    except Exception as e:  # pyarrow's own error types
        raise TextError(f"{spec.source} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = f.schema_arrow.names
    if spec.field not in names:
        raise UsageError(f"--data {spec.source} has no column {spec.field!r} (it has: {', '.join(names)}); "
                         "name the text column with --data-field")
    for batch in f.iter_batches(columns=[spec.field], batch_size=DOC_BATCH):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def hub_commit(spec: DataSpec, token: str | None) -> str:
    """The commit of the Hub data set (also: whether it exists, as a one-line error)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(token=token).dataset_info(spec.repo)
    except GatedRepoError:
        raise UsageError(f"data set {spec.repo} is gated: accept its terms on the Hub, then set HF_TOKEN or --token") from None
    except RepositoryNotFoundError:
        raise UsageError(f"data set {spec.repo!r} was not found on the Hub; check the id after hf:, or set HF_TOKEN "
                         "if it is private") from None
    except RevisionNotFoundError:
        raise UsageError(f"data set {spec.repo} has no main revision") from None
    except OfflineModeIsEnabled:
        raise UsageError(f"data set {spec.repo} cannot be streamed with HF_HUB_OFFLINE=1; connect, or pass a local "
                         "file") from None
    except Exception as e:
        if not unreachable(e):
            raise
        raise UsageError(f"data set {spec.repo} cannot be reached at {constants.ENDPOINT} ({describe(e)}); "
                         "check the network or HF_ENDPOINT, or pass a local .jsonl or .parquet file") from None
    return info.sha or "unknown"


def _hub(spec: DataSpec, token: str | None) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UsageError("--data hf:... streams through the datasets library: pip install 'bitquant-llm[data]'") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    n = 0
    try:  # an unreachable Hub, when the stream opens or mid-way, is one line; the partial text is not cached
        try:
            stream = datasets.load_dataset(spec.repo, name=spec.config, split=spec.split, streaming=True, token=token)
        except (ValueError, FileNotFoundError) as e:  # a bad config or split, no data files
            raise UsageError(f"--data {spec.source} (config {spec.config!r}, split {spec.split!r}) cannot be read: "
                             f"{str(e).splitlines()[0]}") from None
        except datasets.exceptions.DatasetNotFoundError:
            raise UsageError(f"data set {spec.repo!r} was not found on the Hub; check the id after hf:") from None
        for row in stream:
            n += 1
            yield _field(row, spec, f"row {n}")
    except Exception as e:
        if not unreachable(e):
            raise
        raise _lost(spec, n, e) from None


def _lost(spec: DataSpec, rows: int, e: BaseException) -> UsageError:
    from huggingface_hub import constants

    return UsageError(f"data set {spec.repo} stopped streaming after {rows:,} rows ({describe(e)}); "
                      f"check the network or HF_ENDPOINT and run again ({constants.ENDPOINT}), or pass a local .jsonl or .parquet file")


def documents(spec: DataSpec, token: str | None = None) -> Iterator[str]:
    """The documents of a JSON Lines, Parquet or Hub source, in order."""
    if spec.kind == "jsonl":
        return _jsonl(spec)
    if spec.kind == "parquet":
        return _parquet(spec)
    return _hub(spec, token)


def document_tokens(docs: Iterator[str], tokenizer, max_tokens: int, eos: int | None) -> tuple[list[int], "hashlib._Hash"]:
    """Token ids of ``docs`` (no special tokens; each followed by ``eos``), up to ``max_tokens``;
    and a running sha256 of the text read."""
    ids: list[int] = []
    digest = hashlib.sha256()
    batch: list[str] = []

    def flush() -> None:
        for doc_ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(doc_ids)
            if eos is not None:
                ids.append(eos)
        batch.clear()

    for doc in docs:
        if not doc.strip():
            continue
        digest.update(doc.encode("utf-8"))
        batch.append(doc)
        if len(batch) == DOC_BATCH:
            flush()
            if len(ids) >= max_tokens:
                break
    if batch:
        flush()
    return ids[:max_tokens], digest


def load(spec: DataSpec, tokenizer, seq_len: int, bos: int | None, eos: int | None, max_tokens: int,
         refused_sha256: str | None = None, cache_dir: Path | None = None, model_key: str = "",
         token: str | None = None) -> tuple[torch.Tensor, dict]:
    """One source's sequences ([n, seq_len] int64) and its description for the report
    (``kind``, ``path``/``repo``, ``sha256``, ``tokens``, ``sequences`` ...)."""
    spec.check()
    if spec.kind == "text":
        tokens = tokenize_file(spec.source, tokenizer, min_tokens=seq_len, max_tokens=max_tokens, purpose="train on")
        if refused_sha256 is not None and tokens.sha256 == refused_sha256:
            raise UsageError(f"--data {spec.source} is the --eval-text file; train and evaluate on different texts")
        ids = sequences(tokens.ids, seq_len, bos)
        return ids, {"path": spec.source, "format": "text", "sha256": tokens.sha256, "tokens": len(tokens.ids),
                     "sequences": len(ids)}
    described = {"format": spec.kind, "field": spec.field}
    if spec.hub:
        commit = hub_commit(spec, token)
        described.update(repo=spec.repo, config=spec.config, split=spec.split, commit=commit)
        key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "repo": spec.repo, "commit": commit,
                                         "config": spec.config, "split": spec.split, "field": spec.field,
                                         "model": model_key, "seq_len": seq_len, "tokens": max_tokens, "bos": bos,
                                         "eos": eos}, sort_keys=True).encode()).hexdigest()
        cached = _read_cache(cache_dir, key)
        if cached is not None:
            ids, info = cached
            return ids, {**described, **info, "cached": True}
    else:
        described["path"] = spec.source
    text_ids, digest = document_tokens(documents(spec, token), tokenizer, max_tokens, eos)
    if not text_ids:
        raise TextError(f"--data {spec.source} holds no text (no non-empty {spec.field!r} values); pass a source with text")
    if len(text_ids) < seq_len:
        raise TextError(f"--data {spec.source} has {len(text_ids)} tokens, fewer than one sequence of {seq_len}; "
                        "pass more text")
    ids = sequences(text_ids, seq_len, bos)
    info = {"sha256": digest.hexdigest(), "tokens": len(text_ids), "sequences": len(ids),
            "truncated": len(text_ids) >= max_tokens}
    if spec.hub:
        _write_cache(cache_dir, key, ids, info)
        info["cached"] = False
    return ids, {**described, **info}


def _read_cache(cache_dir: Path | None, key: str) -> tuple[torch.Tensor, dict] | None:
    if cache_dir is None:
        return None
    from safetensors.torch import load_file

    path = cache_dir / f"text-{key}.safetensors"
    try:
        return load_file(path)["ids"].to(torch.int64), json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(cache_dir: Path | None, key: str, ids: torch.Tensor, info: dict) -> None:
    if cache_dir is None:
        return
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"text-{key}.safetensors"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"ids": ids.to(torch.int32).contiguous()}, tmp)
    path.with_suffix(".json").write_text(json.dumps(info), encoding="utf-8")
    os.replace(tmp, path)


def load_all(specs: list[DataSpec], tokenizer, seq_len: int, bos: int | None, eos: int | None, max_tokens: int,
             refused_sha256: str | None = None, cache_dir: Path | None = None, model_key: str = "",
             token: str | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Every source's sequences, concatenated, and their descriptions."""
    parts, described = [], []
    for spec in specs:
        ids, info = load(spec, tokenizer, seq_len, bos, eos, max_tokens, refused_sha256, cache_dir, model_key, token)
        parts.append(ids)
        described.append(info)
    return torch.cat(parts), described

