"""Evaluation text: validated, hashed and tokenized.

A text file must exist, be UTF-8 without NUL bytes, contain more than whitespace and hold
at least one window of tokens. With ``max_tokens`` the file is read and tokenized in
chunks cut at line starts (a ``\\n`` byte never occurs inside a UTF-8 multibyte
character), stopping once enough tokens are in hand, so a large file is never held whole.
Line endings are normalized as Python's text mode does (CR LF and lone CR become LF).
Tokens are produced without special tokens (no BOS), the same for every model
compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bitquant.errors import TextError
from bitquant.fingerprint import file_sha256

CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    path: str
    sha256: str  # of the whole file
    truncated: bool  # True when reading stopped at max_tokens


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
    return Tokens(ids, str(path), file_sha256(path), truncated)
