"""Evaluation text: validated, hashed and tokenized.

A text file must exist, be UTF-8 without NUL bytes, contain more than whitespace and hold
at least one window of tokens. With ``max_tokens`` the file is read and tokenized in
chunks cut at line starts (a ``\\n`` byte never occurs inside a UTF-8 multibyte
character), stopping once enough tokens are in hand, so a large file is never held whole.
Line endings are normalized as Python's text mode does (CR LF and lone CR become LF).
Text is tokenized without special tokens.

This module also decides where BOS goes, for every window that is scored and every
sequence that is trained or calibrated on: a model whose tokenizer adds BOS by default
(Llama 2 and 3, Mistral, Gemma) was trained with it and is not meant to run without it,
so each window and sequence starts with BOS (``per_window``, llama.cpp's perplexity
convention); a model whose tokenizer adds none (SmolLM2, Qwen2) gets the text as it is
(``none``). With BOS, a window of ``context`` positions holds BOS and ``context - 1`` text
tokens, and its first text token is scored (after BOS); without, a window holds ``context``
text tokens and its first has no context, so it is not scored: either way a window scores
``context - 1`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from bitquant.errors import SourceError, TextError
from bitquant.fingerprint import file_sha256

CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    path: str
    sha256: str  # of the whole file
    truncated: bool  # True when reading stopped at max_tokens
    bos: int | None = None  # the token every window starts with (None: none)

    @property
    def convention(self) -> str:
        return convention(self.bos)


#: The text whose default and plain encodings are compared to find what a tokenizer adds.
_PROBE = "The quick brown fox"


def bos_token(tokenizer) -> int | None:
    """The BOS id every window and sequence starts with, where the tokenizer's default
    encoding puts one before the text; ``None`` where it puts nothing there. A tokenizer that
    adds a token before the text but names no BOS token is refused (its windows would be
    scored without the token the model expects)."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    default = tokenizer(_PROBE)["input_ids"]
    prefix: list[int] = []
    for k in range(len(default) - len(plain) + 1):
        if default[k : k + len(plain)] == plain:
            prefix = default[:k]
            break
    if not prefix:
        return None
    bos = tokenizer.bos_token_id
    if bos is None or bos not in prefix:
        raise SourceError(f"the tokenizer adds token {prefix[-1]} before the text but names no BOS token "
                          "(bos_token in tokenizer_config.json); set bos_token there, so that every window can "
                          "start as the model expects")
    return int(bos)


def convention(bos: int | None) -> str:
    """The report's name for where BOS goes: ``per_window`` or ``none``."""
    return "none" if bos is None else "per_window"


def windows(n: int, context: int, stride: int, bos: bool = False) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over ``n`` text tokens: windows start
    every ``stride`` tokens (at most a window's text, ``context - 1`` tokens with ``bos``) and
    each token is scored once, by the first window that has it beyond the previous window's
    end. Without ``bos`` a window's first token is never scored (nothing precedes it)."""
    span = context - 1 if bos else context
    step = min(stride, span)
    spans, prev_end = [], 0
    for begin in range(0, n, step):
        end = min(begin + span, n)
        first = max(prev_end, begin if bos else begin + 1)
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return spans


def window_input(ids: torch.Tensor, span: tuple[int, int, int], bos: int | None) -> torch.Tensor:
    """The model's input for a window: its text tokens, after BOS where there is one."""
    begin, end, _ = span
    if bos is None:
        return ids[begin:end]
    return torch.cat([ids.new_full((1,), bos), ids[begin:end]])


def scored_rows(span: tuple[int, int, int], bos: int | None) -> slice:
    """The positions of a window's input whose outputs predict its scored tokens."""
    begin, end, first = span
    shift = 0 if bos is None else 1
    return slice(first - begin - 1 + shift, end - begin - 1 + shift)


def sequences(ids: list[int], length: int, bos: int | None) -> torch.Tensor:
    """Non-overlapping training or calibration sequences of ``length`` positions ([n, length]
    int64): ``length`` text tokens each, or BOS and ``length - 1`` text tokens; a remainder
    shorter than a sequence is dropped."""
    span = length if bos is None else length - 1
    n = len(ids) // span
    text = torch.tensor(ids[: n * span], dtype=torch.int64).view(n, span)
    if bos is None:
        return text
    return torch.cat([torch.full((n, 1), bos, dtype=torch.int64), text], dim=1)


def _decode(raw: bytes, path: Path, offset: int) -> str:
    if b"\x00" in raw:
        raise TextError(f"{path} contains NUL bytes: it looks binary, not text; pass a UTF-8 text file")
    try:
        return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise TextError(f"{path} is not UTF-8 text (bad byte at offset {offset + e.start}); convert it to UTF-8") from None


def _cut(buf: bytes) -> int:
    """Index just after the last line break followed by a non-whitespace byte (0: none).

    Byte-level BPE tokenizers (LLaMA-3, Qwen2, SmolLM2, ...) always split there, so the
    chunks tokenize exactly as the whole text does. SentencePiece tokenizers that add a
    dummy prefix may tokenize the first word of a chunk differently (one token in 64 KB).
    """
    i = len(buf) - 1
    while (i := buf.rfind(b"\n", 0, i)) >= 0:
        if not buf[i + 1 : i + 2].isspace():
            return i + 1
    return 0


def _pieces(path: Path, whole: bool) -> Iterator[str]:
    """The file's text, whole or in chunks cut at line starts (see :func:`_cut`)."""
    with open(path, "rb") as f:
        if whole:
            yield _decode(f.read(), path, 0)
            return
        buf, offset = b"", 0
        while block := f.read(CHUNK_BYTES):
            buf += block
            cut = _cut(buf)  # after "\r\n" too, so it is never split
            if cut:
                yield _decode(buf[:cut], path, offset)
                offset += cut
                buf = buf[cut:]
        if buf:
            yield _decode(buf, path, offset)


def tokenize_file(path: str | Path, tokenizer, min_tokens: int, max_tokens: int | None = None,
                  purpose: str = "evaluate on") -> Tokens:
    """Tokenize a text file, validating it; raises :class:`TextError` for unusable input
    (``purpose`` completes its messages: "pass a UTF-8 text file to <purpose>")."""
    path = Path(path)
    bos = bos_token(tokenizer)
    if bos is not None:
        min_tokens -= 1  # a window holds BOS and one token fewer of text
    if not path.is_file():
        raise TextError(f"text file {path} does not exist; pass a UTF-8 text file to {purpose}")
    ids: list[int] = []
    has_text = truncated = False
    for piece in _pieces(path, whole=max_tokens is None):
        has_text = has_text or bool(piece.strip())
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            truncated = True
            ids = ids[:max_tokens]
            break
    if not has_text:
        raise TextError(f"{path} is empty (no text to {purpose}); pass a non-empty UTF-8 text file")
    if len(ids) < min_tokens:
        raise TextError(
            f"{path} has {len(ids)} tokens, fewer than one window of {min_tokens}; pass a longer text or a smaller --context"
        )
    return Tokens(ids, str(path), file_sha256(path), truncated, bos)
