"""The tokenizer of a GGUF for llama.cpp: SentencePiece (``tokenizer.model``, as Llama-2 and
Mistral ship it) or byte-level BPE (``tokenizer.json``) with the GPT-2, Llama-3 or Qwen2
split pattern, written through the ``gguf`` package's vocabulary helpers. The split pattern
is read from the pre-tokenizer that transformers actually runs, which for some
architectures (Qwen2) is not the one in tokenizer.json; anything else is refused rather
than guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from bitquant.errors import UnsupportedModelError

#: Split patterns of byte-level BPE tokenizers (as in their tokenizer.json) -> llama.cpp's
#: pre-tokenizer name. They differ in how many digits make one piece.
_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer's pre-tokenization (the text splitting before BPE),
    from the pre-tokenizer that transformers actually runs (its JSON form)."""
    pre = pre or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # byte-level BPE with the GPT-2 split pattern (GPT-2, SmolLM, StarCoder, ...)
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split" \
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
        name = _SPLIT_PATTERNS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name  # byte-level BPE with the Llama-3 or the Qwen2 split pattern
    raise UnsupportedModelError(
        f"GGUF export cannot yet name this tokenizer's pre-tokenizer ({pre.get('type', 'none')}) for llama.cpp; "
        "byte-level BPE tokenizers with the GPT-2, Llama-3 or Qwen2 pattern are supported"
    )


def _runtime_pre_tokenizer(folder: Path) -> dict | None:
    """The pre-tokenizer transformers runs for this model: for some architectures (Qwen2)
    its tokenizer class replaces the one in tokenizer.json."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    backend = getattr(tok, "backend_tokenizer", None)
    return json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None


def add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """The tokenizer: SentencePiece (``tokenizer.model``, as Llama-2 and Mistral ship it)
    or byte-level BPE (``tokenizer.json``), through the ``gguf`` package's vocabularies."""
    from gguf import TokenType
    from gguf.vocab import BpeVocab, SentencePieceVocab, SpecialVocab

    if (folder / "tokenizer.model").is_file():
        try:
            vocab = SentencePieceVocab(folder)
        except ImportError:
            raise UnsupportedModelError("GGUF export of a SentencePiece tokenizer needs the sentencepiece package: "
                                        "pip install 'bitquant-llm[gguf]'") from None
        model, pre, merges, special = "llama", "default", False, set()
    else:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UnsupportedModelError(f"{folder} has no tokenizer.json or tokenizer.model; GGUF export needs the tokenizer")
        tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
        try:
            vocab = BpeVocab(folder)
        except (FileNotFoundError, ValueError) as e:
            raise UnsupportedModelError(
                f"GGUF export supports SentencePiece and byte-level BPE tokenizers; this one is neither ({e})"
            ) from None
        model, pre, merges = "gpt2", pre_tokenizer(_runtime_pre_tokenizer(folder)), True
        special = {t["id"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    tokens, scores, types = [], [], []
    for i, (text, score, typ) in enumerate(vocab.all_tokens()):
        tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
        scores.append(score)
        types.append(TokenType.CONTROL if i in special else typ)
    if len(tokens) != vocab_size:
        raise UnsupportedModelError(f"the tokenizer has {len(tokens)} tokens but the model {vocab_size}; GGUF needs them equal")
    special_vocab = SpecialVocab(folder, load_merges=merges, n_vocab=vocab_size)
    if merges and not special_vocab.merges:
        raise UnsupportedModelError("the BPE tokenizer has no merges, which llama.cpp needs to load it")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special_vocab.add_to_gguf(writer, quiet=True)
