import json
import os
import shutil
import subprocess
import sys

import pytest

from bitquant.errors import SourceError, UnsupportedModelError
from bitquant.source import open_checkpoint, resolve_source

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_local_folder_resolves_and_streams(tiny_llama):
    src = resolve_source(str(tiny_llama))
    assert src.kind == "local" and src.path == tiny_llama.resolve()
    ckpt = open_checkpoint(src.path)
    assert ckpt.architecture == "LlamaForCausalLM"
    names = [n for n, _ in ckpt.iter_tensors()]
    assert "model.layers.1.mlp.down_proj.weight" in names and "lm_head.weight" in names


def test_missing_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(SourceError, match="has no config.json"):
        open_checkpoint(tmp_path / "m")


def test_unsupported_architecture_is_named(tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        open_checkpoint(tiny_llama)


def test_already_quantized_is_refused(tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="already quantized \\(gptq\\)"):
        open_checkpoint(tiny_llama)


def test_bitnet_config_that_does_not_match_the_tensors_is_refused(tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet"}  # says packed bitlinear, but the weights are dense
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="says the projections are packed .*model.layers.0.*float32"):
        open_checkpoint(tiny_llama)


def test_pickle_only_checkpoint_is_refused_with_reason(tiny_llama):
    (tiny_llama / "model.safetensors").rename(tiny_llama / "pytorch_model.bin")
    with pytest.raises(SourceError, match="only pickle weights.*arbitrary code"):
        open_checkpoint(tiny_llama)


def test_sharded_index_and_missing_shard(tmp_path):
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config())
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    ckpt = open_checkpoint(tmp_path / "sharded")
    assert len(ckpt.files) == len(shards)
    assert {n for n, _ in ckpt.iter_tensors()} == set(index["weight_map"])
    os.remove(tmp_path / "sharded" / shards[-1])
    with pytest.raises(SourceError, match=f"names shard {shards[-1]}, which is missing"):
        open_checkpoint(tmp_path / "sharded")


def test_index_cannot_escape_the_folder(tiny_llama):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../../etc/passwd"}}
    (tiny_llama / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match="outside"):
        open_checkpoint(tiny_llama)


def test_not_a_folder_and_bad_ids(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(SourceError, match="is not a folder"):
        resolve_source(str(f))
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="neither an existing folder nor a valid Hub model id"):
        resolve_source("not a valid id!")


def make_hub_cache(hf_home, repo_id, source_dir):
    """Lay out a Hugging Face Hub cache (as huggingface_hub writes it) holding source_dir."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    for p in source_dir.iterdir():
        shutil.copy(p, snap / p.name)


def run_cli(args, env_extra, cwd):
    env = dict(os.environ, **env_extra)
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "bitquant.cli.main", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_hub_id_resolves_from_hf_home_cache_offline(tiny_llama, tmp_path):
    make_hub_cache(tmp_path / "hf", "acme/tiny-llama", tiny_llama)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli(["convert", "acme/tiny-llama", "-o", "out", "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["source"]["kind"] == "hub"
    assert report["source"]["commit_sha"] == SHA
    assert report["source"]["revision"] == "main"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_hub_id_not_in_cache_offline_is_one_line(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli(["convert", "acme/absent", "-o", "out"], env, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "acme/absent is not in the local Hub cache" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_mapped_tensor_reads_the_same_values_after_its_rows_are_released(tmp_path):
    """Checkpoint.mapped: a zero-copy view whose rows can be dropped from memory and read again."""
    import torch

    from bitquant.source import open_checkpoint
    from conftest import make_checkpoint

    ckpt = open_checkpoint(make_checkpoint(tmp_path / "m"))
    name = "model.embed_tokens.weight"
    view, release = ckpt.mapped(name)
    want = ckpt.read([name])[name]
    assert torch.equal(view, want)
    release(10, 50)
    assert torch.equal(view[10:50], want[10:50]) and torch.equal(view, want)
