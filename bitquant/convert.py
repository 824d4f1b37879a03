"""convert(): source checkpoint -> ternary checkpoint, streamed tensor by tensor.

Data flows one way: source (Hub/local/embedded) -> tensor stream over memory-mapped
safetensors -> absmean quantizer -> packer -> sharded streaming writer, with the report
gathered on the way. The output layout is planned from the source headers before any
weight is read, so each output shard's header is written first and its tensors follow as
they are computed: peak memory is a few times the largest tensor, never the model.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from bitquant import __version__, card, evaluate
from bitquant.errors import SourceError, TensorError
from bitquant.evaluate import EvalSettings, WindowProgress
from bitquant.formats import hf_bitnet
from bitquant.recipe import Recipe, load_recipe
from bitquant.report import ConvertReport, KeptTensor, LayerStats, OutputFile, SizeStats
from bitquant.source import CARRIED_FILES, Checkpoint, ModelSource, open_checkpoint, resolve_source
from bitquant.staging import check_target, staged_output
from bitquant.tensorfile import TensorSpec
from bitquant.ternary import check_float, quantize_absmean

#: Default largest output shard, in bytes (as transformers' save_pretrained).
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

#: Evaluation settings of ``convert --eval-text``: the first 16,384 tokens, windows of 512.
DEFAULT_EVAL = EvalSettings(context=512, stride=512, max_tokens=16384)

#: Called after each source tensor: (tensors done, tensors in all, name just done).
ProgressFn = Callable[[int, int, str], None]


@dataclass
class Plan:
    """What happens to each source tensor, decided from headers alone."""

    quantize: set[str]  # source weight names to ternarize
    specs: list[TensorSpec]  # output tensors, in write order
    kept: list[KeptTensor]
    source_count: int  # source tensors
    total_params: int  # every weight of the model


def plan_conversion(ckpt: Checkpoint, recipe: Recipe) -> Plan:
    """Decide every source tensor's fate and every output tensor's spec."""
    quantize: set[str] = set()
    specs: list[TensorSpec] = []
    kept: list[KeptTensor] = []
    names: set[str] = set()
    total_params = 0
    for _, spec in ckpt.iter_specs():
        names.add(spec.name)
        total_params += spec.numel
        module, _, leaf = spec.name.rpartition(".")
        is_projection = leaf == "weight" and module.rsplit(".", 1)[-1] in recipe.projections and ".layers." in spec.name
        if not is_projection:
            specs.append(spec)
            continue
        if not recipe.is_target(module):
            kept.append(KeptTensor(module, "excluded by the recipe"))
            specs.append(spec)
            continue
        check_float(torch.empty((), dtype=spec.dtype), spec.name)
        if len(spec.shape) != 2 or spec.shape[0] % 4:
            if recipe.indivisible == "keep" and len(spec.shape) == 2:
                kept.append(KeptTensor(module, f"{spec.shape[0]} output rows is not a multiple of 4"))
                specs.append(spec)
                continue
            hf_bitnet.packed_specs(spec.name, spec)  # raises the explanatory TensorError
        quantize.add(spec.name)
        specs.extend(hf_bitnet.packed_specs(spec.name, spec))
    if not quantize:
        raise TensorError(
            f"no projection of {ckpt.path} matches the recipe, so nothing would be quantized; check its exclude patterns"
        )
    if not ckpt.tie_word_embeddings and "lm_head.weight" not in names:
        raise SourceError(
            f"{ckpt.path} has untied embeddings but no lm_head.weight; the checkpoint is incomplete, download it again"
        )
    return Plan(quantize, specs, kept, len(names), total_params)


def convert(
    model: str,
    out: str | Path,
    *,
    recipe: Recipe | None = None,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: ProgressFn | None = None,
    eval_text: str | Path | None = None,
    eval_settings: EvalSettings = DEFAULT_EVAL,
    eval_progress: WindowProgress | None = None,
) -> ConvertReport:
    """Convert ``model`` (Hub id, folder or ``embedded:NAME``) into a ternary checkpoint at ``out``.

    With ``eval_text``, the source and the result are evaluated on the same tokens and the
    report gains a ``perplexity`` object (see :func:`bitquant.evaluate.compare`).
    Returns the report, which is also written to ``out/report.json`` with a model card in
    ``out/README.md``. ``out`` appears only when everything succeeded.
    """
    started = time.monotonic()
    recipe = recipe or load_recipe()
    out = Path(out)
    check_target(out.absolute(), overwrite)  # fail before any download
    source = resolve_source(model, revision=revision, token=token)
    ckpt = open_checkpoint(source.path)
    plan = plan_conversion(ckpt, recipe)
    shards = hf_bitnet.plan_shards(plan.specs, max_shard_size)
    tokens = evaluate.tokenize_for(ckpt.path, eval_text, eval_settings) if eval_text is not None else None

    with staged_output(out, overwrite) as tmp:
        layers, files = _write_weights(ckpt, plan, shards, tmp, recipe, progress)
        kept_names = [k.name for k in plan.kept]
        hf_bitnet.write_config(tmp, ckpt.config, kept_names)
        hf_bitnet.write_index(tmp, shards)
        hf_bitnet.copy_files(ckpt.path, tmp, CARRIED_FILES)
        files += _hash_small_files(tmp, exclude={f.name for f in files})
        perplexity = None
        if tokens is not None:
            perplexity = evaluate.compare(ckpt.path, tmp, tokens, settings=eval_settings, progress=eval_progress)
        report = ConvertReport(
            bitquant_version=__version__,
            source=source.to_dict(),
            architecture=ckpt.architecture,
            recipe=recipe.to_dict(),
            recipe_sha256=recipe.sha256(),
            format=recipe.format,
            size=_size_stats(ckpt, plan, shards, files, layers),
            layers=layers,
            kept_full_precision=plan.kept,
            files=sorted(files, key=lambda f: f.name),
            versions=_versions(),
            elapsed_seconds=0.0,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            perplexity=perplexity,
            notes=_notes(layers),
        )
        report.elapsed_seconds = round(time.monotonic() - started, 3)
        (tmp / "report.json").write_text(report.to_json(), encoding="utf-8")
        (tmp / "README.md").write_text(card.render(report, source), encoding="utf-8")
    return report


def _write_weights(
    ckpt: Checkpoint, plan: Plan, shards: list, folder: Path, recipe: Recipe, progress: ProgressFn | None
) -> tuple[list[LayerStats], list[OutputFile]]:
    writer = hf_bitnet.ShardedWriter(folder, shards)
    layers: list[LayerStats] = []
    try:
        for i, (name, tensor) in enumerate(ckpt.iter_tensors(), start=1):
            if name in plan.quantize:
                t = quantize_absmean(tensor, eps=recipe.eps, name=name)
                layers.append(
                    LayerStats(name.removesuffix(".weight"), tuple(tensor.shape), t.scale, t.zero_fraction, t.relative_error, t.scale_clamped)
                )
                for out_name, out_tensor in hf_bitnet.encode(name, t.codes, t.scale, tensor.dtype):
                    writer.write(out_name, out_tensor)
            else:
                writer.write(name, tensor)
            del tensor
            if progress:
                progress(i, plan.source_count, name)
        return layers, writer.close()
    except BaseException:
        writer.abort()
        raise


def _hash_small_files(folder: Path, exclude: set[str]) -> list[OutputFile]:
    files = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name not in exclude:
            files.append(OutputFile(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()))
    return files


def _size_stats(ckpt: Checkpoint, plan: Plan, shards: list, files: list[OutputFile], layers: list[LayerStats]) -> SizeStats:
    shard_names = {s.filename for s in shards}
    output_bytes = sum(f.bytes for f in files if f.name in shard_names)
    quantized_params = sum(l.shape[0] * l.shape[1] for l in layers)
    quantized_specs = [s for s in plan.specs if s.name in plan.quantize or s.name.removesuffix(hf_bitnet.SCALE_SUFFIX) in plan.quantize]
    quantized_bytes = sum(s.nbytes for s in quantized_specs)
    total_tensor_bytes = sum(s.nbytes for s in plan.specs)
    source_bytes = ckpt.source_bytes()
    return SizeStats(
        source_bytes=source_bytes,
        output_bytes=output_bytes,
        compression_ratio=round(source_bytes / output_bytes, 4),
        quantized_params=quantized_params,
        quantized_bytes=quantized_bytes,
        bits_per_weight_quantized=round(8 * quantized_bytes / quantized_params, 4),
        total_params=plan.total_params,
        total_tensor_bytes=total_tensor_bytes,
        bits_per_weight_model=round(8 * total_tensor_bytes / plan.total_params, 4),
    )


def _notes(layers: list[LayerStats]) -> list[str]:
    notes = []
    clamped = [l.name for l in layers if l.scale_clamped]
    if clamped:
        notes.append(f"{len(clamped)} matrices had mean|W| below eps and were given s = eps: {', '.join(clamped[:5])}")
    return notes


def _versions() -> dict[str, str]:
    import transformers

    return {"bitquant": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
