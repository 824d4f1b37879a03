"""convert(): source checkpoint -> ternary checkpoint, streamed tensor by tensor.

Data flows one way: source (Hub/local/embedded) -> tensor stream over memory-mapped
safetensors -> absmean quantizer (or a calibrated method) -> packer -> sharded streaming
writer, with the report gathered on the way. The output layout is planned from the
source headers before any weight is read (:mod:`bitquant.plan`), and written, measured and
described by :mod:`bitquant.export`, which ``heal`` shares.

Around that core: a conversion fingerprint (source commit or file stats, recipe,
bitquant version, eval text) makes a repeated run a no-op, names the staging folder so an
interrupted run resumes from its finished shards, and is recorded in the report.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from bitquant import __version__, calibrate, export, runtime
from bitquant.blocks import Blocks, layer_index
from bitquant.errors import UsageError
from bitquant.evaluate import WindowProgress
from bitquant.export import REPORT, Item, ProgressFn  # noqa: F401  (REPORT: part of this module's API)
from bitquant.fingerprint import conversion_fingerprint, source_fingerprint
from bitquant.formats import gguf, hf_bitnet
from bitquant.journal import Journal
from bitquant.methods import mixed
from bitquant.plan import Plan, plan_conversion
from bitquant.recipe import Recipe, load_recipe
from bitquant.report import ConvertReport
from bitquant.source import Checkpoint, open_checkpoint, resolve_source
from bitquant.staging import check_target, staged_output

#: Default largest output shard, in bytes (as transformers' save_pretrained).
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


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
    stream_eval: bool | None = None,
) -> ConvertReport:
    """Convert ``model`` (Hub id, folder or ``embedded:NAME``) into a ternary checkpoint at ``out``.

    With ``eval_text``, the source and the result are evaluated on the same tokens (the
    recipe's ``eval_*`` settings) and the report gains ``perplexity`` and, for the gates the
    recipe sets, ``gates``. A failed gate does not stop the output being written; check
    ``report.gates_failed()``. Calibrated recipes (``recipe.calibrated``) read
    ``calib_text`` (default: the bundled text) and run on ``device``. When ``out`` already holds a conversion with the same
    fingerprint, nothing is done and its report is returned with ``up_to_date`` set, unless
    ``force``. ``push_to_hub`` uploads the finished folder unless a gate failed.
    ``stream_eval`` forces (True) or forbids (False) block-streamed evaluation (default: when
    the two models do not fit comfortably in memory).
    Returns the report, also written to ``out/report.json`` with a model card in ``out/README.md``.
    """
    started = time.monotonic()
    recipe = recipe or load_recipe()
    out = Path(out)
    # Fail before any download: the parent must exist, and an existing OUT that is not a
    # bitquant output needs --overwrite (one that is may turn out to be up to date).
    check_target(out.absolute(), overwrite or force or (out / REPORT).is_file())
    export.check_eval_options(recipe, eval_text)
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
    tokens = export.eval_tokens(ckpt.path, eval_text, recipe)
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
        existing = export.up_to_date(out, fingerprint)
        if existing is not None:
            export.publish_if_needed(out, existing, push_to_hub, token, push_private, push_revision, push_create_pr)
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
        items = None if calib is None else _calibrated_items(ckpt, plan, recipe, blocks, calib, calibration)
        written = export.write_model(ckpt, plan, recipe, tmp, journal, shards, source.spec, items=items,
                                     strict=strict, progress=progress)
        if calibration is not None:
            calibration["seconds"] = round(time.monotonic() - calib_started, 3)
        perplexity = gate_results = None
        if tokens is not None:
            perplexity, gate_results = export.measure(ckpt.path, tmp, tokens, recipe, eval_progress, stream_eval)
        report = export.new_report(source, ckpt, recipe.to_dict(), recipe.sha256(), fingerprint, recipe.format, plan,
                                   written, reused, shards, max_shard_size, perplexity=perplexity, gates=gate_results,
                                   calibration=calibration)
        export.finish(tmp, report, source, written, journal, started)

    if push_to_hub and not report.gates_failed():
        export.publish(out, report, push_to_hub, token, push_private, push_revision, push_create_pr)
    return report


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
