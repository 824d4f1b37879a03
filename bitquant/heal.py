"""heal(): a short distillation from an FP model into its own ternary version, exported
exactly as ``convert`` exports.

The pipeline, each step in its own module:

1. plan what is ternarized from the source's headers (:mod:`bitquant.plan`, as convert);
2. build the teacher (the FP model) and the student (the same weights, every ternarized
   projection a fake-quantized W1.58A8 layer calling :mod:`bitquant.ternary`'s quantizer,
   :mod:`bitquant.training.student`);
3. sample training text from the teacher, cached (:mod:`bitquant.training.data`), and/or
   read the user's text (:mod:`bitquant.training.texts`: text, JSON Lines, Parquet, Hub data sets);
4. train with a divergence between teacher and student (:mod:`bitquant.training.loss`), a
   share of every batch written by the student itself (:mod:`bitquant.training.on_policy`)
   (:mod:`bitquant.training.loop`), checkpointing into the staging folder so an
   interrupted run resumes;
5. write the trained latent weights as an ordinary checkpoint in the source's dtypes (the
   "master"), and export *that* with convert's writer (:mod:`bitquant.export`): so
   ``bitquant convert MASTER`` reproduces OUT byte for byte, and the student, reloaded
   from the master, computes what OUT computes;
6. check it (student logits against OUT's), evaluate, write the card and report, publish.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bitquant import __version__, activity, embedded, evaluate, export, generate, inputs, runtime
from bitquant.errors import BitquantError, SourceError, UsageError
from bitquant.evaluate import WindowProgress
from bitquant.export import REPORT, ProgressFn
from bitquant.fingerprint import conversion_fingerprint, source_fingerprint
from bitquant.formats import gguf, hf_bitnet
from bitquant.journal import Journal
from bitquant.plan import plan_conversion
from bitquant.report import ConvertReport
from bitquant.source import CARRIED_FILES, Checkpoint, open_checkpoint, resolve_source
from bitquant.staging import check_target, staged_output, staging_path
from bitquant.text import bos_token, convention
from bitquant.training import budget, checkpoint, data, distributed, loop, texts
from bitquant.training import loss as loss_module
from bitquant.training.on_policy import Rollouts
from bitquant.training.recipe import MIN_RESERVE, RESERVE_SHARE, HealRecipe, load_heal_recipe
from bitquant.training.student import compile_blocks, make_student, uncompile

#: Training state inside the staging folder (checkpoints, the master before export).
STATE = "heal-state"


class OutOfMemory(BitquantError):
    """The GPU ran out of memory (exit code 1)."""

    exit_code = 1


@dataclass
class HealHooks:
    """Progress callbacks for each phase (all optional)."""

    sample: data.SampleProgress | None = None
    train: loop.TrainProgress | None = None
    tensors: ProgressFn | None = None
    windows: WindowProgress | None = None
    completions: Callable[[int, int], None] | None = None  # (completions done, completions in all)
    note: loop.Note | None = None


def heal(
    model: str,
    out: str | Path,
    *,
    recipe: HealRecipe | None = None,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    data_files: tuple[str | Path | texts.DataSpec, ...] = (),
    eval_text: str | Path | None = None,
    save_master: str | Path | None = None,
    device: str = "auto",
    max_shard_size: int = 5 * 10**9,
    strict: bool = False,
    hooks: HealHooks | None = None,
    push_to_hub: str | None = None,
    push_private: bool = False,
    push_revision: str | None = None,
    push_create_pr: bool = False,
    stream_eval: bool | None = None,
    parallel: str = "auto",
    low_memory: bool | None = None,
) -> ConvertReport | None:
    """Heal ``model`` (anything convert accepts) into a ternary model at ``out``.

    Returns the report (also in ``out/report.json``), with a ``heal`` section. A re-run of
    the same command resumes an interrupted one from its last checkpoint; once finished,
    a re-run finds OUT up to date, as convert does.

    Under ``torchrun``/``accelerate launch`` (:mod:`bitquant.training.distributed`) every
    process samples and trains its share, wrapped as ``parallel`` says (``auto``: DDP when
    training fits one GPU, else FSDP2); only the main process writes OUT, the report and
    the progress. The other processes return OUT's report once it exists (``None`` if the
    main process failed). ``low_memory`` trains bf16 latent weights with torchao's 8-bit
    AdamW (default: in one process when the GPU would not hold fp32 weights and AdamW).
    """
    started = time.monotonic()
    world = distributed.world_from_env()
    hooks = hooks or HealHooks()
    if not world.main:
        hooks = HealHooks()  # progress is the main process's
    recipe = (recipe or load_heal_recipe()).fitted()
    conv = recipe.conversion()
    out = Path(out)
    check_target(out.absolute(), overwrite or force or (out / REPORT).is_file())
    master_out = Path(save_master).absolute() if save_master is not None else None
    if master_out is not None:
        check_target(master_out, overwrite or force)
    export.check_eval_options(conv, eval_text)
    device = distributed.setup(world, runtime.resolve_device(device))
    activity.step(f"opening {model}")
    source = resolve_source(model, revision=revision, token=token)
    ckpt = open_checkpoint(source.path)
    if ckpt.layout.ternary_trained:
        raise UsageError(f"{model} is already a ternary model ({inputs.KIND_LABELS[ckpt.layout.kind]}); heal distils an "
                         f"FP model into its ternary version: run bitquant convert {model} for a lossless conversion")
    if conv.format in gguf.TYPES:
        gguf.check_config(ckpt.config)
    plan = plan_conversion(ckpt, conv)
    tokenizer = runtime.load_tokenizer(ckpt.path)
    bos = bos_token(tokenizer)
    tokens = export.eval_tokens(ckpt.path, eval_text, conv)
    specs = [d if isinstance(d, texts.DataSpec) else texts.DataSpec(str(d)) for d in data_files]
    for spec in specs:
        spec.check()
    source_fp = source_fingerprint(source, ckpt)
    if specs:
        activity.step("reading the training text")
        eos = next(iter(_eos_ids(ckpt.config)), None)
        text_ids, text_info = texts.load_all(specs, tokenizer, recipe.seq_len, bos, eos, recipe.data_tokens,
                                             tokens.sha256 if tokens else None, embedded.cache_root() / "heal-data",
                                             source_fp, token)
    else:
        text_ids, text_info = None, []
    key = {"text_sha256": tokens.sha256 if tokens else None, "data_sha256": [d["sha256"] for d in text_info]}
    fingerprint = conversion_fingerprint(__version__, recipe.sha256(), source_fp, key)
    if not force:
        existing = export.up_to_date(out, fingerprint)
        if existing is not None:
            export.publish_if_needed(out, existing, push_to_hub, token, push_private, push_revision, push_create_pr)
            return existing
    check_target(out.absolute(), overwrite or force)

    deadline = None
    if recipe.time_budget is not None:  # keep back time for export, the checks and evaluation
        deadline = started + recipe.time_budget - max(MIN_RESERVE, RESERVE_SHARE * recipe.time_budget)
        if deadline <= time.monotonic():
            raise UsageError(budget.no_time(recipe, time.monotonic() - deadline))
    work = (ckpt, plan, recipe, conv, text_ids, text_info, source_fp, low_memory, deadline, bos)
    if not world.main:
        world.barrier()  # the main process has made the staging folder
        _train(*work, staging_path(out, fingerprint) / STATE, device, None, hooks, world, parallel)
        world.barrier()  # the main process has written OUT
        return export.up_to_date(out, fingerprint)
    try:
        report = _heal_main(work, source, out, fingerprint, tokens, tokenizer, master_out, device, hooks, world, parallel,
                            overwrite or force, max_shard_size, strict, stream_eval, started)
    finally:
        world.barrier()  # let the other processes finish, whatever happened here
    if push_to_hub and not report.gates_failed():
        export.publish(out, report, push_to_hub, token, push_private, push_revision, push_create_pr)
    return report


def _heal_main(work, source, out: Path, fingerprint: str, tokens, tokenizer, master_out: Path | None, device: str,
               hooks: HealHooks, world, parallel: str, overwrite: bool, max_shard_size: int, strict: bool, stream_eval,
               started: float) -> ConvertReport:
    """The main process's heal: staging, training, the master, OUT, its evaluation and report."""
    ckpt, plan, recipe, conv = work[:4]
    resumable = lambda folder: (folder / STATE / checkpoint.CHECKPOINT / checkpoint.PROGRESS).is_file()  # noqa: E731
    with staged_output(out, fingerprint, overwrite, keep_on_error=resumable) as tmp:
        state = tmp / STATE
        state.mkdir(exist_ok=True)
        world.barrier()  # the staging folder exists for the other processes
        try:
            info, student, teacher, probe = _train(*work, state, device, tokens, hooks, world, parallel)
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemory(
                f"the GPU ran out of memory; lower --micro-batch-tokens (now {recipe.micro_batch_tokens}) or "
                f"--batch-tokens (now {recipe.batch_tokens}), or --sample-batch (now {recipe.sample_batch}) while sampling; "
                "BITQUANT_TEACHER_STATES=0 stops holding the teacher's hidden states"
            ) from None
        uncompile(student)  # the checks below compare the plain forward pass with OUT's
        activity.step("writing the trained weights")
        master_ckpt = open_checkpoint(_write_master(student, ckpt, state / "master", max_shard_size))
        _load_master(student, master_ckpt)
        mplan = plan_conversion(master_ckpt, conv)
        shards = hf_bitnet.plan_shards(mplan.specs, max_shard_size)
        journal = Journal.load(tmp, fingerprint)
        reused = sorted(journal.shards)
        written = export.write_model(master_ckpt, mplan, conv, tmp, journal, shards, source.spec, strict=strict,
                                     progress=hooks.tensors)
        info["master"] = {"dtypes": sorted({str(s.dtype).replace("torch.", "") for _, s in master_ckpt.iter_specs()}),
                          "saved_to": str(master_out) if master_out else None}
        if conv.format not in gguf.TYPES:
            activity.step("checking the student against the output")
            info["exactness"] = _exactness(student, tmp, probe, device)
        del teacher
        perplexity = gate_results = None
        if tokens is not None:
            perplexity, gate_results = export.measure(ckpt.path, tmp, tokens, conv, hooks.windows, stream_eval)
            perplexity["before_heal"] = info.pop("before")
        generation = None
        if conv.format not in gguf.TYPES:
            generation = generate.generation_report([("source", ckpt.path), ("healed", tmp)], tokenizer, device,
                                                    hooks.completions)
        report = export.new_report(source, ckpt, recipe.to_dict(), recipe.sha256(), fingerprint, conv.format, mplan,
                                   written, reused, shards, max_shard_size, perplexity=perplexity, gates=gate_results,
                                   heal=info, generation=generation)
        del student
        if master_out is not None:
            _save_master(master_ckpt.path, master_out, fingerprint, overwrite)
        shutil.rmtree(state)
        export.finish(tmp, report, source, written, journal, started)
    return report


def _eos_ids(config: dict) -> list[int]:
    eos = config.get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def _train(ckpt: Checkpoint, plan, recipe: HealRecipe, conv, text_ids, text_info, source_fp: str, low_memory,
           deadline: float | None, bos: int | None, state: Path, device: str, tokens, hooks: HealHooks, world=None,
           parallel: str = "auto"):
    """Build teacher and student, gather the data, measure the start, train. Returns the
    report's ``heal`` section (so far), the trained student, the teacher and a probe batch."""
    world = world or distributed.World()
    cuda = device.startswith("cuda")
    params = sum(s.numel for _, s in ckpt.iter_specs())
    low_memory = distributed.choose_low_memory(low_memory, params, device, world)
    activity.step("loading the teacher and the student")
    teacher = runtime.load_fp(ckpt.path, torch.bfloat16 if cuda else torch.float32, device)
    teacher.requires_grad_(False)
    student = runtime.load_fp(ckpt.path, torch.bfloat16 if low_memory else torch.float32, device)
    weight_dtype = next(s.dtype for _, s in ckpt.iter_specs() if s.name in plan.quantize)
    trainable = sum(p.numel() for p in make_student(student, plan.quantized_modules, recipe.eps,
                                                   hf_bitnet.scale_dtype(weight_dtype), recipe.train))

    written_n = recipe.on_policy_rows
    text_n, sample_n = data.split_batch(recipe.batch_sequences - written_n, recipe.data_share if text_info else 0.0)
    pools, per, sources = [], [], []
    if text_info:
        pools.append(text_ids)
        per.append(text_n)
        sources.append({"kind": "text", "share": text_n / recipe.batch_sequences, "files": text_info})
    if sample_n or (written_n and not text_info):
        wanted = data.samples_needed(recipe, max(sample_n, 1), timed=deadline is not None)
        if hooks.note and wanted < recipe.sample_tokens:
            hooks.note(f"sampling {wanted:,} tokens from the teacher, what {recipe.steps:,} steps read "
                       f"(recipe: up to {recipe.sample_tokens:,})")
        settings = data.SampleSettings(wanted, recipe.seq_len, recipe.sample_temperature, recipe.seed,
                                       recipe.sample_batch,
                                       None if deadline is None else data.SAMPLE_SHARE * recipe.time_budget,
                                       recipe.sample_top_p, recipe.sample_greedy_tokens, recipe.sample_min_distinct)
        config = ckpt.config
        start = bos if bos is not None else config.get("bos_token_id")  # the tokenizer's BOS, else the config's
        if start is None:
            raise SourceError(f"{ckpt.path} has no bos_token_id in config.json; sampling from the teacher starts at BOS: "
                              "pass --data FILE to train on text instead")
        ids, sampled = data.cached_samples(teacher, settings, settings.key(source_fp, "cuda" if cuda else "cpu"),
                                           embedded.cache_root() / "heal-data", start, _eos_ids(config),
                                           config["vocab_size"], hooks.sample, world)
        if cuda and not sampled.get("cached"):
            torch.cuda.empty_cache()  # the sampler's KV cache is done with: its memory goes back to the GPU
        pools.append(ids)
        per.append(sample_n)
        sources.append({"kind": "teacher samples", "share": sample_n / recipe.batch_sequences, **sampled})
    batches = data.Batches(pools, per, recipe.seed)
    rollouts = None
    if written_n:
        rollouts = Rollouts(student, recipe.on_policy_settings, recipe.batch_sequences, recipe.seq_len, pools,
                            recipe.seed, _eos_ids(ckpt.config), recipe.eps, hf_bitnet.scale_dtype(weight_dtype))
        sources.append({"kind": "on-policy (written by the student)", "share": written_n / recipe.batch_sequences})
    probe = (batches.batch(0) if batches.pools else pools[0])[: max(1, min(4, recipe.batch_sequences))]

    before = None
    if tokens is not None:
        cached = state / "before.json"
        if cached.is_file():
            before = json.loads(cached.read_text(encoding="utf-8"))
        else:
            activity.step("measuring the plain ternary model")
            with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False):
                before = evaluate.perplexity_of(student, tokens, export.eval_settings(conv), device)
            cached.write_text(json.dumps(before), encoding="utf-8")

    if cuda:  # after sampling, whose static-cache compile they would fight; measured on an H100
        compile_blocks(student)  # (bench/heal_speed.py): 2.3x eager training, 1.8x compiling the projections alone
        compile_blocks(teacher)
    wrapping = distributed.choose_parallel(parallel, params, device, world)
    activity.step("starting to train" + (" (compiling the decoder blocks)" if cuda else ""))
    result = loop.train(student, teacher, batches, recipe, state, compiled=cuda, progress=hooks.train, note=hooks.note,
                        world=world, parallel=wrapping, low_memory=low_memory, deadline=deadline, rollouts=rollouts)
    if result.full_state is not None and world.main:  # FSDP2: rebuild an unsharded student from the gathered weights
        del student
        student = runtime.load_fp(ckpt.path, torch.bfloat16 if low_memory else torch.float32, device)
        make_student(student, plan.quantized_modules, recipe.eps, hf_bitnet.scale_dtype(weight_dtype), recipe.train)
        loaded = student.load_state_dict({k.removeprefix("student."): v for k, v in result.full_state.items()}, strict=False)
        if loaded.unexpected_keys or any(n in loaded.missing_keys for n, p in student.named_parameters() if p.requires_grad):
            raise RuntimeError("the weights gathered from FSDP2 do not match the student")
    info = {
        "tokens": result.tokens, "steps": result.steps, "lr": recipe.lr, "batch_tokens": recipe.batch_tokens,
        "seq_len": recipe.seq_len, "trained": list(recipe.train), "trainable_params": trainable,
        "loss": {"kind": recipe.loss, "beta": recipe.loss_beta if recipe.loss == "jsd" else None,
                 "temperature": recipe.loss_temperature,
                 "implementation": loss_module.implementation(device, recipe.divergence)},
        "on_policy": result.on_policy, "teacher_states": result.teacher_states, "bos": convention(bos),
        "training_tokens_per_second": _without_writing(result),
        "data": sources, "passes_over_data": [round(x, 3) for x in batches.passes(result.steps)],
        "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
        "steady_tokens_per_second": result.steady_tokens_per_second, "peak_gpu_bytes": result.peak_gpu_bytes,
        "world_size": world.size, "parallel": result.parallel, "device": device,
        "road": ("low memory: bf16 latent weights (stochastic rounding), torchao AdamW8bit" if low_memory
                 else "fp32 latent weights, AdamW"),
        "compute_dtype": "bfloat16 autocast" if cuda else ("bfloat16" if low_memory else "float32"),
        "compiled": result.compiled, "resumed_from_step": result.resumed_from_step, "final_loss": result.final_loss,
        "block_stage": {"share": recipe.block_stage, "steps": recipe.replace(tokens=result.tokens).block_steps},
        "time_budget": result.budget, "curve": result.curve, "before": before,
    }
    return info, student, teacher, probe


def _without_writing(result: loop.TrainResult) -> float:
    """Training tokens per second, the on-policy writing's time taken out (the same as
    ``tokens_per_second`` without on-policy steps)."""
    op = result.on_policy or {}
    seconds = result.seconds - op.get("seconds", 0.0) - op.get("build_seconds", 0.0)
    trained = result.tokens - result.resumed_from_step * (result.tokens // max(result.steps, 1))
    return round(trained / seconds, 1) if seconds > 0 else 0.0


def _write_master(student, ckpt: Checkpoint, folder: Path, max_shard_size: int) -> Path:
    """The student's weights, rounded to the source's dtype tensor by tensor, as an
    ordinary checkpoint of the source's architecture (config and tokenizer copied)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    weights = student.state_dict()
    specs = [s for _, s in ckpt.iter_specs()]
    shards = hf_bitnet.plan_shards(specs, max_shard_size)
    writer = hf_bitnet.ShardedWriter(folder, shards)
    try:
        for spec in specs:
            writer.write(spec.name, weights[spec.name].detach().to("cpu", spec.dtype).contiguous())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    hf_bitnet.write_index(folder, shards)
    (folder / "config.json").write_bytes((ckpt.path / "config.json").read_bytes())
    hf_bitnet.copy_files(ckpt.path, folder, CARRIED_FILES)
    return folder


@torch.no_grad()
def _load_master(student, master: Checkpoint) -> None:
    """Set the student's weights to the master's rounded values, so that the student is
    exactly what is exported."""
    params = dict(student.named_parameters(remove_duplicate=False))
    for name, tensor in master.iter_tensors():
        if name in params:
            params[name].copy_(tensor.to(params[name].dtype))


@torch.no_grad()
def _exactness(student, folder: Path, probe: torch.Tensor, device: str) -> dict:
    """Student logits against OUT's (bitquant's runtime, float32) on a probe batch."""
    student.float().eval()
    exported, _ = runtime.load_model(folder, torch.float32, device)
    ids = probe.to(device)
    a = student(input_ids=ids).logits.float()
    b = exported(input_ids=ids).logits.float()
    del exported
    return {"tokens": ids.numel(), "relative_error": float((a - b).norm() / b.norm()),
            "max_abs_error": float((a - b).abs().max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def _save_master(folder: Path, target: Path, fingerprint: str, overwrite: bool) -> None:
    with staged_output(target, fingerprint, overwrite) as tmp:
        for p in folder.iterdir():
            shutil.move(str(p), tmp / p.name)
