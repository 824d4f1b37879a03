"""Every bad input a user can give: one clear line, the right exit code, nothing lost.

Each case runs the real command line in a subprocess (Hub cases against a local fake
Hub). The last test renders every case's exit code and message into
``docs/bad-inputs.md`` and checks that the committed file is current; run with
``BITQUANT_WRITE_DOCS=1`` to rewrite it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import DATA, MASTER_QC, REPO, TOKENIZER_VOCAB, add_tokenizer, make_checkpoint, make_master
from fake_hub import FakeHub

DOC = REPO / "docs" / "bad-inputs.md"
TEXT = str(DATA / "alice29.txt")
BOOK = str(REPO / "bitquant" / "data" / "paradise-lost.txt")


@dataclass
class Case:
    id: str
    what: str
    setup: Callable  # (tmp: Path, src: Path, hub_url: str) -> (args, extra env)
    code: int
    expect: str
    limit_file_size: bool = False


def edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def edit_weights(src, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(src / "model.safetensors")
    fn(sd)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})


def conv(src, *extra):
    return ["convert", str(src), "-o", "out", *extra]


def s_nan(tmp, src, hub):
    edit_weights(src, lambda sd: sd["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")))
    return conv(src), {}


def s_inf(tmp, src, hub):
    edit_weights(src, lambda sd: sd["model.layers.0.self_attn.k_proj.weight"].__setitem__((1, 2), float("inf")))
    return conv(src), {}


def s_int(tmp, src, hub):
    import torch

    edit_weights(src, lambda sd: sd.__setitem__("model.layers.0.mlp.down_proj.weight", sd["model.layers.0.mlp.down_proj.weight"].to(torch.int32)))
    return conv(src), {}


def s_truncated(tmp, src, hub):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    return conv(src), {}


def s_corrupt_header(tmp, src, hub):
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:40] = b"#" * 32
    (src / "model.safetensors").write_bytes(bytes(data))
    return conv(src), {}


def s_missing_shard(tmp, src, hub):
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return conv(src), {}


def heal(src, *extra):
    return ["heal", str(src), "-o", "out", "--device", "cpu", "--tokens", "4096", *extra]


def s_heal_empty(tmp, src, hub):
    (tmp / "empty.txt").write_text("  \n")
    return heal(src, "--data", str(tmp / "empty.txt")), {}


def s_heal_latin1(tmp, src, hub):
    (tmp / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    return heal(src, "--data", str(tmp / "latin1.txt")), {}


def s_heal_eval_data(tmp, src, hub):
    book = tmp / "book.txt"
    book.write_bytes(Path(TEXT).read_bytes())
    return heal(src, "--data", str(book), "--eval-text", str(book)), {}


def s_moe(tmp, src, hub):
    edit_config(src, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=8)
    return conv(src), {}


def s_fused_shape(tmp, src, hub):
    phi3 = make_checkpoint(tmp / "phi3", arch="phi3")
    edit_weights(phi3, lambda sd: sd.__setitem__("model.layers.0.self_attn.qkv_proj.weight",
                                                 sd["model.layers.0.self_attn.qkv_proj.weight"][:-16].clone()))
    return conv(phi3), {}


def s_heal_no_dataset(tmp, src, hub):
    return heal(src, "--data", "hf:acme/no-such-data"), {"HF_ENDPOINT": hub, "HF_HUB_OFFLINE": "0"}


def s_heal_field(tmp, src, hub):
    (tmp / "docs.jsonl").write_text('{"body": "Once upon a time"}\n')
    return heal(src, "--data", str(tmp / "docs.jsonl")), {}


def s_heal_empty_jsonl(tmp, src, hub):
    (tmp / "empty.jsonl").write_text("\n")
    return heal(src, "--data", str(tmp / "empty.jsonl")), {}


def s_bos_unnamed(tmp, src, hub):
    from conftest import make_bos_tokenizer

    make_bos_tokenizer(src, "broken")  # adds <s> before every text, but names no bos_token
    return ["eval", str(src), TEXT], {}


def s_heal_arch(tmp, src, hub):
    edit_config(src, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    return heal(src), {}


def s_master(change):
    """A tiny BitNet master (tokenizer copied from the usual source), then ``change(master)``."""
    def setup(tmp, src, hub):
        master = make_master(tmp / "master")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (src / name).is_file():
                (master / name).write_bytes((src / name).read_bytes())
        return change(master) or conv(master), {}
    return setup


def _drop_sub_norm(master):
    edit_weights(master, lambda sd: sd.pop("model.layers.1.self_attn.attn_sub_norm.weight"))


def _zero_mlp(master):
    import torch

    edit_weights(master, lambda sd: sd.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros_like(sd["model.layers.0.mlp.down_proj.weight"])))


def s_out_file(tmp, src, hub):
    (tmp / "out").write_text("keep me")
    return conv(src, "--overwrite"), {}


def s_escape(tmp, src, hub):
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../../etc/passwd"}}))
    return conv(src), {}


def s_pickle(tmp, src, hub):
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    return conv(src), {}


def s_out_exists(tmp, src, hub):
    (tmp / "out").mkdir()
    (tmp / "out" / "precious.txt").write_text("keep me")
    return conv(src), {}


def s_recipe(body):
    def setup(tmp, src, hub):
        (tmp / "recipe.yaml").write_text(body)
        return conv(src, "--config", "recipe.yaml"), {}

    return setup


def s_text(content):
    def setup(tmp, src, hub):
        if content is not None:
            (tmp / "book.txt").write_bytes(content)
        return conv(src, "--eval-text", "book.txt"), {}

    return setup


def s_eval_text(content):
    def setup(tmp, src, hub):
        if content is not None:
            (tmp / "book.txt").write_bytes(content)
        return ["eval", str(src), "book.txt"], {}

    return setup


def s_eval_gguf(tmp, src, hub):
    from bitquant.convert import convert
    from bitquant.recipe import Recipe

    convert(str(src), tmp / "gguf-out", recipe=Recipe(format="gguf-tq2_0"))
    return ["eval", "gguf-out", TEXT], {}


HUB = lambda repo, token: lambda tmp, src, hub: (["convert", repo, "-o", "out"], {"HF_ENDPOINT": hub, "HF_HUB_OFFLINE": "0", **({"HF_TOKEN": token} if token else {})})

CASES = [
    Case("hub-missing", "Hub id that does not exist", HUB("acme/no-such-model", "hf_write"), 2, "was not found on the Hub"),
    Case("hub-gated", "gated repo, no token", HUB("acme/gated", None), 2, "is a gated model"),
    Case("hub-private", "private repo, no token", HUB("acme/secret", None), 2, "if it is private"),
    Case("hub-offline", "offline (HF_HUB_OFFLINE=1), no cached copy", lambda t, s, h: (["convert", "acme/model", "-o", "out"], {}), 2, "not in the local Hub cache"),
    Case("bad-id", "neither a folder nor a valid Hub id", lambda t, s, h: (["convert", "no such model!", "-o", "out"], {}), 2, "neither an existing folder"),
    Case("no-config", "folder without config.json", lambda t, s, h: ((s / "config.json").unlink() or conv(s), {}), 2, "has no config.json"),
    Case("architecture", "unsupported architecture", lambda t, s, h: (edit_config(s, architectures=["GPT2LMHeadModel"]) or conv(s), {}), 2, "is not supported"),
    Case("moe", "mixture-of-experts model", s_moe, 2, "is a mixture-of-experts model, which bitquant does not convert yet"),
    Case("fused-shape", "fused projection (Phi-3 qkv_proj) whose shape does not match the config", s_fused_shape, 2,
         "is [112, 64], but its config.json gives [128, 64]"),
    Case("calibrated-family", "calibrated recipe on a family without the Llama block (Gemma 3)",
         lambda t, s, h: (conv(make_checkpoint(t / "gemma3", arch="gemma3"), "--config", "gptq"), {}), 2,
         "needs the Llama block layout, which Gemma 3"),
    Case("pickle", "pickle-only checkpoint (.bin)", s_pickle, 2, "only pickle weights"),
    Case("truncated", "truncated safetensors file", s_truncated, 2, "probably truncated or corrupted"),
    Case("corrupted", "corrupted safetensors header", s_corrupt_header, 2, "header is not JSON"),
    Case("missing-shard", "index names a missing shard", s_missing_shard, 2, "which is missing"),
    Case("escaping-index", "index path escaping the folder", s_escape, 2, "refusing to read it"),
    Case("nan", "NaN in a weight", s_nan, 2, "contains NaN or Inf"),
    Case("inf", "Inf in a weight", s_inf, 2, "contains NaN or Inf"),
    Case("int-dtype", "a weight that is not float", s_int, 2, "not a float type"),
    Case("out-exists", "output folder exists", s_out_exists, 2, "already exists; pass --overwrite"),
    Case("out-file", "output is an existing file, even with --overwrite", s_out_file, 2, "exists and is not a folder; remove it"),
    Case("out-unwritable", "output folder cannot be written", lambda t, s, h: (["convert", str(s), "-o", "/sys/bitquant-out"], {}), 2, "cannot write into /sys"),
    Case("disk-full", "disk fills up during the write", lambda t, s, h: (conv(s), {}), 1, "free some space", limit_file_size=True),
    Case("sigint", "SIGINT during the write", lambda t, s, h: (conv(s), {"BQ_TEST_SIGNAL": "SIGINT"}), 130, "interrupted; nothing was written under the output name, and a re-run resumes"),
    Case("sigterm", "SIGTERM during the write", lambda t, s, h: (conv(s), {"BQ_TEST_SIGNAL": "SIGTERM"}), 130, "terminated; nothing was written under the output name, and a re-run resumes"),
    Case("text-missing", "eval text missing", s_text(None), 2, "does not exist"),
    Case("text-empty", "eval text empty", s_text(b""), 2, "is empty"),
    Case("text-short", "eval text shorter than one window", s_text(b"Too short to evaluate.\n"), 2, "fewer than one window"),
    Case("text-binary", "eval text is binary", s_text(bytes(range(256)) * 8), 2, "NUL bytes"),
    Case("text-latin1", "eval text is not UTF-8", s_text("Caf\u00e9 cr\u00e8me ".encode("latin-1") * 300), 2, "not UTF-8 text"),
    Case("eval-short", "`bitquant eval` on a too short text", s_eval_text(b"One line.\n"), 2, "fewer than one window"),
    Case("eval-gguf", "`bitquant eval` on a GGUF output", s_eval_gguf, 2, "holds a GGUF for llama.cpp"),
    Case("recipe-unknown", "recipe with an unknown key", s_recipe("name: x\nschema: 1\nepsilon: 0.1\n"), 2, "unknown field 'epsilon'"),
    Case("recipe-type", "recipe with a wrong type", s_recipe("name: x\nschema: 1\neps: tiny\n"), 2, "field 'eps' must be a float"),
    Case("recipe-yaml", "recipe that is not YAML", s_recipe("name: [x\n"), 2, "not valid YAML"),
    Case("gate-no-text", "quality gate without --eval-text", lambda t, s, h: (conv(s, "--max-kl", "0.5"), {}), 2, "need --eval-text"),
    Case("bad-option", "bad option value", lambda t, s, h: (conv(s, "--max-shard-size", "huge"), {}), 2, "is not a size"),
    Case("calib-missing", "calibration text missing", lambda t, s, h: (conv(s, "--config", "gptq", "--calib-text", str(t / "nope.txt")), {}), 2, "does not exist"),
    Case("calib-uncalibrated", "--calib-text with the absmean recipe", lambda t, s, h: (conv(s, "--calib-text", str(DATA / "alice29.txt")), {}), 2, "calibrated recipes only"),
    Case("calib-is-eval", "calibration text is the eval text", lambda t, s, h: (conv(s, "--config", "gptq", "--calib-text", str(DATA / "alice29.txt"), "--eval-text", str(DATA / "alice29.txt")), {}), 2, "same file"),
    Case("calib-gguf", "calibrated recipe with --format gguf", lambda t, s, h: (conv(s, "--config", "gptq", "--format", "gguf-tq2_0"), {}), 2, "transformers layout only"),
    Case("bits-range", "--target-bits-per-weight below 2", lambda t, s, h: (conv(s, "--target-bits-per-weight", "1.5"), {}), 2, "1.5 is not in the range"),
    Case("no-cuda", "--device cuda without a GPU", lambda t, s, h: (conv(s, "--config", "gptq", "--device", "cuda"), {}), 2, "torch sees no CUDA GPU"),
    Case("heal-no-cuda", "heal --device cuda without a GPU", lambda t, s, h: (heal(s, "--device", "cuda"), {}), 2, "torch sees no CUDA GPU"),
    Case("heal-budget", "heal: a token budget smaller than one batch", lambda t, s, h: (heal(s, "--tokens", "1024", "--batch-tokens", "2048"), {}), 2, "smaller than one batch"),
    Case("heal-empty-data", "heal --data: an empty file", s_heal_empty, 2, "is empty (no text to train on)"),
    Case("heal-binary-data", "heal --data: not UTF-8", s_heal_latin1, 2, "is not UTF-8 text"),
    Case("heal-eval-data", "heal --data: the --eval-text file", s_heal_eval_data, 2, "is the --eval-text file"),
    Case("heal-arch", "heal: an unsupported architecture", s_heal_arch, 2, "architecture GPT2LMHeadModel is not supported"),
    Case("qc-mismatch", "quantization_config says packed, the weights are dense", lambda t, s, h: (edit_config(s, quantization_config={"quant_method": "bitnet"}) or conv(s), {}), 2, "says the projections are packed (bitlinear, offline)"),
    Case("linear-class", "unknown quantization_config.linear_class", s_master(lambda m: edit_config(m, quantization_config={**MASTER_QC, "linear_class": "ternarylinear"})), 2, "which bitquant does not know"),
    Case("sub-norms", "BitNet checkpoint without its sub-norms", s_master(_drop_sub_norm), 2, "BitNet blocks need attn_sub_norm and ffn_sub_norm"),
    Case("zero-master", "ternary-trained master with an all-zero matrix", s_master(_zero_mlp), 2, "of this ternary-trained model is all zeros"),
    Case("master-gptq", "calibrated recipe on a ternary-trained master", s_master(lambda m: conv(m, "--config", "gptq")), 2, "does not apply"),
    Case("heal-ternary", "heal: an already ternary model", s_master(lambda m: heal(m)), 2, "is already a ternary model"),
    Case("heal-time", "heal --time too short for one step", lambda t, s, h: (["heal", str(s), "-o", "out", "--device", "cpu", "--time", "1s", "--data", BOOK], {}), 2, "--time 1s leaves no time to train"),
    Case("heal-time-tokens", "heal: --time and --tokens together", lambda t, s, h: (heal(s, "--time", "15m"), {}), 2, "--time and --tokens both set the length of training"),
    Case("heal-time-format", "heal --time: not a duration", lambda t, s, h: (heal(s, "--time", "soon"), {}), 2, "'soon' is not a duration"),
    Case("heal-no-dataset", "heal --data hf:...: a data set that does not exist", s_heal_no_dataset, 2, "data set 'acme/no-such-data' was not found on the Hub"),
    Case("heal-hub-down", "heal --data hf:...: the Hub cannot be reached", lambda t, s, h: (heal(s, "--data", "hf:acme/books"), {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}), 2, "data set acme/books cannot be reached at http://127.0.0.1:9"),
    Case("heal-data-field", "heal --data: a JSON Lines file without the text field", s_heal_field, 2, "has no field 'text' (line 1 has: body); name the text column with --data-field"),
    Case("heal-empty-jsonl", "heal --data: an empty JSON Lines file", s_heal_empty_jsonl, 2, "holds no text"),
    Case("heal-on-policy", "heal --on-policy outside [0, 1]", lambda t, s, h: (heal(s, "--on-policy", "1.5"), {}), 2, "must be between 0 and 1, got 1.5"),
    Case("heal-on-policy-start", "heal --on-policy-start outside [0, 1)", lambda t, s, h: (heal(s, "--on-policy", "0.5", "--on-policy-start", "1"), {}), 2, "must be at least 0 and below 1, got 1"),
    Case("heal-unlikelihood", "heal --unlikelihood without on-policy steps", lambda t, s, h: (heal(s, "--unlikelihood", "1"), {}), 2, "acts on the text the student writes itself: give on-policy steps too"),
    Case("heal-unlikelihood-negative", "heal --unlikelihood below 0", lambda t, s, h: (heal(s, "--on-policy", "0.25", "--unlikelihood", "-1"), {}), 2, "must be 0 or more and 'unlikelihood_n' at least 2, got -1 and 4"),
    Case("heal-loss", "heal --loss: an unknown divergence", lambda t, s, h: (heal(s, "--loss", "kl2"), {}), 2, "'loss' is 'kl2'; choose one of forward_kl, reverse_kl, jsd"),
    Case("eval-bos-unnamed", "a tokenizer that adds BOS but names no BOS token", s_bos_unnamed, 2, "adds token 1 before the text but names no BOS token"),
    Case("generate-no-prompt", "generate: no PROMPT and nothing on stdin", lambda t, s, h: (["generate", str(s)], {}), 2, "the prompt is empty; give PROMPT or pipe text on stdin"),
    Case("generate-zero", "generate --max-new-tokens 0", lambda t, s, h: (["generate", str(s), "Alice", "--max-new-tokens", "0"], {}), 2, "--max-new-tokens must be at least 1"),
    Case("generate-chat", "generate --chat: the tokenizer has no chat template", lambda t, s, h: (["generate", str(s), "Alice", "--chat"], {}), 2, "--chat needs a chat template"),
    Case("generate-compile-cpu", "generate --compile on the CPU", lambda t, s, h: (["generate", str(s), "Alice", "--compile", "--device", "cpu"], {}), 2, "--compile needs a CUDA device"),
    Case("generate-missing", "generate: a model folder that does not exist", lambda t, s, h: (["generate", str(t / "nope"), "Alice"], {}), 2, "does not exist; pass a checkpoint folder"),
    Case("heal-oom", "heal: the GPU runs out of memory", lambda t, s, h: (heal(s, "--data", BOOK), {"BQ_TEST_OOM": "1"}), 1, "the GPU ran out of memory; lower --micro-batch-tokens"),
]

# Runs the CLI; with BQ_TEST_SIGNAL it sends itself that signal while the first matrix is quantized.
RUNNER = """
import os, signal, sys
sig = os.environ.get("BQ_TEST_SIGNAL")
if sig:
    # as a terminal's Ctrl-C finds it: a suite started in the background (`cmd &`, nohup)
    # hands its processes SIGINT ignored, and Python then keeps ignoring it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import bitquant.export as c
    real = c.quantize_pack
    def dying(*a, **k):
        os.kill(os.getpid(), getattr(signal, sig))
        return real(*a, **k)
    c.quantize_pack = dying
if os.environ.get("BQ_TEST_OOM"):
    import torch
    import bitquant.training.loop as loop
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    loop.train = oom
from bitquant.cli.main import main
sys.argv = ["bitquant", *sys.argv[1:]]
main()
"""

RESULTS: dict[str, tuple[int, str]] = {}


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def run_case(case: Case, tmp: Path, tokenizer: Path) -> tuple[int, str]:
    src = add_tokenizer(make_checkpoint(tmp / "src", vocab_size=TOKENIZER_VOCAB), tokenizer)
    with FakeHub(gated={"acme/gated"}, private={"acme/secret"}) as hub:
        args, extra = case.setup(tmp, src, hub.url)
        env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", **extra}
        if "HF_TOKEN" not in extra:
            env.pop("HF_TOKEN", None)
        proc = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, cwd=tmp, env=env,
                              stdin=subprocess.DEVNULL,
                              timeout=300, preexec_fn=_limit_file_size if case.limit_file_size else None)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    message = lines[-1] if lines else ""
    assert proc.returncode == case.code, proc.stderr
    assert case.expect in message, proc.stderr
    assert "Traceback" not in proc.stderr
    if case.code != 2 or not message.startswith("Error: "):  # click's own usage errors print a usage line first
        assert len(lines) == 1, proc.stderr
    if case.id == "out-exists":
        assert (tmp / "out" / "precious.txt").read_text() == "keep me"
    elif case.id == "out-file":
        assert (tmp / "out").read_text() == "keep me"
    else:
        assert not (tmp / "out").exists()
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".bitquant-tmp-")]
    if case.id in ("sigint", "sigterm"):
        assert len(leftovers) <= 1  # kept for resume
    else:
        assert not leftovers, leftovers
    return proc.returncode, message.replace(str(tmp), "<tmp>").replace(hub.url, "<hub>")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, tiny_tokenizer_dir):
    RESULTS[case.id] = run_case(case, tmp_path, tiny_tokenizer_dir)


# Figures that depend on the machine's speed, shown as <n> so that the table stays stable.
VOLATILE = re.compile(r"(about )\d+( s short)")


def render() -> str:
    lines = [
        "# Bad inputs: messages and exit codes",
        "",
        "Produced by `tests/test_bad_inputs.py` (which fails when this file is out of date;",
        "`BITQUANT_WRITE_DOCS=1 python -m pytest tests/test_bad_inputs.py` rewrites it). Every case",
        "prints one line on stderr (no traceback unless `--debug`), and leaves nothing under the",
        "output name; an existing output is never clobbered. `<tmp>` is the working folder.",
        "",
        "| case | exit code | message |",
        "|---|---|---|",
    ]
    for c in CASES:
        code, message = RESULTS[c.id]
        escaped = VOLATILE.sub(r"\1<n>\2", message).replace("|", "\\|")
        lines.append(f"| {c.what} | {code} | `{escaped}` |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_current(tmp_path, tiny_tokenizer_dir):
    for i, case in enumerate(CASES):
        if case.id not in RESULTS:  # when run alone (-k), run the missing cases here
            (tmp_path / str(i)).mkdir()
            RESULTS[case.id] = run_case(case, tmp_path / str(i), tiny_tokenizer_dir)
    text = render()
    if os.environ.get("BITQUANT_WRITE_DOCS"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, "docs/bad-inputs.md is out of date: rerun with BITQUANT_WRITE_DOCS=1"
