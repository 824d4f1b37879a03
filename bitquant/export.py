"""Writing a planned ternary output into a staging folder, and finishing it: shards (or a
GGUF), config, index, carried files, the evaluation and gates, the model card and
``report.json``; then the up-to-date check and publishing.

Shared by ``convert`` and ``heal``: both plan an output from a checkpoint's headers
(:mod:`bitquant.plan`), stream its tensors through here, and describe the result with one
:class:`~bitquant.report.ConvertReport`. Tensors are written one at a time, so memory stays
near the largest tensor whatever the model size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from bitquant import __version__, card, evaluate, gates, inputs
from bitquant.errors import TensorError, UsageError
from bitquant.evaluate import EvalSettings, WindowProgress
from bitquant.fingerprint import file_sha256
from bitquant.formats import gguf, hf_bitnet
from bitquant.journal import Journal
from bitquant.kernels import quantize_pack
from bitquant.plan import Plan
from bitquant.recipe import Recipe
from bitquant.report import ConvertReport, LayerStats, OutputFile, SizeStats
from bitquant.source import CARRIED_FILES, Checkpoint, ModelSource
from bitquant.ternary import ternary_values
from bitquant.text import Tokens

REPORT = "report.json"

#: More output shards than this get a note (e.g. --max-shard-size 1KB wrote 482 files).
MANY_SHARDS = 100

#: Called after each source tensor: (tensors done, tensors in all, name just done).
ProgressFn = Callable[[int, int, str], None]

#: A tensor to write: (source name, tensor, None) as it is, or (source name, FP weight,
#: make) where ``make()`` returns its quantization (``packed``, ``scale`` and statistics).
Item = tuple[str, torch.Tensor, Callable[[], object] | None]


@dataclass
class Written:
    """What :func:`write_model` put into the staging folder."""

    layers: list[LayerStats]
    files: list[OutputFile]  # model files (shards or the GGUF)
    size: SizeStats
    gguf: dict | None


def source_items(ckpt: Checkpoint, plan: Plan, recipe: Recipe) -> Iterator[Item]:
    """Source tensors in file order, each ternary one with how it becomes ternary
    (:mod:`bitquant.inputs`): copied from a packed source; absmean for masters; absmean for
    FP models, except that a matrix already holding only {-c, 0, +c} keeps its codes and c.
    Tensors of ternary-trained inputs are checked for NaN/Inf and all-zero matrices."""
    layout = plan.layout
    scales: dict[str, float] = {}
    if layout.kind == "packed":
        stored = ckpt.read([n + hf_bitnet.SCALE_SUFFIX for n in plan.quantize])
        scales = {n: inputs.stored_scale(stored[n + hf_bitnet.SCALE_SUFFIX], layout.linear_class, n) for n in plan.quantize}
    for name, tensor in ckpt.iter_tensors():
        if not plan.outputs[name]:
            continue  # a packed source's weight_scale, consumed by its weight
        if layout.ternary_trained and name not in plan.quantize:  # ternary ones are checked as they are converted
            inputs.check_tensor(name, tensor)
        if name not in plan.quantize:
            yield name, tensor, None
        elif layout.kind == "packed":
            copy = inputs.copy_packed if tensor.dtype == torch.uint8 else inputs.copy_dense_codes
            yield name, tensor, lambda t=tensor, n=name, c=copy: c(t, scales[n], n)
        elif layout.kind == "master":
            yield name, tensor, lambda t=tensor, n=name: _master_absmean(t, recipe.eps, n)
        else:
            yield name, tensor, lambda t=tensor, n=name: _fp_ternary(t, recipe.eps, n)


def _master_absmean(w: torch.Tensor, eps: float, name: str):
    t = quantize_pack(w, eps=eps, name=name)
    if t.scale_clamped:
        raise TensorError(f"tensor {name!r} of this ternary-trained model is all zeros (mean|W| < {eps:g}, every code 0); "
                          "the checkpoint is broken (download it again, or use another revision)")
    return t


def _fp_ternary(w: torch.Tensor, eps: float, name: str):
    found = ternary_values(w)
    if found is not None:
        return inputs.copy_ternary_values(found[0], found[1], name)
    return quantize_pack(w, eps=eps, name=name)


def input_info(plan: Plan, layers: list[LayerStats], fmt: str) -> dict:
    """The report's ``input`` section: what kind of checkpoint was converted, and whether
    the conversion added any quantization error."""
    copied = sum(1 for l in layers if l.copied)
    kind = plan.layout.kind
    if kind == "fp" and layers and copied == len(layers):
        kind = "ternary-dense"
    return {
        "kind": kind,
        "label": inputs.KIND_LABELS[kind],
        "source_linear_class": plan.layout.linear_class,
        "output_linear_class": None if fmt in gguf.TYPES else plan.linear_class,
        "copied_matrices": copied,
        "absmean_matrices": len(layers) - copied,
        "quantization_error_added": kind == "fp" and copied < len(layers),
    }


def write_model(ckpt: Checkpoint, plan: Plan, recipe: Recipe, folder: Path, journal: Journal, shards: list,
                source_spec: str, *, items: Iterator[Item] | None = None, strict: bool = False,
                progress: ProgressFn | None = None) -> Written:
    """Write the model files of ``plan`` into ``folder`` in ``recipe.format``.

    ``items`` supplies the tensors (default: :func:`source_items`). Shards finished by an
    interrupted run (``journal``) are reused.
    """
    items = source_items(ckpt, plan, recipe) if items is None else items
    if recipe.format in gguf.TYPES:
        layers, files, size, info = gguf.export(ckpt, plan, items, folder, recipe.format, source_spec, strict, progress)
        return Written(layers, files, size, info)
    layers, files = write_weights(plan, shards, folder, items, journal, progress)
    hf_bitnet.write_config(folder, ckpt.config, [k.name for k in plan.kept], plan.linear_class)
    hf_bitnet.write_index(folder, shards)
    hf_bitnet.copy_files(ckpt.path, folder, CARRIED_FILES)
    return Written(layers, files, size_stats(ckpt, plan, shards, files, layers), None)


def write_weights(plan: Plan, shards: list, folder: Path, items: Iterator[Item], journal: Journal,
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
                logical = plan.logical[name]
                stat = LayerStats.of(name, logical.shape, t)
                layers[stat.name] = stat
                shard_layers.setdefault(writer.shard_of(name), []).append(stat)
                for out_name, out_tensor in hf_bitnet.encode(name, t.packed, t.scale, logical.dtype, plan.linear_class):
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


def measure(baseline: Path, folder: Path, tokens: Tokens, recipe: Recipe,
            progress: WindowProgress | None = None, stream: bool | None = None) -> tuple[dict, list[dict]]:
    """The report's ``perplexity`` (baseline vs the output in ``folder``) and ``gates``;
    ``stream`` as :class:`~bitquant.evaluate.EvalSettings` has it (None: when needed)."""
    settings = eval_settings(recipe, stream)
    perplexity = evaluate.compare(baseline, folder, tokens, settings=settings, progress=progress)
    return perplexity, [g.__dict__ for g in gates.check(recipe.gates, perplexity)]


def check_eval_options(recipe: Recipe, eval_text) -> None:
    """Refuse gates without an evaluation text, and an evaluation of a GGUF output."""
    if recipe.gates and eval_text is None:
        raise UsageError("quality gates (--max-ppl-ratio, --max-kl) need --eval-text FILE to measure against")
    if recipe.format in gguf.TYPES and eval_text is not None:
        raise UsageError(
            "--eval-text measures the transformers layout; convert without --format to evaluate, "
            "or measure the GGUF with llama.cpp (see README)"
        )


def eval_settings(recipe: Recipe, stream: bool | None = None) -> EvalSettings:
    return EvalSettings(context=recipe.eval_context, stride=recipe.eval_stride, max_tokens=recipe.eval_max_tokens,
                        stream=stream)


def new_report(source: ModelSource, ckpt: Checkpoint, recipe: dict, recipe_sha256: str, fingerprint: str, fmt: str,
               plan: Plan, written: Written, reused: list[str], shards: list[hf_bitnet.Shard], max_shard_size: int,
               **extra) -> ConvertReport:
    """A report of a freshly written output (``files`` and timings are set by :func:`finish`)."""
    return ConvertReport(
        bitquant_version=__version__,
        source=source.to_dict(),
        architecture=ckpt.architecture,
        recipe=recipe,
        recipe_sha256=recipe_sha256,
        fingerprint=fingerprint,
        format=fmt,
        size=written.size,
        layers=written.layers,
        kept_full_precision=plan.kept,
        files=[],
        versions=versions(),
        elapsed_seconds=0.0,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        resumed_shards=reused,
        notes=notes(written.layers, reused, len(shards))
        + ([] if written.gguf else oversized_notes(shards, max_shard_size))
        + list((written.gguf or {}).get("notes", [])),
        gguf=written.gguf,
        input=input_info(plan, written.layers, fmt),
        **extra,
    )


def finish(folder: Path, report: ConvertReport, source: ModelSource, written: Written, journal: Journal,
           started: float) -> None:
    """Write the model card and ``report.json`` (listing every file with its sha256)."""
    (folder / "README.md").write_text(card.render(report, source), encoding="utf-8")
    journal.remove()
    model_files = {f.name for f in written.files}
    report.files = sorted(written.files + hash_files(folder, exclude=model_files | {REPORT}), key=lambda f: f.name)
    report.elapsed_seconds = round(time.monotonic() - started, 3)
    (folder / REPORT).write_text(report.to_json(), encoding="utf-8")


def publish(out: Path, report: ConvertReport, repo_id: str, token, private, revision, create_pr) -> dict:
    """Upload ``out`` and record where it went in the local ``report.json``."""
    from bitquant.publish import push_folder

    what = "healed ternary" if report.heal else "ternary"
    message = f"bitquant {__version__}: {what} ({report.recipe['name']}) conversion of {report.source['id']}"
    url = push_folder(out, repo_id, token=token, private=private, revision=revision, create_pr=create_pr, message=message)
    published = {"repo_id": repo_id, "revision": revision or "main", "create_pr": create_pr, "url": url}
    report.published = published
    (out / REPORT).write_text(report.to_json(), encoding="utf-8")
    return published


def publish_if_needed(out: Path, existing: ConvertReport, repo_id: str | None, token, private, revision, create_pr) -> None:
    """An up-to-date OUT whose last upload did not happen (e.g. it failed) is uploaded now."""
    published_here = (existing.published or {}).get("repo_id") == repo_id
    if repo_id and not existing.gates_failed() and not published_here:
        publish(out, existing, repo_id, token, private, revision, create_pr)


def up_to_date(out: Path, fingerprint: str) -> ConvertReport | None:
    """The report of ``out`` if it holds a complete output with this fingerprint."""
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


def hash_files(folder: Path, exclude: set[str]) -> list[OutputFile]:
    return [
        OutputFile(p.name, p.stat().st_size, file_sha256(p))
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in exclude
    ]


def size_stats(ckpt: Checkpoint, plan: Plan, shards: list, files: list[OutputFile], layers: list[LayerStats]) -> SizeStats:
    shard_names = {s.filename for s in shards}
    output_bytes = sum(f.bytes for f in files if f.name in shard_names)
    quantized_params = sum(l.shape[0] * l.shape[1] for l in layers)
    quantized_names = {o for name in plan.quantize for o in plan.outputs[name]}
    quantized_bytes = sum(s.nbytes for s in plan.specs if s.name in quantized_names)
    total_tensor_bytes = sum(s.nbytes for s in plan.specs)
    return SizeStats.from_counts(ckpt.source_bytes(), output_bytes, quantized_params, quantized_bytes,
                                 plan.total_params, total_tensor_bytes)


def notes(layers: list[LayerStats], reused: list[str], n_shards: int) -> list[str]:
    out = []
    clamped = [l.name for l in layers if l.scale_clamped]
    if clamped:
        out.append(f"{len(clamped)} matrices had mean|W| below eps and were given s = eps: {', '.join(clamped[:5])}")
    if reused:
        out.append(f"resumed an interrupted run: {len(reused)} of {n_shards} shards reused after their sha256 was checked")
    if n_shards > MANY_SHARDS:
        out.append(f"the output is split into {n_shards} shards; a larger --max-shard-size (default 5GB) makes fewer files")
    return out


def oversized_notes(shards: list[hf_bitnet.Shard], max_shard_size: int) -> list[str]:
    """A note for each tensor larger than ``--max-shard-size``, which gets a shard of its own."""
    def size(n: int) -> str:
        return f"{n / 1e6:,.1f} MB" if n >= 10**5 else f"{n / 1e3:,.1f} kB"

    return [f"{s.specs[0].name} ({size(s.nbytes)}) is larger than --max-shard-size ({size(max_shard_size)}), so its "
            f"shard {s.filename} is too" for s in shards if len(s.specs) == 1 and s.nbytes > max_shard_size]


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"bitquant": __version__, "torch": torch.__version__, "transformers": version("transformers")}


def eval_tokens(folder: Path, text: str | Path | None, recipe: Recipe) -> Tokens | None:
    """``text`` tokenized for the recipe's evaluation settings (``None`` without a text)."""
    return None if text is None else evaluate.tokenize_for(folder, text, eval_settings(recipe))
