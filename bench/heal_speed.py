"""Throughput of heal's two GPU phases, variant against variant in one run, on a model of
SmolLM2-135M's exact shape with random weights (speed does not depend on the values):

    python bench/heal_speed.py                      # training variants, then sampling variants
    python bench/heal_speed.py --tinyllama          # also a TinyLlama-1.1B shape: 200 steps, tokens/s, peak memory

Training counts the teacher's forward plus the student's forward and backward, per
optimizer step of --batch-tokens (default 32,768), timed after --warmup steps:

* ``eager``: no compilation (the baseline);
* ``projections``: each fake-ternary projection compiled (quantizers fused);
* ``blocks``: every decoder block of teacher and student compiled (what heal does), the
  loss as heal chooses it (forward KL: the chunked loop);
* ``blocks-chunked``: the same with heal's pure-torch chunked loss (``BITQUANT_FUSED_LOSS=0``);
* ``blocks-eagerloss``: the same with each chunk of the chunked loss run eagerly
  (``BITQUANT_COMPILED_LOSS=0``; heal compiles it on CUDA);
* ``blocks-held``: ``blocks`` with the teacher's hidden states held
  (``bitquant.training.teacher_states``: gathered each step instead of the teacher's forward
  pass, as heal does where they fit); ``-eagerloss`` and ``-held`` combine.

``--profile`` prints the CUDA kernels that take the most time in one step of ``blocks``
and in one step of each sampler.

Sampling, per batch of --sample-batch sequences of 512 tokens (the first batch, which
compiles or warms up, is shown apart): transformers' generate with a static KV cache
(compiled into CUDA graphs by transformers; heal's sampler until this round) or a dynamic
one, and ``decode``, heal's own loop (bitquant.decode: a static cache read only up to the
current position, Gumbel-max draws on the GPU); ``graph``: the same draws through
``bitquant.decode.StaticDecoder`` (the whole step one CUDA graph replay, the cache read
under a mask); ``rollout``: heal's on-policy writer (the student as exported, W2A8
kernels, a StaticDecoder) continuing 16-token prompts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import use_source_tree  # noqa: E402

use_source_tree()


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def tinyllama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def models(config, compile_mode: str, student_dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    from bitquant.training.student import compile_blocks, make_student

    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: a 7B shape in seconds rather than minutes
        student = AutoModelForCausalLM.from_config(config, dtype=student_dtype)
        teacher = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    modules = {n for n, m in student.named_modules() if n.rsplit(".", 1)[-1].endswith("_proj")}
    make_student(student, modules, 1e-5, torch.float16, ("projections", "norms"), compiled=compile_mode == "projections")
    if compile_mode == "blocks":
        compile_blocks(student)
        compile_blocks(teacher)
    return student, teacher


def train_speed(config, mode: str, batch_tokens: int, micro_tokens: int, steps: int, warmup: int,
                low_memory: bool = False, profile: bool = False) -> tuple[float, float, float]:
    """Training tokens/s, warm-up seconds and peak GiB; ``low_memory``: heal's low-memory
    road (bf16 latent weights, torchao's 8-bit AdamW), made by heal's own make_optimizer."""
    from bitquant.training.loop import StudentLoss, _accumulate, _decoder_and_head, make_optimizer
    from bitquant.training.recipe import load_heal_recipe

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    os.environ["BITQUANT_FUSED_LOSS"] = "0" if "-chunked" in mode else "auto"
    os.environ["BITQUANT_COMPILED_LOSS"] = "0" if "-eagerloss" in mode else "auto"
    compile_mode = mode.split("-")[0]
    student, teacher = models(config, compile_mode, torch.bfloat16 if low_memory else torch.float32)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = make_optimizer(params, load_heal_recipe().replace(lr=1e-4), True, low_memory)
    model = StudentLoss(student)
    t_body, t_head = _decoder_and_head(teacher)
    seqs = batch_tokens // 512
    ids = torch.randint(0, config.vocab_size, (seqs, 512), device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    held = picks = None
    if "-held" in mode:
        from bitquant.training.teacher_states import TeacherStates

        held = TeacherStates(t_body, [ids.cpu()], micro_tokens // 512, torch.device("cuda"), autocast)
        picks = [(0, i) for i in range(seqs)]
    began = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        _accumulate(ids, None, micro_tokens // 512, model, t_body, t_head, autocast,
                    h_all=None if held is None else held.rows(picks))
        for group in opt.param_groups:  # as heal's loop sets it (torchao keeps lr as a tensor)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(1e-4)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    rate = steps * batch_tokens / (time.perf_counter() - t0)
    warm = t0 - began
    peak = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        top_kernels(lambda: (_accumulate(ids, None, micro_tokens // 512, model, t_body, t_head, autocast,
                                         h_all=None if held is None else held.rows(picks)),
                             opt.step(), opt.zero_grad(set_to_none=True)), f"one training step ({mode})")
    del student, teacher, opt, model, held
    return rate, warm, peak


def top_kernels(fn, what: str, n: int = 18) -> None:
    """Run ``fn`` once under torch's profiler; print the CUDA kernels that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in events)
    wall = max(e.time_range.end for e in prof.events()) - min(e.time_range.start for e in prof.events())
    print(f"--- {what}: {total / 1e3:.1f} ms of kernels in {wall / 1e3:.1f} ms", flush=True)
    for e in sorted(events, key=lambda e: -e.device_time_total)[:n]:
        print(f"  {e.device_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key[:110]}", flush=True)


def sample_speed(config, sampler: str, batches: int, batch: int, profile: bool = False) -> list[float]:
    """Seconds per batch of ``batch`` sequences of 512 tokens: ``decode`` is heal's sampler
    (bitquant.decode); ``graph`` the same through a StaticDecoder; ``rollout`` heal's
    on-policy writer; ``static`` / ``dynamic`` are transformers' generate with that cache
    (what heal used before)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from bitquant import decode

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    static = None
    if sampler == "graph":
        static = decode.StaticDecoder(model, batch, 512)
    elif sampler == "rollout":
        from bitquant.training.on_policy import Snapshot
        from bitquant.training.student import make_student

        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32).cuda()
        modules = {n for n, m in student.named_modules() if n.rsplit(".", 1)[-1].endswith("_proj")}
        make_student(student, modules, 1e-5, torch.float16, ("projections", "norms"))
        snapshot = Snapshot(student, 1e-5, torch.float16, torch.bfloat16, "cuda")
        static = decode.StaticDecoder(snapshot.model, batch, 512)
        prompts = torch.randint(0, config.vocab_size, (batch, 16))
    times = []
    for i in range(batches):
        began = time.perf_counter()
        g = torch.Generator(device="cuda").manual_seed(i)
        run = None
        if sampler == "decode":
            run = lambda: decode.sample_batch(model, batch, 512, config.bos_token_id, 1.0, [config.eos_token_id], g)  # noqa: E731
        elif sampler == "graph":
            run = lambda: decode.sample_graph(static, 512, config.bos_token_id, 1.0, [config.eos_token_id], g)  # noqa: E731
        elif sampler == "rollout":
            run = lambda: (snapshot.update(student),  # noqa: E731
                           decode.sample_graph(static, 512, 0, 1.0, [config.eos_token_id], g, prompts=prompts))
        if run is not None:
            run()
        else:
            gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=511,
                                  min_new_tokens=511, eos_token_id=[config.eos_token_id], pad_token_id=config.eos_token_id,
                                  cache_implementation="static" if sampler == "static" else None)
            start = torch.full((batch, 1), config.bos_token_id, dtype=torch.long, device="cuda")
            with torch.inference_mode():
                model.generate(start, attention_mask=torch.ones_like(start), generation_config=gc)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    if profile and run is not None:
        top_kernels(run, f"one batch of {batch} sequences ({sampler})")
    del model, static
    torch.cuda.empty_cache()
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-tokens", type=int, default=32768)
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", default="eager,projections,blocks")
    p.add_argument("--sample-batch", type=int, default=512)
    p.add_argument("--sample-batches", type=int, default=3)
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--samplers", default="static,decode",
                   help="static / dynamic: transformers generate with that KV cache; decode: bitquant.decode (heal's); "
                        "graph: bitquant.decode.StaticDecoder; rollout: heal's on-policy writer")
    p.add_argument("--sample-batches-sizes", default=None, help="comma-separated batch sizes (default: --sample-batch)")
    p.add_argument("--tinyllama", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    config = smollm2_config()
    rows = []
    base = None
    for mode in filter(None, args.modes.split(",")):
        try:
            rate, warm, peak = train_speed(config, mode, args.batch_tokens, args.micro_batch_tokens, args.steps, args.warmup,
                                           profile=args.profile and mode.startswith("blocks"))
        except Exception as e:  # a variant that fails here is reported, the others still run
            rows.append((f"train {mode}", f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            print(*rows[-1], flush=True)
            continue
        base = base or rate
        rows.append((f"train {mode}", f"{rate:,.0f} tokens/s ({rate / base:.2f}x the first), first {args.warmup} steps {warm:.1f} s, peak {peak:.1f} GiB"))
        print(*rows[-1], flush=True)
    if not args.no_sampling:
        base_rate = None
        sizes = [int(x) for x in (args.sample_batches_sizes or str(args.sample_batch)).split(",")]
        plan = []
        for item in [x for x in args.samplers.split(",") if x]:  # sampler or sampler:size
            name, _, size = item.partition(":")
            plan += [(name, int(size))] if size else [(name, s) for s in sizes]
        profiled = set()
        for sampler, size in plan:
            if True:
                tokens = size * 512
                st = sample_speed(config, sampler, args.sample_batches, size, profile=args.profile and sampler not in profiled)
                profiled.add(sampler)
                steady = tokens * (len(st) - 1) / sum(st[1:]) if len(st) > 1 else tokens / st[0]
                base_rate = base_rate or steady
                rows.append((f"sample {sampler}, batch {size}",
                             f"first batch {st[0]:.1f} s; then {steady:,.0f} tokens/s ({steady / base_rate:.2f}x first)"))
                print(*rows[-1], flush=True)
    if args.tinyllama:
        tl = tinyllama_config()
        mode = max((r for r in rows if r[0].startswith("train") and "failed" not in r[1]),
                   key=lambda r: float(r[1].split()[0].replace(",", "")))[0].split()[1]
        rate, warm, peak = train_speed(tl, mode, 8192, 8192, 197, 3)
        rows.append((f"TinyLlama-1.1B shape, 200 steps of 8,192 ({mode})", f"{rate:,.0f} tokens/s, peak {peak:.1f} GiB"))
    print()
    for k, v in rows:
        print(f"{k:44s} {v}")


if __name__ == "__main__":
    main()
