"""Unattended use: gates, up-to-date skips, determinism, resume after SIGKILL, publishing."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bitquant.cli.main import cli
from bitquant.convert import convert
from conftest import DATA
from fake_hub import FakeHub

TEXT = str(DATA / "alice29.txt")
EVAL = ["--eval-text", TEXT, "--eval-max-tokens", "256", "--eval-context", "64"]


def run(args, **kw):
    return CliRunner().invoke(cli, args, **kw)


def test_gates_pass_and_fail_with_exit_code_3(tiny_lm, tmp_path):
    ok = run(["convert", str(tiny_lm), "-o", str(tmp_path / "a"), *EVAL, "--max-ppl-ratio", "1e9", "--max-kl", "100"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("passed") == 2
    bad = run(["convert", str(tiny_lm), "-o", str(tmp_path / "b"), *EVAL, "--max-kl", "1e-9"])
    assert bad.exit_code == 3
    assert "quality gate failed: mean KL" in bad.stderr and "x the limit" in bad.stderr
    report = json.loads((tmp_path / "b" / "report.json").read_text())  # output still written
    assert report["gates"][0]["passed"] is False and report["gates"][0]["limit"] == 1e-9
    assert report["recipe"]["max_kl"] == 1e-9


def test_gates_from_a_recipe_file_and_need_eval_text(tiny_lm, tmp_path):
    recipe = tmp_path / "nightly.yaml"
    recipe.write_text("name: nightly\nschema: 1\neval_context: 64\neval_max_tokens: 256\nmax_ppl_ratio: 1.0e-6\n")
    r = run(["convert", str(tiny_lm), "-o", str(tmp_path / "a"), "--config", str(recipe), "--eval-text", TEXT])
    assert r.exit_code == 3 and "perplexity ratio" in r.stderr
    r = run(["convert", str(tiny_lm), "-o", str(tmp_path / "b"), "--config", str(recipe)])
    assert r.exit_code == 2 and "need --eval-text" in r.stderr
    assert not (tmp_path / "b").exists()


def test_second_run_is_skipped_and_force_redoes(tiny_lm, tmp_path):
    out = tmp_path / "out"
    first = run(["convert", str(tiny_lm), "-o", str(out)])
    assert first.exit_code == 0
    stamp = (out / "report.json").stat().st_mtime_ns
    import bitquant.export

    with pytest.MonkeyPatch.context() as m:  # an up-to-date output reads and writes no tensor
        m.setattr(bitquant.export, "write_model", lambda *a, **k: pytest.fail("the up-to-date output was rewritten"))
        again = run(["convert", str(tiny_lm), "-o", str(out)])
    assert again.exit_code == 0 and "is up to date" in again.output
    assert (out / "report.json").stat().st_mtime_ns == stamp
    forced = run(["convert", str(tiny_lm), "-o", str(out), "--force"])
    assert forced.exit_code == 0 and "is up to date" not in forced.output
    assert (out / "report.json").stat().st_mtime_ns != stamp
    changed = run(["convert", str(tiny_lm), "-o", str(out), "--exclude", "*.down_proj"])
    assert changed.exit_code == 2 and "--overwrite" in changed.stderr  # another recipe: not up to date


def test_same_inputs_give_identical_files(tiny_lm, tmp_path):
    a = convert(str(tiny_lm), tmp_path / "a", max_shard_size=20_000)
    b = convert(str(tiny_lm), tmp_path / "b", max_shard_size=20_000)
    assert len(a.files) > 3
    assert [(f.name, f.sha256) for f in a.files] == [(f.name, f.sha256) for f in b.files]
    assert a.fingerprint == b.fingerprint
    assert json.loads((tmp_path / "a" / "report.json").read_text())["files"] == json.loads((tmp_path / "b" / "report.json").read_text())["files"]


KILLER = """
import os, signal, sys
# as a terminal's Ctrl-C finds it: a suite started in the background (`cmd &`, nohup) hands
# its processes SIGINT ignored, and Python then keeps ignoring it
signal.signal(signal.SIGINT, signal.default_int_handler)
import bitquant.export as c
real = c.quantize_pack
calls = {{"n": 0}}
def dying(*a, **k):
    calls["n"] += 1
    if calls["n"] == {kill_at}:
        os.kill(os.getpid(), signal.{signal})
    return real(*a, **k)
c.quantize_pack = dying
from bitquant.cli.main import main
sys.argv = ["bitquant", "convert", {src!r}, "-o", {out!r}, "--max-shard-size", "20000"]
main()
"""


def run_dying(src, out, kill_at, sig):
    code = KILLER.format(kill_at=kill_at, signal=sig, src=str(src), out=str(out))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_sigkill_half_way_then_resume(tiny_lm, tmp_path):
    clean = convert(str(tiny_lm), tmp_path / "clean", max_shard_size=20_000)
    out = tmp_path / "out"
    proc = run_dying(tiny_lm, out, kill_at=10, sig="SIGKILL")
    assert proc.returncode == -9
    assert not out.exists()
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".bitquant-tmp-out-")]
    assert len(staging) == 1 and (staging[0] / "bitquant-progress.json").is_file()
    resumed = convert(str(tiny_lm), out, max_shard_size=20_000)
    assert resumed.resumed_shards and "resumed an interrupted run" in " ".join(resumed.notes)
    assert [(f.name, f.sha256) for f in resumed.files] == [(f.name, f.sha256) for f in clean.files]
    assert [l.name for l in resumed.layers] == [l.name for l in clean.layers]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bitquant-tmp-")]


def test_resume_redoes_a_corrupted_shard(tiny_lm, tmp_path):
    clean = convert(str(tiny_lm), tmp_path / "clean", max_shard_size=20_000)
    out = tmp_path / "out"
    run_dying(tiny_lm, out, kill_at=10, sig="SIGKILL")
    staging = next(p for p in tmp_path.iterdir() if p.name.startswith(".bitquant-tmp-out-"))
    journal = json.loads((staging / "bitquant-progress.json").read_text())
    victim = staging / sorted(journal["shards"])[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    resumed = convert(str(tiny_lm), out, max_shard_size=20_000)
    assert victim.name not in resumed.resumed_shards
    assert [(f.name, f.sha256) for f in resumed.files] == [(f.name, f.sha256) for f in clean.files]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signals_during_the_write_leave_nothing_under_out(tiny_lm, tmp_path, sig):
    proc = run_dying(tiny_lm, tmp_path / "out", kill_at=10, sig=sig)
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {'interrupted' if sig == 'SIGINT' else 'terminated'}; nothing was written under the output name, "
        "and a re-run resumes from the finished shards"
    )
    assert not (tmp_path / "out").exists()


def hub_env(hub, tmp_path, token="hf_write"):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def cli_proc(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "bitquant.cli.main", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_push_to_hub_uploads_the_output(tiny_lm, tmp_path):
    with FakeHub() as hub:
        env = hub_env(hub, tmp_path)
        p = cli_proc(["convert", str(tiny_lm), "-o", "out", "--push-to-hub", "acme/tiny-ternary", "--private"], env, tmp_path)
        assert p.returncode == 0, p.stderr
        repo = hub.repos["acme/tiny-ternary"]
        assert repo["private"]
        uploaded = repo["branches"]["main"]
        on_disk = {f.name for f in (tmp_path / "out").iterdir()}
        assert set(uploaded) == on_disk
        assert uploaded["model.safetensors"] == (tmp_path / "out" / "model.safetensors").read_bytes()
        assert "ternary (absmean) conversion" in repo["messages"][0]
        assert "base_model: tiny-lm" in hub.validated[0]  # the card's front matter was checked
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["published"]["url"].startswith(hub.url + "/acme/tiny-ternary/commit/")

        again = cli_proc(["convert", str(tiny_lm), "-o", "out", "--push-to-hub", "acme/tiny-ternary"], env, tmp_path)
        assert again.returncode == 0 and "is up to date" in again.stdout
        assert len(repo["messages"]) == 1  # already published there: not uploaded again

        p = cli_proc(["convert", str(tiny_lm), "-o", "out2", "--push-to-hub", "acme/tiny-ternary", "--push-revision", "nightly"], env, tmp_path)
        assert p.returncode == 0, p.stderr
        assert "model.safetensors" in repo["branches"]["nightly"]
        p = cli_proc(["convert", str(tiny_lm), "-o", "out3", "--push-to-hub", "acme/tiny-ternary", "--create-pr"], env, tmp_path)
        assert p.returncode == 0, p.stderr
        assert len(repo["prs"]) == 1 and "discussions/1" in json.loads((tmp_path / "out3" / "report.json").read_text())["published"]["url"]


def test_push_without_write_token_and_after_a_failed_gate(tiny_lm, tmp_path):
    with FakeHub() as hub:
        p = cli_proc(["convert", str(tiny_lm), "-o", "out", "--push-to-hub", "acme/x"], hub_env(hub, tmp_path, token=None), tmp_path)
        assert p.returncode == 1
        assert "refused the upload" in p.stderr and "HF_TOKEN" in p.stderr and p.stderr.count("\n") == 1
        assert (tmp_path / "out" / "model.safetensors").is_file()  # the output is kept
        retry = cli_proc(["convert", str(tiny_lm), "-o", "out", "--push-to-hub", "acme/x"], hub_env(hub, tmp_path), tmp_path)
        assert retry.returncode == 0, retry.stderr  # up to date, but not yet published: uploads now
        assert "model.safetensors" in hub.repos["acme/x"]["branches"]["main"]
        p = cli_proc(["convert", str(tiny_lm), "-o", "gated", *EVAL, "--max-kl", "1e-9", "--push-to-hub", "acme/y"],
                     hub_env(hub, tmp_path), tmp_path)
        assert p.returncode == 3 and "acme/y" not in hub.repos


def test_push_to_an_unreachable_hub_is_one_line_and_keeps_the_output(tiny_lm, tmp_path):
    """Nothing listens at HF_ENDPOINT: huggingface_hub's client raises a transport error that
    is not an OSError; it is still one line, and the converted output stays."""
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
               HF_TOKEN="hf_write", HF_HUB_DISABLE_TELEMETRY="1")
    p = cli_proc(["convert", str(tiny_lm), "-o", "out", "--push-to-hub", "acme/x"], env, tmp_path)
    assert p.returncode == 1, p.stderr
    assert "uploading to acme/x failed" in p.stderr and "the output in" in p.stderr and p.stderr.count("\n") == 1
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "repo,token,message",
    [
        ("acme/missing", "hf_write", "was not found on the Hub"),
        ("acme/secret", None, "set HF_TOKEN / --token if it is private"),
        ("acme/gated", None, "is a gated model"),
    ],
)
def test_hub_download_errors_through_a_local_endpoint(tmp_path, repo, token, message):
    with FakeHub(gated={"acme/gated"}, private={"acme/secret"}) as hub:
        p = cli_proc(["convert", repo, "-o", "out"], hub_env(hub, tmp_path, token), tmp_path)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
