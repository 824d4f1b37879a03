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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path

import torch

from bitquant import __version__, calibrate, card, evaluate, gates, runtime
from bitquant.blocks import Blocks, layer_index
from bitquant.errors import SourceError, TensorError, UsageError
from bitquant.evaluate import EvalSettings, WindowProgress
from bitquant.fingerprint import conversion_fingerprint, file_sha256, source_fingerprint
from bitquant.formats import gguf, hf_bitnet
from bitquant.journal import Journal
from bitquant.kernels import quantize_pack
from bitquant.methods import mixed
from bitquant.recipe import Recipe, load_recipe
from bitquant.report import ConvertReport, KeptTensor, LayerStats, OutputFile, SizeStats
from bitquant.source import CARRIED_FILES, Checkpoint, open_checkpoint, resolve_source
from bitquant.staging import check_target, staged_output
from bitquant.tensorfile import TensorSpec
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

    @property
    def quantized_modules(self) -> set[str]:
        """Module names (no ``.weight``) of the projections to ternarize."""
        return {name.removesuffix(".weight") for name in self.quantize}


def plan_conversion(ckpt: Checkpoint, recipe: Recipe, keep: dict[str, str] | None = None) -> Plan:
    """Decide every source tensor's fate and every output tensor's spec.

    ``keep`` maps projections (module names) chosen to stay in full precision to the
    reason. Calibrated recipes write tensors block by block (the order calibration
    produces them): every tensor outside the decoder blocks first, then block 0, 1, ...
    """
    keep = keep or {}
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
        elif is_projection and module in keep:
            kept.append(KeptTensor(module, keep[module]))
        elif is_projection:
            check_float(torch.empty((), dtype=spec.dtype), spec.name)
            if len(spec.shape) == 2 and spec.shape[0] % 4 and recipe.indivisible == "keep":
                kept.append(KeptTensor(module, f"{spec.shape[0]} output rows is not a multiple of 4"))
            else:
                out = hf_bitnet.packed_specs(spec.name, spec)  # raises the explanatory TensorError
                quantize.add(spec.name)
        outputs[spec.name] = [s.name for s in out]
        specs.extend(out)
    if recipe.calibrated:
        position = {s.name: i for i, s in enumerate(specs)}
        specs.sort(key=lambda s: (layer_index(s.name), position[s.name]))
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
    calib_text: str | Path | None = None,
    device: str = "auto",
) -> ConvertReport:
    """Convert ``model`` (Hub id, folder or ``embedded:NAME``) into a ternary checkpoint at ``out``.

    With ``eval_text``, the source and the result are evaluated on the same tokens (the
    recipe's ``eval_*`` settings) and the report gains ``perplexity`` and, for the gates the
    recipe sets, ``gates``. A failed gate does not stop the output being written; check
    ``report.gates_failed()``. Calibrated recipes (``recipe.calibrated``) read
    ``calib_text`` (default: the bundled text) and run on ``device``. When ``out`` already holds a conversion with the same
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
    if recipe.calibrated and recipe.format in gguf.TYPES:
        raise UsageError(
            f"recipe {recipe.name!r} is calibrated, and calibrated weights are written in the transformers layout "
            "only; drop --format, or use the absmean recipe for GGUF"
        )
    if calib_text is not None and not recipe.calibrated:
        raise UsageError(f"--calib-text is used by calibrated recipes only; recipe {recipe.name!r} needs none "
                         "(pass e.g. --config gptq)")
    device = runtime.resolve_device(device)
    source = resolve_source(model, revision=revision, token=token)
    ckpt = open_checkpoint(source.path)
    if recipe.format in gguf.TYPES:
        gguf.check_config(ckpt.config)
    plan = plan_conversion(ckpt, recipe)
    settings = EvalSettings(context=recipe.eval_context, stride=recipe.eval_stride, max_tokens=recipe.eval_max_tokens)
    tokens = evaluate.tokenize_for(ckpt.path, eval_text, settings) if eval_text is not None else None
    calib = None
    if recipe.calibrated:
        calib = calibrate.load_calibration(ckpt.path, calib_text, recipe.calib_tokens, recipe.calib_context)
        if tokens is not None and calib.sha256 == tokens.sha256:
            raise UsageError("--calib-text and --eval-text are the same file; evaluate on held-out text")
    key = {"text_sha256": tokens.sha256} if tokens else None
    if calib is not None:
        key = {**(key or {}), "calib_text_sha256": calib.sha256, "device": device}
    fingerprint = conversion_fingerprint(__version__, recipe.sha256(), source_fingerprint(source, ckpt), key)

    if not force:
        existing = up_to_date(out, fingerprint)
        if existing is not None:
            published_here = (existing.published or {}).get("repo_id") == push_to_hub
            if push_to_hub and not existing.gates_failed() and not published_here:  # e.g. the last upload failed
                publish(out, existing, push_to_hub, token, push_private, push_revision, push_create_pr)
            return existing
    check_target(out.absolute(), overwrite or force)

    calibration = None
    calib_started = time.monotonic()
    if calib is not None:
        blocks = Blocks(ckpt, device)
        plan, calibration = _calibrated_plan(ckpt, recipe, plan, blocks, calib, progress)
    shards = hf_bitnet.plan_shards(plan.specs, max_shard_size)

    with staged_output(out, fingerprint, overwrite or force) as tmp:
        journal = Journal.load(tmp, fingerprint)
        reused = sorted(journal.shards)
        perplexity = gate_results = None
        if recipe.format in gguf.TYPES:
            layers, files, size, gguf_info = gguf.export(ckpt, plan.quantize, plan.total_params, tmp, recipe.format,
                                                          recipe.eps, source.spec, strict, progress)
        else:
            gguf_info = None
            if calib is None:
                items = _absmean_items(ckpt, plan, recipe)
            else:
                items = _calibrated_items(ckpt, plan, recipe, blocks, calib, calibration)
            layers, files = _write_weights(plan, shards, tmp, items, journal, progress)
            if calibration is not None:
                calibration["seconds"] = round(time.monotonic() - calib_started, 3)
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
            calibration=calibration,
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


#: A tensor to write: (source name, tensor, None) as it is, or (source name, FP weight,
#: make) where ``make()`` returns its quantization (``packed``, ``scale`` and statistics).
Item = tuple[str, torch.Tensor, Callable[[], object] | None]


def _absmean_items(ckpt: Checkpoint, plan: Plan, recipe: Recipe) -> Iterator[Item]:
    """Source tensors in file order; projections are ternarized (absmean) when written."""
    for name, tensor in ckpt.iter_tensors():
        if name in plan.quantize:
            yield name, tensor, lambda t=tensor, n=name: quantize_pack(t, eps=recipe.eps, name=n)
        else:
            yield name, tensor, None


def _calibrated_items(ckpt: Checkpoint, plan: Plan, recipe: Recipe, blocks: Blocks,
                      calib: calibrate.Calibration, calibration: dict) -> Iterator[Item]:
    """Tensors outside the decoder blocks, then each block as calibration finishes it."""
    outside = ((n, t, None) for n, t in ckpt.iter_tensors() if layer_index(n) < 0)
    log = calibrate.CalibrationLog()
    layers = calibrate.quantize_layers(blocks, calib, plan.quantized_modules, method=recipe.method, equalize_scales=recipe.equalize,
                                       damp=recipe.damp, eps=recipe.eps, log=log, tune_steps=recipe.tune_steps)
    inside = ((n, t, None if q is None else (lambda q=q: q)) for n, t, q in layers)
    yield from chain(outside, inside)
    calibration["transforms"] = log.transforms
    calibration["tuning"] = log.tuning


def _calibrated_plan(ckpt: Checkpoint, recipe: Recipe, plan: Plan, blocks: Blocks,
                     calib: calibrate.Calibration, progress: ProgressFn | None) -> tuple[Plan, dict]:
    """The plan after mixed precision has chosen what to keep, and the report's
    ``calibration`` section (completed as the layers are quantized)."""
    info = {
        "text": calib.path, "text_sha256": calib.sha256, "tokens": calib.tokens, "sequences": int(calib.ids.shape[0]),
        "context": int(calib.ids.shape[1]), "method": recipe.method, "equalize": recipe.equalize, "damp": recipe.damp,
        "tune_steps": recipe.tune_steps, "device": blocks.device, "seconds": 0.0, "transforms": [], "tuning": [],
        "mixed_precision": None,
    }
    if recipe.target_bits_per_weight is not None:
        targets = plan.quantized_modules
        damage = calibrate.measure_damage(blocks, calib, targets, progress=progress)
        sources = {s.name.removesuffix(".weight"): s for _, s in ckpt.iter_specs()}
        params = {unit: sum(sources[m].numel for m in members) for unit, (_, members) in damage.items()}
        full_bits = 8 * sources[next(iter(targets))].dtype.itemsize
        choices = mixed.choose({u: kl for u, (kl, _) in damage.items()}, params, recipe.target_bits_per_weight, full_bits)
        keep = {}
        for c in choices:
            if c.kept:
                for module in damage[c.name][1]:
                    keep[module] = (f"mixed precision: ternarizing {c.name} alone moves the output distribution by "
                                    f"KL {c.damage:.3g} nats (rank {c.rank} of {len(choices)} by KL per extra bit; budget "
                                    f"{recipe.target_bits_per_weight:g} bits/weight)")
        info["mixed_precision"] = {
            "target_bits_per_weight": recipe.target_bits_per_weight,
            "bits_per_projection_weight": round(mixed.bits_per_weight(choices, full_bits), 4),
            "kept_bits_per_weight": full_bits,
            "kept_units": [c.name for c in choices if c.kept],
            "kept": sorted(keep),
            "kl_by_unit": {c.name: round(c.damage, 6) for c in choices},
        }
        plan = plan_conversion(ckpt, recipe, keep)
    return plan, info


def _write_weights(plan: Plan, shards: list, folder: Path, items: Iterator[Item], journal: Journal,
                   progress: ProgressFn | None) -> tuple[list[LayerStats], list[OutputFile]]:
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
        for i, (name, tensor, make) in enumerate(items, start=1):
            if all(writer.skips(o) for o in plan.outputs[name]):
                pass
            elif make is not None:
                t = make()
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
