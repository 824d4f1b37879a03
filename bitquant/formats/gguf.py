"""GGUF for llama.cpp: ternary projections as TQ2_0 or TQ1_0 (FORMATS.md section 2).

Layout of the file written (architecture ``llama``):

* projections ternarized by the recipe: TQ2_0 (2.0625 bits/weight) or TQ1_0 (1.6875),
  built by ``gguf.quants`` from the ternarized values s * code, so each 256-weight block
  gets d = fp16(s) and exactly the recipe's codes. A row length that is not a multiple of
  256 cannot be TQ: such a matrix is stored as Q8_0 with d = fp16(s) and the codes as its
  int8 values (the same numbers, 8.5 bits/weight), or F16 if rows are not a multiple of
  32 either, and listed in the report; ``strict`` makes that an error;
* q and k rows permuted into llama.cpp's rope layout (pairs of halves interleaved, per
  head), which permutes codes and leaves the per-matrix scale unchanged;
* projections the recipe keeps, the token embedding and the output head: F16; norms: F32;
* llama hyper-parameters and the tokenizer (SentencePiece, or byte-level BPE with the
  GPT-2 split pattern) through the ``gguf`` package's vocabulary helpers.

Tensors are streamed: the writer gets every tensor's type and size first, then each
tensor's bytes as it is produced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitquant.errors import TensorError, UnsupportedModelError, WriteFailure
from bitquant.fingerprint import file_sha256
from bitquant.kernels import quantize_pack
from bitquant.packing import unpack_ternary
from bitquant.report import LayerStats, OutputFile, SizeStats

TYPES = {"gguf-tq2_0": "TQ2_0", "gguf-tq1_0": "TQ1_0"}
QK_TQ = 256  # weights per TQ block
QK8_0 = 32  # weights per Q8_0 block

_LEAVES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    """transformers tensor name -> llama.cpp tensor name."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        if module in _LEAVES:
            return f"blk.{parts[2]}.{_LEAVES[module]}.{leaf}"
    raise UnsupportedModelError(f"tensor {hf!r} has no llama.cpp name; GGUF export supports LLaMA/Mistral tensors only")


def permute_for_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from the transformers rotary layout to llama.cpp's (per head, the
    two halves of the head dimension interleaved)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Entry:
    """One tensor of the GGUF file."""

    hf_name: str
    name: str
    kind: str  # "ternary" or "plain"
    qtype: str  # GGML type name: TQ2_0, TQ1_0, Q8_0, F16, F32
    shape: tuple[int, ...]  # logical shape (rows, cols) as in transformers
    nbytes: int


def _ternary_type(cols: int, tq: str) -> str:
    if cols % QK_TQ == 0:
        return tq
    return "Q8_0" if cols % QK8_0 == 0 else "F16"


def nbytes_of(qtype: str, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n = int(np.prod(shape))
    return n // block * size


def plan_entry(hf_name: str, shape: tuple[int, ...], ternary: bool, tq: str, strict: bool) -> Entry:
    name = gguf_name(hf_name)
    if ternary:
        qtype = _ternary_type(shape[1], tq)
        if qtype != tq and strict:
            raise TensorError(
                f"tensor {hf_name!r} has rows of {shape[1]} weights, not a multiple of {QK_TQ}, so it cannot be {tq}; "
                "drop --strict to store it exactly as Q8_0"
            )
        return Entry(hf_name, name, "ternary", qtype, shape, nbytes_of(qtype, shape))
    qtype = "F32" if len(shape) == 1 else "F16"
    return Entry(hf_name, name, "plain", qtype, shape, nbytes_of(qtype, shape))


def encode_ternary(entry: Entry, codes: torch.Tensor, scale: float) -> np.ndarray:
    """The bytes of one ternarized matrix in ``entry.qtype`` (codes already rope-permuted)."""
    from gguf import GGMLQuantizationType, quants

    if entry.qtype in ("TQ2_0", "TQ1_0"):
        values = codes.to(torch.float32).numpy() * np.float32(scale)
        return quants.quantize(values, GGMLQuantizationType[entry.qtype])
    d = np.float16(scale)
    if entry.qtype == "Q8_0":
        rows, cols = entry.shape
        blocks = np.empty((rows, cols // QK8_0), dtype=[("d", "<f2"), ("q", "i1", (QK8_0,))])
        blocks["d"] = d
        blocks["q"] = codes.numpy().reshape(rows, cols // QK8_0, QK8_0)
        return blocks.view(np.uint8).reshape(rows, -1)
    return (codes.numpy().astype(np.float16) * d).astype(np.float16)  # F16: exact, code * fp16(s)


def encode_plain(entry: Entry, tensor: torch.Tensor) -> np.ndarray:
    dtype = torch.float32 if entry.qtype == "F32" else torch.float16
    return tensor.to(dtype).numpy()


def rope_heads(config: dict, hf_name: str) -> int | None:
    """Heads to permute by, for q and k projections (None for other tensors)."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config["num_attention_heads"]
    if hf_name.endswith("self_attn.k_proj.weight"):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def check_config(config: dict) -> None:
    arch = config["architectures"][0]
    if arch not in ("LlamaForCausalLM", "MistralForCausalLM"):
        raise UnsupportedModelError(f"GGUF export supports LlamaForCausalLM and MistralForCausalLM, not {arch}")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise UnsupportedModelError(f"GGUF export does not handle rope scaling {kind!r} yet; use the default format")


def add_metadata(writer, config: dict, name: str, tq: str) -> None:
    from gguf import LlamaFileType

    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    rope = config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(config.get("head_dim") or hidden // heads)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(LlamaFileType.MOSTLY_TQ2_0 if tq == "TQ2_0" else LlamaFileType.MOSTLY_TQ1_0)


def pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (the text splitting before BPE)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # byte-level BPE with the GPT-2 split pattern (GPT-2, SmolLM, StarCoder, ...)
    raise UnsupportedModelError(
        f"GGUF export cannot yet name this tokenizer's pre-tokenizer ({pre.get('type', 'none')}) for llama.cpp; "
        "byte-level BPE tokenizers with the GPT-2 pattern are supported"
    )


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
                                        "pip install 'bitquant[gguf]'") from None
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
        model, pre, merges = "gpt2", pre_tokenizer(tokenizer_json), True
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


def write_file(path: Path, config: dict, tokenizer_folder: Path, name: str, tq: str, entries: list[Entry], tensors) -> None:
    """Write the GGUF: metadata, tokenizer, every entry's header, then the bytes that the
    ``tensors`` iterable yields (one array per entry, in order), one at a time."""
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(path, "llama")
    add_metadata(writer, config, name, tq)
    add_tokenizer(writer, tokenizer_folder, config["vocab_size"])
    for e in entries:
        if e.qtype in ("F16", "F32"):
            writer.add_tensor_info(e.name, e.shape, np.dtype(np.float16 if e.qtype == "F16" else np.float32), e.nbytes)
        else:
            writer.add_tensor_info(e.name, (e.shape[0], e.nbytes // e.shape[0]), np.dtype(np.uint8), e.nbytes,
                                   raw_dtype=GGMLQuantizationType[e.qtype])
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for e, array in zip(entries, tensors, strict=True):
        if array.nbytes != e.nbytes:
            raise ValueError(f"{e.name}: {array.nbytes} bytes, planned {e.nbytes}")
        writer.write_tensor_data(array)
    writer.close()


def export(ckpt, quantize: set[str], total_params: int, folder: Path, fmt: str, eps: float, name: str,
           strict: bool = False, progress=None):
    """Stream checkpoint ``ckpt`` into ``folder/model.gguf``, ternarizing the weights named in
    ``quantize``. Returns the layer stats, the output file, the size stats and the GGUF
    details for the report."""
    tq = TYPES[fmt]
    entries = [plan_entry(spec.name, spec.shape, spec.name in quantize, tq, strict) for _, spec in ckpt.iter_specs()]
    layers: list[LayerStats] = []

    def arrays():
        for i, (hf_name, tensor) in enumerate(ckpt.iter_tensors(), start=1):
            entry = entries[i - 1]
            heads = rope_heads(ckpt.config, hf_name)
            if entry.kind == "ternary":
                t = quantize_pack(tensor, eps=eps, name=hf_name)
                layers.append(LayerStats.of(hf_name, tensor.shape, t))
                codes = unpack_ternary(t.packed)
                yield encode_ternary(entry, permute_for_rope(codes, heads) if heads else codes, t.scale)
            else:
                yield encode_plain(entry, permute_for_rope(tensor, heads) if heads else tensor)
            if progress:
                progress(i, len(entries), hf_name)

    path = folder / "model.gguf"
    try:
        write_file(path, ckpt.config, ckpt.path, name, tq, entries, arrays())
    except OSError as e:
        raise WriteFailure(f"writing model.gguf failed: {e.strerror}; free some space or choose another output folder") from None
    files = [OutputFile(path.name, path.stat().st_size, file_sha256(path))]
    by_type: dict[str, int] = {}
    for e in entries:
        by_type[e.qtype] = by_type.get(e.qtype, 0) + e.nbytes
    ternary = [e for e in entries if e.kind == "ternary"]
    quantized_params = sum(e.shape[0] * e.shape[1] for e in ternary)
    quantized_bytes = sum(e.nbytes for e in ternary)
    total_bytes = sum(e.nbytes for e in entries)
    size = SizeStats.from_counts(ckpt.source_bytes(), files[0].bytes, quantized_params, quantized_bytes,
                                 total_params, total_bytes)
    info = {
        "file": path.name,
        "type": tq,
        "bytes_by_type": dict(sorted(by_type.items())),
        "not_tq": [{"name": e.hf_name.removesuffix(".weight"), "stored_as": e.qtype,
                    "reason": f"rows of {e.shape[1]} weights are not a multiple of {QK_TQ}"}
                   for e in ternary if e.qtype != tq],
    }
    return layers, files, size, info
