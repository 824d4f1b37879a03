import json

import pytest
from click.testing import CliRunner

from bitquant import __version__
from bitquant.cli.main import cli
from conftest import add_tokenizer, make_checkpoint


@pytest.fixture
def runner():
    return CliRunner()


def test_help_lists_commands(runner):
    r = runner.invoke(cli, ["--help"])
    assert r.exit_code == 0 and "convert" in r.output
    r = runner.invoke(cli, ["convert", "--help"])
    assert r.exit_code == 0 and "--overwrite" in r.output and "embedded:smollm2-135m" in r.output
    assert runner.invoke(cli, ["--version"]).output.strip().endswith(__version__)


def test_convert_prints_summary_and_writes_output(runner, tmp_path):
    src = make_checkpoint(tmp_path / "src")
    r = runner.invoke(cli, ["convert", str(src), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "ternary matrices" in r.output and "not measured" in r.output
    assert (tmp_path / "out" / "report.json").is_file()


def test_convert_json_and_exclude(runner, tmp_path):
    src = make_checkpoint(tmp_path / "src")
    r = runner.invoke(cli, ["convert", str(src), "-o", str(tmp_path / "out"), "--json", "--exclude", "*.down_proj"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["recipe"]["exclude"] == ["*.down_proj"]
    assert {k["name"] for k in report["kept_full_precision"]} == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def one_line_error(r, code, text):
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert text in r.stderr
    assert "Traceback" not in r.stderr


def test_user_errors_are_one_line_with_exit_code_2(runner, tmp_path):
    src = make_checkpoint(tmp_path / "src")
    (tmp_path / "exists").mkdir()
    one_line_error(runner.invoke(cli, ["convert", str(src), "-o", str(tmp_path / "exists")]), 2, "--overwrite")
    one_line_error(runner.invoke(cli, ["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]), 2, "does not exist")
    one_line_error(runner.invoke(cli, ["convert", "embedded:nope", "-o", str(tmp_path / "o")]), 2, "no embedded model named 'nope'")
    one_line_error(runner.invoke(cli, ["convert", str(src), "-o", str(tmp_path / "o"), "--config", "fancy"]), 2, "no bundled recipe")
    one_line_error(runner.invoke(cli, ["convert", str(src), "-o", str(tmp_path / "no" / "such" / "o")]), 2, "parent folder")
    assert not (tmp_path / "o").exists()


def test_bad_options_are_usage_errors(runner, tmp_path):
    r = runner.invoke(cli, ["convert", "x", "-o", str(tmp_path / "o"), "--max-shard-size", "lots"])
    assert r.exit_code == 2 and "is not a size" in r.output
    r = runner.invoke(cli, ["convert", "x"])
    assert r.exit_code == 2 and "Missing option '-o'" in r.output


def test_debug_shows_the_traceback(runner, tmp_path):
    r = runner.invoke(cli, ["--debug", "convert", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Traceback" in r.stderr and "SourceError" in r.stderr
    r = runner.invoke(cli, ["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--debug"])
    assert r.exit_code == 2 and "Traceback" in r.stderr


def test_internal_errors_are_one_line_with_exit_code_1(runner, tmp_path, monkeypatch):
    import bitquant.convert

    def boom(*a, **k):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(bitquant.convert, "convert", boom)
    r = runner.invoke(cli, ["convert", "x", "-o", str(tmp_path / "o")])
    one_line_error(r, 1, "internal error: RuntimeError: something broke (rerun with --debug")


def test_convert_calibrated_recipe_options(runner, tmp_path, tiny_tokenizer_dir):
    src = add_tokenizer(make_checkpoint(tmp_path / "src", vocab_size=320), tiny_tokenizer_dir)
    r = runner.invoke(cli, ["convert", str(src), "-o", str(tmp_path / "out"), "--config", "gptq-mixed",
                            "--calib-tokens", "1024", "--target-bits-per-weight", "8", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "calibration" in r.output and "mixed precision" in r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recipe"]["calib_tokens"] == 1024 and report["recipe"]["target_bits_per_weight"] == 8
    assert report["calibration"]["tokens"] == 1024 and report["calibration"]["device"] == "cpu"
    assert report["calibration"]["mixed_precision"]["bits_per_projection_weight"] <= 8
    card = (tmp_path / "out" / "README.md").read_text()
    assert "GPTQ error feedback" in card and "s = mean|W|" not in card


def test_heal_command(runner, tmp_path, tiny_tokenizer_dir, monkeypatch):
    from conftest import DATA, REPO, TOKENIZER_VOCAB

    monkeypatch.setenv("BITQUANT_CACHE", str(tmp_path / "cache"))
    src = add_tokenizer(make_checkpoint(tmp_path / "src", vocab_size=TOKENIZER_VOCAB, bos_token_id=0, eos_token_id=1),
                        tiny_tokenizer_dir)
    book = REPO / "bitquant" / "data" / "paradise-lost.txt"
    args = ["heal", str(src), "-o", str(tmp_path / "out"), "--device", "cpu", "--tokens", "8192", "--data", str(book),
            "--eval-text", str(DATA / "alice29.txt"), "--eval-max-tokens", "1024", "--lr", "0.01"]
    from bitquant.cli import render

    monkeypatch.setattr(render, "PLAIN_EVERY", 3600.0)  # however loaded the machine, no step outlasts it
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "bitquant heal" in r.output and "healed" in r.output and "before healing" in r.output
    # off a terminal: notes, and no progress lines for steps that end within PLAIN_EVERY seconds
    assert "note: training on the CPU: one step of 512 tokens took" in r.stderr and "steps need about" in r.stderr
    assert "training:" not in r.stderr
    r = runner.invoke(cli, args + ["--json"])
    assert r.exit_code == 0
    report = json.loads(r.stdout)
    assert report["heal"]["steps"] == 16 and report["recipe"]["lr"] == 0.01 and report["recipe"]["batch_tokens"] == 512
    r = runner.invoke(cli, ["heal", str(src), "-o", str(tmp_path / "x"), "--data-share", "0.5"])
    assert r.exit_code == 2 and "pass --data FILE too" in r.stderr


def test_plain_progress_names_the_running_step_at_least_every_interval(monkeypatch):
    """Without a live terminal, a step that prints nothing of its own is named every
    PLAIN_EVERY seconds, and what ends sooner prints nothing. A fake clock drives it."""
    import io

    from rich.console import Console

    from bitquant import activity
    from bitquant.cli import render

    buf = io.StringIO()
    monkeypatch.setattr(render, "err", Console(file=buf, force_terminal=False, width=200))
    monkeypatch.setattr(render.Reporter, "_heartbeat", lambda self: None)  # the test ticks
    clock = [0.0]
    with render.Reporter() as r:
        r._time = lambda: clock[0]
        r.since = r.last_line = 0.0
        activity.step("quick step")
        clock[0] += 5
        r.tick()
        activity.step("slow step")
        for _ in range(25):  # 25 s in ticks of a second
            clock[0] += 1
            r.tick()
        count = r.counter("counting", "items")
        for i in range(1, 6):  # items at 0, 4, 8, 12 and 16 s into the step
            count(i, 5)
            clock[0] += 4
    lines = buf.getvalue().splitlines()
    assert not any("quick step" in line for line in lines)
    assert [line for line in lines if "slow step" in line] == ["slow step (5 s)", "slow step (15 s)", "slow step (25 s)"]
    assert lines[-2].startswith("counting: 4/5 items") and "ETA 3 s" in lines[-2]  # 4 items in 12 s: 3 s for 1 more
    assert lines[-1].startswith("counting: 5/5 items")


def test_json_keeps_progress_on_stderr(runner, tiny_lm, monkeypatch):
    """`bitquant eval MODEL TEXT --json 2>err >out`: out is one JSON document, err the progress
    (every count shown here: PLAIN_EVERY 0 takes the clock out of the test)."""
    from bitquant.cli import render
    from conftest import DATA

    monkeypatch.setattr(render, "PLAIN_EVERY", 0.0)
    monkeypatch.setattr(render.Reporter, "_heartbeat", lambda self: None)  # counts only, no thread
    r = runner.invoke(cli, ["eval", str(tiny_lm), str(DATA / "alice29.txt"), "--max-tokens", "2048", "--context", "256",
                            "--json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["tokens"] > 0 and result["bos"] == "none" and "setup_seconds" in result
    assert "evaluating: 8/8 windows" in r.stderr and not r.stderr.lstrip().startswith("{")


def test_quiet_shows_no_progress(runner, tmp_path):
    from conftest import make_checkpoint

    src = make_checkpoint(tmp_path / "src")
    r = runner.invoke(cli, ["convert", str(src), "-o", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 0 and "ternary matrices" in r.output


def test_heal_summary_names_the_unlikelihood_term_and_the_students_repeats():
    from types import SimpleNamespace

    from rich.table import Table

    from bitquant.cli import render

    op = {"share": 0.25, "tokens_written": 1000, "tokens_per_second": 500.0, "every": 32, "unlikelihood": 4,
          "unlikelihood_n": 4, "repeated_shares": [{"step": 0, "share": 0.955}, {"step": 32, "share": 0.945}]}
    assert render._repeats(op) == ("; unlikelihood weight 4; its own text repeated a 4-gram at 96% of its tokens at "
                                   "the first rollout, 94% at the last")
    assert render._repeats({**op, "unlikelihood": 0.0, "repeated_shares": []}) == ""
    one = {**op, "unlikelihood": 0.0, "repeated_shares": op["repeated_shares"][:1]}
    assert render._repeats(one) == "; its own text repeated a 4-gram at 96% of its tokens (one rollout)"
    t = Table("what", "value")
    report = SimpleNamespace(heal={"tokens": 1, "steps": 1, "lr": 1e-3, "trained": ["projections"], "data": [],
                                   "seconds": 1.0, "device": "cpu", "tokens_per_second": 1.0, "final_loss": 1.0,
                                   "on_policy": op})
    render.heal_rows(report, t)
    assert "unlikelihood weight 4" in "".join(str(c) for c in t.columns[1]._cells)
