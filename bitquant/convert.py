"""convert(): source checkpoint -> ternary checkpoint, streamed tensor by tensor.

Data flows one way: source (Hub/local/embedded) -> tensor stream over memory-mapped
safetensors -> absmean quantizer -> packer -> sharded streaming writer, with the report
gathered on the way. The output layout is planned from the source headers before any
weight is read, so each output shard's header is written first and its tensors follow as
they are computed: peak memory is a few times the largest tensor, never the model.

Around that core: a conversion fingerprint (source commit or file stats, recipe,
bitquant version, eval text) makes a repeated run a no-op, names the staging folder so an
interrupted run resumes from its finished shards, and is recorded in the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from bitquant import __version__, card, evaluate, gates
from bitquant.errors import SourceError, TensorError, UsageError
from bitquant.evaluate import EvalSettings, WindowProgress
from bitquant.fingerprint import conversion_fingerprint, file_sha256, source_fingerprint
from bitquant.formats import gguf, hf_bitnet
from bitquant.journal import Journal
from bitquant.recipe import Recipe, load_recipe
from bitquant.report import ConvertReport, KeptTensor, LayerStats, OutputFile, SizeStats
from bitquant.source import CARRIED_FILES, Checkpoint, open_checkpoint, resolve_source
from bitquant.staging import check_target, staged_output
from bitquant.tensorfile import TensorSpec
from bitquant.kernels import quantize_pack
from bitquant.ternary import check_float

#: Default largest output shard, in bytes (as transformers' save_pretrained).
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

REPORT = "report.json"

#: Called after each source tensor: (tensors done, tensors in all, name just done).
ProgressFn = Callable[[int, int, str], None]


@dataclass
class Plan:
    """What happens to each source tensor, decided from headers alone."""

    quantize: set[str]  # source weight names to ternarize
    outputs: dict[str, list[str]]  # source name -> output names
    specs: list[TensorSpec]  # output tensors, in write order
    kept: list[KeptTensor]
    source_count: int  # source tensors
    total_params: int  # every weight of the model


def plan_conversion(ckpt: Checkpoint, recipe: Recipe) -> Plan:
    """Decide every source tensor's fate and every output tensor's spec."""
    quantize: set[str] = set()
    outputs: dict[str, list[str]] = {}
    specs: list[TensorSpec] = []
    kept: list[KeptTensor] = []
    total_params = 0
    for _, spec in ckpt.iter_specs():
        total_params += spec.numel
        module, _, leaf = spec.name.rpartition(".")
        is_projection = leaf == "weight" and module.rsplit(".", 1)[-1] in recipe.projections and ".layers." in spec.name
        out = [spec]
        if is_projection and not recipe.is_target(module):
            kept.append(KeptTensor(module, "excluded by the recipe"))
        elif is_projection:
            check_float(torch.empty((), dtype=spec.dtype), spec.name)
            if len(spec.shape) == 2 and spec.shape[0] % 4 and recipe.indivisible == "keep":
                kept.append(KeptTensor(module, f"{spec.shape[0]} output rows is not a multiple of 4"))
            else:
                out = hf_bitnet.packed_specs(spec.name, spec)  # raises the explanatory TensorError
                quantize.add(spec.name)
        outputs[spec.name] = [s.name for s in out]
        specs.extend(out)
    if not quantize:
        raise TensorError(
            f"no projection of {ckpt.path} matches the recipe, so nothing would be quantized; check its exclude patterns"
        )
    if not ckpt.tie_word_embeddings and "lm_head.weight" not in outputs:
        raise SourceError(
            f"{ckpt.path} has untied embeddings but no lm_head.weight; the checkpoint is incomplete, download it again"
        )
    return Plan(quantize, outputs, specs, kept, len(outputs), total_params)


def convert(
    model: str,
    out: str | Path,
    *,
    recipe: Recipe | None = None,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    strict: bool = False,
    progress: ProgressFn | None = None,
    eval_text: str | Path | None = None,
    eval_progress: WindowProgress | None = None,
    push_to_hub: str | None = None,
    push_private: bool = False,
    push_revision: str | None = None,
    push_create_pr: bool = False,
) -> ConvertReport:
    """Convert ``model`` (Hub id, folder or ``embedded:NAME``) into a ternary checkpoint at ``out``.

    With ``eval_text``, the source and the result are evaluated on the same tokens (the
    recipe's ``eval_*`` settings) and the report gains ``perplexity`` and, for the gates the
    recipe sets, ``gates``. A failed gate does not stop the output being written; check
    ``report.gates_failed()``. When ``out`` already holds a conversion with the same
    fingerprint, nothing is done and its report is returned with ``up_to_date`` set, unless
    ``force``. ``push_to_hub`` uploads the finished folder unless a gate failed.
    Returns the report, also written to ``out/report.json`` with a model card in ``out/README.md``.
    """
    started = time.monotonic()
    recipe = recipe or load_recipe()
    out = Path(out)
    # Fail before any download: the parent must exist, and an existing OUT that is not a
    # bitquant output needs --overwrite (one that is may turn out to be up to date).
    check_target(out.absolute(), overwrite or force or (out / REPORT).is_file())
    if recipe.gates and eval_text is None:
        raise UsageError("quality gates (--max-ppl-ratio, --max-kl) need --eval-text FILE to measure against")
    if recipe.format in gguf.TYPES and eval_text is not None:
        raise UsageError(
            "--eval-text measures the transformers layout; convert without --format to evaluate, "
            "or measure the GGUF with llama.cpp (see README)"
        )
    source = resolve_source(model, revision=revision, token=token)
    ckpt = open_checkpoint(source.path)
    if recipe.format in gguf.TYPES:
        gguf.check_config(ckpt.config)
    plan = plan_conversion(ckpt, recipe)
    shards = hf_bitnet.plan_shards(plan.specs, max_shard_size)
    settings = EvalSettings(context=recipe.eval_context, stride=recipe.eval_stride, max_tokens=recipe.eval_max_tokens)
    tokens = evaluate.tokenize_for(ckpt.path, eval_text, settings) if eval_text is not None else None
    eval_key = {"text_sha256": tokens.sha256} if tokens else None
    fingerprint = conversion_fingerprint(__version__, recipe.sha256(), source_fingerprint(source, ckpt), eval_key)

    if not force:
        existing = up_to_date(out, fingerprint)
        if existing is not None:
            published_here = (existing.published or {}).get("repo_id") == push_to_hub
            if push_to_hub and not existing.gates_failed() and not published_here:  # e.g. the last upload failed
                publish(out, existing, push_to_hub, token, push_private, push_revision, push_create_pr)
            return existing
    check_target(out.absolute(), overwrite or force)

    with staged_output(out, fingerprint, overwrite or force) as tmp:
        journal = Journal.load(tmp, fingerprint)
        reused = sorted(journal.shards)
        perplexity = gate_results = None
        if recipe.format in gguf.TYPES:
            layers, files, size, gguf_info = gguf.export(ckpt, plan.quantize, plan.total_params, tmp, recipe.format,
                                                          recipe.eps, source.spec, strict, progress)
        else:
            gguf_info = None
            layers, files = _write_weights(ckpt, plan, shards, tmp, recipe, journal, progress)
            hf_bitnet.write_config(tmp, ckpt.config, [k.name for k in plan.kept])
            hf_bitnet.write_index(tmp, shards)
            hf_bitnet.copy_files(ckpt.path, tmp, CARRIED_FILES)
            size = _size_stats(ckpt, plan, shards, files, layers)
        if tokens is not None:
            perplexity = evaluate.compare(ckpt.path, tmp, tokens, settings=settings, progress=eval_progress)
            gate_results = [g.__dict__ for g in gates.check(recipe.gates, perplexity)]
        report = ConvertReport(
            bitquant_version=__version__,
            source=source.to_dict(),
            architecture=ckpt.architecture,
            recipe=recipe.to_dict(),
            recipe_sha256=recipe.sha256(),
            fingerprint=fingerprint,
            format=recipe.format,
            size=size,
            layers=layers,
            kept_full_precision=plan.kept,
            files=[],
            versions=_versions(),
            elapsed_seconds=0.0,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            perplexity=perplexity,
            gates=gate_results,
            resumed_shards=reused,
            notes=_notes(layers, reused, len(shards)),
            gguf=gguf_info,
        )
        (tmp / "README.md").write_text(card.render(report, source), encoding="utf-8")
        journal.remove()
        shard_names = {f.name for f in files}
        report.files = sorted(files + _hash_files(tmp, exclude=shard_names | {REPORT}), key=lambda f: f.name)
        report.elapsed_seconds = round(time.monotonic() - started, 3)
        (tmp / REPORT).write_text(report.to_json(), encoding="utf-8")

    if push_to_hub and not report.gates_failed():
        report.published = publish(out, report, push_to_hub, token, push_private, push_revision, push_create_pr)
    return report


def publish(out: Path, report: ConvertReport, repo_id: str, token, private, revision, create_pr) -> dict:
    """Upload ``out`` and record where it went in the local ``report.json``."""
    from bitquant.publish import push_folder

    message = f"bitquant {__version__}: ternary ({report.recipe['name']}) conversion of {report.source['id']}"
    url = push_folder(out, repo_id, token=token, private=private, revision=revision, create_pr=create_pr, message=message)
    published = {"repo_id": repo_id, "revision": revision or "main", "create_pr": create_pr, "url": url}
    report.published = published
    (out / REPORT).write_text(report.to_json(), encoding="utf-8")
    return published


def up_to_date(out: Path, fingerprint: str) -> ConvertReport | None:
    """The report of ``out`` if it holds a complete conversion with this fingerprint."""
    try:
        report = ConvertReport.from_dict(json.loads((out / REPORT).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if report.fingerprint != fingerprint:
        return None
    for f in report.files:
        p = out / f.name
        if not p.is_file() or p.stat().st_size != f.bytes:
            return None
    report.up_to_date = True
    return report


def _write_weights(
    ckpt: Checkpoint, plan: Plan, shards: list, folder: Path, recipe: Recipe, journal: Journal, progress: ProgressFn | None
) -> tuple[list[LayerStats], list[OutputFile]]:
    """Quantize and write every tensor, skipping those of shards the journal has finished."""
    layers: dict[str, LayerStats] = {}
    shard_layers: dict[str, list[LayerStats]] = {}
    for info in journal.shards.values():
        for d in info["layers"]:
            layers[d["name"]] = LayerStats.from_dict(d)
    done = {name: OutputFile(name, info["bytes"], info["sha256"]) for name, info in journal.shards.items()}

    def finished(shard: OutputFile) -> None:
        journal.record(shard.name, shard.bytes, shard.sha256, [l.__dict__ for l in shard_layers.pop(shard.name, [])])

    writer = hf_bitnet.ShardedWriter(folder, shards, done=done, on_shard=finished)
    try:
        for i, (name, tensor) in enumerate(ckpt.iter_tensors(), start=1):
            if all(writer.skips(o) for o in plan.outputs[name]):
                pass
            elif name in plan.quantize:
                t = quantize_pack(tensor, eps=recipe.eps, name=name)
                stat = LayerStats.of(name, tensor.shape, t)
                layers[stat.name] = stat
                shard_layers.setdefault(writer.shard_of(name), []).append(stat)
                for out_name, out_tensor in hf_bitnet.encode(name, t.packed, t.scale, tensor.dtype):
                    writer.write(out_name, out_tensor)
            else:
                writer.write(name, tensor)
            del tensor
            if progress:
                progress(i, plan.source_count, name)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    order = {n: i for i, n in enumerate(plan.outputs)}
    return sorted(layers.values(), key=lambda l: order[l.name + ".weight"]), files


def _hash_files(folder: Path, exclude: set[str]) -> list[OutputFile]:
    return [
        OutputFile(p.name, p.stat().st_size, file_sha256(p))
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in exclude
    ]


def _size_stats(ckpt: Checkpoint, plan: Plan, shards: list, files: list[OutputFile], layers: list[LayerStats]) -> SizeStats:
    shard_names = {s.filename for s in shards}
    output_bytes = sum(f.bytes for f in files if f.name in shard_names)
    quantized_params = sum(l.shape[0] * l.shape[1] for l in layers)
    quantized_names = {o for name in plan.quantize for o in plan.outputs[name]}
    quantized_bytes = sum(s.nbytes for s in plan.specs if s.name in quantized_names)
    total_tensor_bytes = sum(s.nbytes for s in plan.specs)
    return SizeStats.from_counts(ckpt.source_bytes(), output_bytes, quantized_params, quantized_bytes,
                                 plan.total_params, total_tensor_bytes)


def _notes(layers: list[LayerStats], reused: list[str], n_shards: int) -> list[str]:
    notes = []
    clamped = [l.name for l in layers if l.scale_clamped]
    if clamped:
        notes.append(f"{len(clamped)} matrices had mean|W| below eps and were given s = eps: {', '.join(clamped[:5])}")
    if reused:
        notes.append(f"resumed an interrupted run: {len(reused)} of {n_shards} shards reused after their sha256 was checked")
    return notes


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"bitquant": __version__, "torch": torch.__version__, "transformers": version("transformers")}
