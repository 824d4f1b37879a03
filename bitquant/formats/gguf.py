"""GGUF for llama.cpp: ternary projections as TQ2_0 or TQ1_0 (FORMATS.md sections 2 and 5).

llama.cpp architectures written: ``llama`` (Llama, Mistral), ``qwen2`` (with its q/k/v
biases) and ``bitnet`` (BitNetForCausalLM: sub-norms, tied output, the activation named
in ``bitnet.hidden_activation``). Layout of the file:

* ternary projections: TQ2_0 (2.0625 bits/weight) or TQ1_0 (1.6875),
  built by ``gguf.quants`` from the ternarized values s * code, so each 256-weight block
  gets d = fp16(s) and exactly the given codes. For ``bitnet``, whose runtime multiplies
  by an optional per-matrix ``blk.N.<proj>.scale``, blocks hold the codes with d = 1 and
  s is stored exactly, as F32, in that tensor. A row length that is not a multiple of
  256 cannot be TQ: such a matrix is stored as Q8_0 with d = fp16(s) and the codes as its
  int8 values (the same numbers, 8.5 bits/weight), or F16 if rows are not a multiple of
  32 either, and listed in the report; ``strict`` makes that an error;
* ``llama`` only: q and k rows permuted into llama.cpp's rope layout (pairs of halves
  interleaved, per head), which permutes codes and leaves the per-matrix scale unchanged
  (``qwen2`` and ``bitnet`` use NEOX rope, the transformers order);
* projections the recipe keeps, the token embedding and the output head: F16; norms: F32;
* llama hyper-parameters, and the tokenizer (:mod:`bitquant.formats.gguf_vocab`).

Tensors are streamed: the writer gets every tensor's type and size first, then each
tensor's bytes as it is produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitquant.errors import TensorError, UnsupportedModelError, WriteFailure
from bitquant.families import BY_ARCHITECTURE, FAMILIES, Family, family_of, head_dim
from bitquant.fingerprint import file_sha256
from bitquant.formats.gguf_vocab import add_tokenizer
from bitquant.packing import unpack_ternary
from bitquant.report import LayerStats, OutputFile, SizeStats

TYPES = {"gguf-tq2_0": "TQ2_0", "gguf-tq1_0": "TQ1_0"}
QK_TQ = 256  # weights per TQ block
QK8_0 = 32  # weights per Q8_0 block

#: transformers architecture -> llama.cpp architecture (from the family table).
ARCHITECTURES = {f.architecture: f.gguf for f in FAMILIES if f.gguf}

#: What the llama.cpp vendored by llama-cpp-python 0.3.36 computes in arch ``bitnet``
#: (src/models/bitnet.cpp builds the MLP with LLM_FFN_SILU whatever the model says).
LLAMA_CPP_BITNET_ACTIVATION = "silu"

#: Block modules -> llama.cpp names, shared by every family (a family's own norms are in
#: ``Family.gguf_norms``, which may also rename these). A fused gate/up matrix is llama.cpp's
#: ``ffn_up`` of twice the width, which it splits into gate and up halves (SwiGLU).
_LEAVES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str, family: Family = BY_ARCHITECTURE["LlamaForCausalLM"]) -> str:
    """transformers tensor name -> llama.cpp tensor name."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    leaves = {**_LEAVES, **family.gguf_norms}
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        if module in leaves:
            return f"blk.{parts[2]}.{leaves[module]}.{leaf}"
    raise UnsupportedModelError(f"tensor {hf!r} has no llama.cpp name in a {family.name} model; "
                                "export it in the default format (hf-bitnet)")


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
    kind: str  # "ternary", "plain" or "scale" (a bitnet ternary matrix's s)
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


def plan_entries(hf_name: str, shape: tuple[int, ...], ternary: bool, tq: str, strict: bool,
                 family: Family) -> list[Entry]:
    """The GGUF tensors of one source tensor: itself, and for a ternary matrix of arch
    ``bitnet`` its F32 scale."""
    entry = plan_entry(hf_name, shape, ternary, tq, strict, family)
    if ternary and family.gguf == "bitnet":
        name = entry.name.removesuffix(".weight") + ".scale"
        return [entry, Entry(hf_name, name, "scale", "F32", (1,), nbytes_of("F32", (1,)))]
    return [entry]


def plan_entry(hf_name: str, shape: tuple[int, ...], ternary: bool, tq: str, strict: bool,
               family: Family = BY_ARCHITECTURE["LlamaForCausalLM"]) -> Entry:
    name = gguf_name(hf_name, family)
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


def encode_plain(entry: Entry, tensor: torch.Tensor, norm_offset: float = 0.0) -> np.ndarray:
    """A kept tensor as F16 or F32; norm weights stored as ``w`` for ``(offset + w)`` (Gemma)
    are written as llama.cpp multiplies them: ``offset + w``."""
    dtype = torch.float32 if entry.qtype == "F32" else torch.float16
    if norm_offset and entry.hf_name.endswith("norm.weight"):
        tensor = tensor.to(torch.float32) + norm_offset
    return tensor.to(dtype).numpy()


def rope_heads(config: dict, hf_name: str) -> int | None:
    """Heads to permute by, for q and k projections of families that llama.cpp runs with its
    "normal" rope order (Llama; None otherwise)."""
    if not family_of(config).gguf_rope_permute:
        return None
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config["num_attention_heads"]
    if hf_name.endswith("self_attn.k_proj.weight"):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def check_config(config: dict) -> list[str]:
    """Refuse what llama.cpp cannot run; returns notes for the report (e.g. an activation
    that the vendored llama.cpp does not compute)."""
    arch = config["architectures"][0]
    family = family_of(config)
    if family.gguf is None:
        raise UnsupportedModelError(f"GGUF export supports {', '.join(ARCHITECTURES)}, not {arch}")
    for rope in _rope_parameters(config).values():
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind != "default":
            raise UnsupportedModelError(f"GGUF export does not handle rope scaling {kind!r} yet; use the default format")
    if family.gguf_no_rope_step:
        step = family.gguf_no_rope_step
        want = [int((i + 1) % step != 0) for i in range(config["num_hidden_layers"])]
        if list(config.get("no_rope_layers") or want) != want:
            raise UnsupportedModelError(
                f"llama.cpp runs {family.name} with rotary embedding skipped in every {step}th layer, but this model's "
                "no_rope_layers differ; use the default format for it")
    notes = []
    window = config.get("sliding_window")
    if family.window == "config" and window and window < config.get("max_position_embeddings", 0):
        notes.append(f"this {family.name} model attends to the last {window} tokens in every layer, but the vendored "
                     f"llama.cpp runs its arch {family.gguf} with full attention, so its outputs differ from "
                     f"transformers' beyond {window} tokens of context")
    if family.gguf != "bitnet":
        return notes
    if not config.get("tie_word_embeddings", False):
        raise UnsupportedModelError("llama.cpp's bitnet architecture reuses the token embedding as the output layer, "
                                    "but this model has an untied lm_head; use the default format for it")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if head_dim(config) * heads != hidden:
        raise UnsupportedModelError("llama.cpp's bitnet architecture needs heads x head_dim = hidden_size; "
                                    "use the default format for this model")
    act = config.get("hidden_act", "relu2")
    if act not in ("relu2", "silu"):
        raise UnsupportedModelError(f"GGUF export of a BitNet model knows the activations relu2 and silu, not {act!r}")
    if act != LLAMA_CPP_BITNET_ACTIVATION:
        return notes + [f"this model's MLP uses {act}, but llama.cpp's bitnet architecture (as vendored by llama-cpp-python "
                f"0.3.36) computes {LLAMA_CPP_BITNET_ACTIVATION} whatever the file says, so that llama.cpp gives wrong "
                "outputs for it; the file records bitnet.hidden_activation for runtimes that read it"]
    return notes


def _rope_parameters(config: dict) -> dict[str, dict]:
    """Rotary parameters per attention type (``full_attention`` alone where the config has
    one set, as most families do; Gemma 3 has one per type)."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return rope
    return {"full_attention": rope}


def add_metadata(writer, config: dict, name: str, tq: str) -> None:
    from gguf import LlamaFileType

    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    hd = head_dim(config)
    ropes = _rope_parameters(config)
    rope = ropes.get("full_attention", {})
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(int(hd * config.get("partial_rotary_factor", 1.0)))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    types = config.get("layer_types") or []
    if "sliding_attention" in types and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        if "sliding_attention" in ropes:
            writer.add_rope_freq_base_swa(float(ropes["sliding_attention"].get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(LlamaFileType.MOSTLY_TQ2_0 if tq == "TQ2_0" else LlamaFileType.MOSTLY_TQ1_0)
    if family_of(config).gguf == "bitnet":
        writer.add_string("bitnet.hidden_activation", config.get("hidden_act", "relu2"))


def write_file(path: Path, config: dict, tokenizer_folder: Path, name: str, tq: str, entries: list[Entry], tensors) -> None:
    """Write the GGUF: metadata, tokenizer, every entry's header, then the bytes that the
    ``tensors`` iterable yields (one array per entry, in order), one at a time."""
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(path, family_of(config).gguf)
    add_metadata(writer, config, name, tq)
    add_tokenizer(writer, tokenizer_folder, config["vocab_size"])
    for e in entries:
        if e.kind == "scale":
            writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes)
        elif e.qtype in ("F16", "F32"):
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


def export(ckpt, plan, items, folder: Path, fmt: str, name: str, strict: bool = False, progress=None):
    """Stream the tensors that ``items`` yields (``(name, tensor, make)``, as
    :func:`bitquant.export.source_items`; ``make()`` gives a ternary matrix's packed codes
    and scale) into ``folder/model.gguf``, following ``plan``. Returns the layer stats,
    the output file, the size stats and the GGUF details for the report."""
    tq = TYPES[fmt]
    notes = check_config(ckpt.config)
    family = family_of(ckpt.config)
    arch = family.gguf
    entries = [e for spec in plan.logical.values()
               for e in plan_entries(spec.name, spec.shape, spec.name in plan.quantize, tq, strict, family)]
    planned = {e.hf_name: e for e in entries if e.kind != "scale"}  # each source tensor's own entry
    layers: list[LayerStats] = []
    separate_scale = arch == "bitnet"

    def arrays():
        for i, (hf_name, tensor, make) in enumerate(items, start=1):
            heads = rope_heads(ckpt.config, hf_name)
            entry = planned[hf_name]
            if make is not None:
                t = make()
                logical = plan.logical[hf_name]
                layers.append(LayerStats.of(hf_name, logical.shape, t))
                codes = unpack_ternary(t.packed)
                yield encode_ternary(entry, permute_for_rope(codes, heads) if heads else codes,
                                     1.0 if separate_scale else t.scale)
                if separate_scale:
                    yield np.array([t.scale], dtype=np.float32)
            else:
                yield encode_plain(entry, permute_for_rope(tensor, heads) if heads else tensor, family.norm_offset)
            if progress:
                progress(i, plan.source_count, hf_name)

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
    quantized_bytes = sum(e.nbytes for e in entries if e.kind in ("ternary", "scale"))
    total_bytes = sum(e.nbytes for e in entries)
    size = SizeStats.from_counts(ckpt.source_bytes(), files[0].bytes, quantized_params, quantized_bytes,
                                 plan.total_params, total_bytes)
    info = {
        "file": path.name,
        "type": tq,
        "architecture": arch,
        "bytes_by_type": dict(sorted(by_type.items())),
        "not_tq": [{"name": e.hf_name.removesuffix(".weight"), "stored_as": e.qtype,
                    "reason": f"rows of {e.shape[1]} weights are not a multiple of {QK_TQ}"}
                   for e in ternary if e.qtype != tq],
        "notes": notes,
    }
    return layers, files, size, info
