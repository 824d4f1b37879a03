"""bitquant heal end to end on tiny random models (CPU): what is trained is what ships.

The student at the end of training is rebuilt from the saved master and compared with
the exported OUT through bitquant's runtime (what ``bitquant eval`` runs) and through
transformers in a process that never imports bitquant.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from bitquant import evaluate, runtime
from bitquant.convert import convert
from bitquant.errors import UsageError
from bitquant.evaluate import EvalSettings
from bitquant import heal as heal_module
from bitquant.heal import HealHooks, OutOfMemory, heal
from bitquant.recipe import load_recipe
from bitquant.staging import STAGING_PREFIX
from bitquant.training import budget, checkpoint, loop
from bitquant.training.recipe import load_heal_recipe
from bitquant.training.student import make_student
from conftest import DATA, REPO, make_heal_source, run_clean

TEXT = DATA / "alice29.txt"
BOOK = REPO / "bitquant" / "data" / "paradise-lost.txt"
IDS = [3, 17, 42, 5, 88, 61, 9, 23, 77, 14, 2, 50]


def recipe(**changes):
    base = dict(tokens=12 * 4 * 32, batch_tokens=4 * 32, micro_batch_tokens=2 * 32, seq_len=32, sample_tokens=32 * 16,
                sample_batch=8, eval_context=32, eval_max_tokens=512, checkpoint_every=4, lr=2e-2, warmup_steps=2, min_steps=1)
    return load_heal_recipe().replace(**{**base, **changes})


@pytest.fixture
def source(tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("BITQUANT_CACHE", str(tmp_path / "cache"))
    return make_heal_source(tmp_path / "src", tiny_tokenizer_dir)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def student_from_master(master: Path) -> torch.nn.Module:
    """The trained student, rebuilt from the latent weights heal saved."""
    model = runtime.load_fp(master, torch.float32, "cpu")
    modules = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1].endswith("_proj")}
    make_student(model, modules, 1e-5, torch.float32, ("projections",))
    return model.eval()


def test_heal_trains_and_what_is_trained_is_what_ships(source, tmp_path):
    out, master = tmp_path / "out", tmp_path / "master"
    report = heal(str(source), out, recipe=recipe(), eval_text=TEXT, save_master=master, device="cpu")
    h = report.heal
    for key in ("tokens", "steps", "lr", "data", "seconds", "tokens_per_second", "peak_gpu_bytes", "world_size",
                "final_loss", "curve"):
        assert key in h, key
    assert h["steps"] == 12 and h["tokens"] == 12 * 128 and h["world_size"] == 1
    assert h["data"][0]["kind"] == "teacher samples" and len(h["data"][0]["sha256"]) == 64
    assert h["curve"][-1]["loss"] < 0.8 * h["curve"][0]["loss"]  # it learns (0.70 seen)
    ppl = report.perplexity
    assert {"baseline", "quantized", "ratio", "before_heal"} <= set(ppl)
    # a random model's perplexity is near its vocabulary size whatever its weights, so closeness is measured by KL:
    # healing moves the ternary model towards the source
    plain = convert(str(source), tmp_path / "plain", eval_text=TEXT,
                    recipe=load_recipe().replace(eval_context=32, eval_max_tokens=512)).perplexity
    assert ppl["kl_mean"] < 0.95 * plain["kl_mean"] and plain["quantized"] == pytest.approx(ppl["before_heal"]["perplexity"])
    assert h["exactness"]["max_abs_error"] == 0.0 and h["exactness"]["top1_agreement"] == 1.0
    assert not list(tmp_path.glob(STAGING_PREFIX + "*"))  # no training state left behind
    assert not (out / "heal-state").exists()
    card = (out / "README.md").read_text()
    assert "## Healing" in card and "Loss curve" in card and "Greedy completions" in card
    assert json.loads((out / "report.json").read_text())["heal"]["steps"] == 12

    # The student at the end of training, against OUT as bitquant eval runs it ...
    student = student_from_master(master)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        want = student(ids).logits[0]
        exported, _ = runtime.load_model(out, torch.float32, "cpu")
        got = exported(ids).logits[0]
    assert torch.equal(got, want)  # the same arithmetic, bit for bit
    tokens = evaluate.tokenize_for(out, TEXT, EvalSettings(context=32, max_tokens=512))
    mine = evaluate.perplexity_of(student, tokens, EvalSettings(context=32, max_tokens=512), "cpu")["perplexity"]
    theirs = evaluate.evaluate(str(out), TEXT, settings=EvalSettings(context=32, max_tokens=512, device="cpu")).perplexity
    assert mine == theirs
    # ... and as transformers loads it in a process that never imports bitquant.
    clean = run_clean(f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
with torch.no_grad():
    print(json.dumps(m(torch.tensor([{IDS}])).logits[0].float().tolist()))
""")
    clean = torch.tensor(clean)
    assert (clean - want).norm() / want.norm() < 1e-5  # transformers' BitLinear: its own order of operations

    # The master converts to the same model files, byte for byte.
    convert(str(master), tmp_path / "from-master")
    for name in ("model.safetensors", "config.json"):
        assert sha(tmp_path / "from-master" / name) == sha(out / name), name
    assert json.loads((master / "config.json").read_text()).get("quantization_config") is None

    # A second run finds OUT up to date.
    assert heal(str(source), out, recipe=recipe(), eval_text=TEXT, device="cpu").up_to_date


def test_interrupted_heal_resumes_to_identical_weights(source, tmp_path):
    whole = heal(str(source), tmp_path / "whole", recipe=recipe(), device="cpu")

    def stop_at_5(p):
        if p["step"] == 5:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        heal(str(source), out, recipe=recipe(), device="cpu", hooks=HealHooks(train=stop_at_5))
    assert not out.exists()
    staged = list(tmp_path.glob(STAGING_PREFIX + "out-*"))
    assert len(staged) == 1 and checkpoint.saved_step(staged[0] / "heal-state" / checkpoint.CHECKPOINT) == 5
    resumed = heal(str(source), out, recipe=recipe(), device="cpu")
    assert resumed.heal["resumed_from_step"] == 5
    assert sha(out / "model.safetensors") == sha(tmp_path / "whole" / "model.safetensors")
    assert resumed.heal["curve"][-1] == whole.heal["curve"][-1]


def test_a_nan_loss_stops_and_keeps_the_last_checkpoint(source, tmp_path, monkeypatch):
    real, calls = loop.divergence, [0]

    def nan_later(*a, **k):
        calls[0] += 1
        value = real(*a, **k)
        return value * float("nan") if calls[0] > 2 * 6 else value  # 2 micro-batches a step: NaN at step 7

    monkeypatch.setattr(loop, "divergence", nan_later)
    out = tmp_path / "out"
    with pytest.raises(loop.Diverged, match=r"the loss became nan at step 7; the last good checkpoint is kept in .*; lower --lr"):
        heal(str(source), out, recipe=recipe(), device="cpu")
    assert not out.exists()
    staged = list(tmp_path.glob(STAGING_PREFIX + "out-*"))
    assert checkpoint.saved_step(staged[0] / "heal-state" / checkpoint.CHECKPOINT) == 4  # the last checkpoint before the NaN


def test_user_text_and_a_share_of_samples(source, tmp_path):
    report = heal(str(source), tmp_path / "out", recipe=recipe(data_share=0.5), data_files=(BOOK,), device="cpu")
    kinds = {d["kind"]: d for d in report.heal["data"]}
    assert kinds["text"]["share"] == 0.5 and kinds["teacher samples"]["share"] == 0.5
    assert kinds["text"]["files"][0]["sha256"] == hashlib.sha256(BOOK.read_bytes()).hexdigest()
    only_text = heal(str(source), tmp_path / "out2", recipe=recipe(), data_files=(BOOK,), device="cpu")
    assert [d["kind"] for d in only_text.heal["data"]] == ["text"]


def test_the_eval_text_is_refused_as_training_data(source, tmp_path):
    with pytest.raises(UsageError, match="is the --eval-text file"):
        heal(str(source), tmp_path / "out", recipe=recipe(), data_files=(TEXT,), eval_text=TEXT, device="cpu")


def test_out_of_gpu_memory_names_the_options_that_reduce_it(source, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop, "train", oom)
    with pytest.raises(OutOfMemory, match="--micro-batch-tokens .* --batch-tokens"):
        heal(str(source), tmp_path / "out", recipe=recipe(), device="cpu")


def test_heal_exports_gguf(source, tmp_path):
    report = heal(str(source), tmp_path / "out", recipe=recipe(format="gguf-tq2_0"), device="cpu")
    assert report.format == "gguf-tq2_0" and (tmp_path / "out" / "model.gguf").is_file()


def test_low_memory_road_trains_bf16_weights_with_8bit_adamw(source, tmp_path):
    pytest.importorskip("torchao")
    out, master = tmp_path / "out", tmp_path / "master"
    report = heal(str(source), out, recipe=recipe(), device="cpu", low_memory=True, save_master=master)
    h = report.heal
    assert h["road"].startswith("low memory") and h["compute_dtype"] == "bfloat16"
    assert h["teacher_states"]["why"] == "the low-memory road keeps the memory for training"
    assert h["curve"][-1]["loss"] < h["curve"][0]["loss"]
    assert h["exactness"]["relative_error"] <= 1e-6  # still exactly what ships
    # what is trained is what ships: the master converts to OUT byte for byte
    convert(str(master), tmp_path / "again")
    assert sha(tmp_path / "again" / "model.safetensors") == sha(out / "model.safetensors")
    # interrupted and resumed, as on the plain road (the 8-bit optimizer state is in the checkpoint)
    def stop_at_5(p):
        if p["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(str(source), tmp_path / "r", recipe=recipe(), device="cpu", low_memory=True, hooks=HealHooks(train=stop_at_5))
    resumed = heal(str(source), tmp_path / "r", recipe=recipe(), device="cpu", low_memory=True)
    assert resumed.heal["resumed_from_step"] == 5
    assert abs(resumed.heal["final_loss"] / h["final_loss"] - 1) < 0.05  # stochastic rounding: not bit-identical


def test_block_stage_then_kl_and_what_ships_is_still_what_trained(source, tmp_path):
    report = heal(str(source), tmp_path / "out", recipe=recipe(block_stage=0.5), device="cpu")
    h = report.heal
    stages = [c["stage"] for c in h["curve"]]
    assert stages == ["blocks"] * 6 + ["kl"] * 6 and h["block_stage"] == {"share": 0.5, "steps": 6}
    blocks = [c["loss"] for c in h["curve"][:6]]
    assert blocks[-1] < blocks[0]  # each block learns its teacher block
    assert h["exactness"]["max_abs_error"] == 0.0


class FrozenClock:
    """A wall clock that stands still (loading and sampling take no time) and a performance
    counter that advances ``step`` seconds a reading, so that the probe measures exactly
    ``step`` seconds per training step: the arithmetic of --time, without racing the machine."""

    def __init__(self, step: float):
        self.now, self.count, self.step = 1000.0, 0.0, step

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        self.count += self.step
        return self.count


def test_a_time_budget_chooses_the_token_count_and_the_count_repeats_the_run(source, tmp_path, monkeypatch):
    clock = FrozenClock(0.05)
    monkeypatch.setattr(heal_module, "time", clock)
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(budget, "time", clock)
    notes = []
    timed = heal(str(source), tmp_path / "timed", recipe=recipe(time_budget=25, sample_tokens=32 * 64), device="cpu",
                 hooks=HealHooks(note=notes.append))
    b = timed.heal["time_budget"]
    # 25 s less the 20 s kept for export and evaluation leave 5 s: 100 steps of 0.05 s
    assert b["seconds"] == 25 and b["probe_seconds_per_step"] == 0.05 and b["steps"] == 100
    assert timed.heal["tokens"] == b["tokens"] == 100 * 128
    assert any(n.startswith("time budget: 100 steps of 128 tokens fit") for n in notes)
    monkeypatch.undo()
    again = heal(str(source), tmp_path / "count", recipe=recipe(tokens=b["tokens"], sample_tokens=32 * 64, min_steps=1),
                 device="cpu")
    assert again.heal["steps"] == 100  # the same batches, schedule and data: the same weights
    assert sha(tmp_path / "count" / "model.safetensors") == sha(tmp_path / "timed" / "model.safetensors")


def test_a_time_budget_counts_the_on_policy_writing(source, tmp_path, monkeypatch):
    """With on-policy steps the probe adds each step's share of a rollout (timed by the writer)."""
    clock = FrozenClock(0.05)
    monkeypatch.setattr(heal_module, "time", clock)
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(budget, "time", clock)
    from bitquant.training import on_policy

    monkeypatch.setattr(on_policy, "time", FrozenClock(0.2))  # a rollout takes 0.2 s: 0.1 s for each of 2 steps
    timed = heal(str(source), tmp_path / "timed", recipe=recipe(time_budget=25, on_policy=0.5, on_policy_every=2,
                                                                on_policy_prompt=6), device="cpu")
    b = timed.heal["time_budget"]
    assert b["probe_seconds_per_step"] == 0.15 and b["steps"] == 33  # 5 s / 0.15 s


def test_a_time_budget_spreads_a_later_writing_over_the_steps_that_have_it(source, tmp_path, monkeypatch):
    """With on_policy_start, the probe times a rollout written only for that (the first one
    is due later) and adds its share to the steps after the start only."""
    clock = FrozenClock(0.05)
    monkeypatch.setattr(heal_module, "time", clock)
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(budget, "time", clock)
    from bitquant.training import on_policy

    monkeypatch.setattr(on_policy, "time", FrozenClock(0.2))  # a rollout takes 0.2 s: 0.1 s a step, half the steps
    timed = heal(str(source), tmp_path / "timed", recipe=recipe(time_budget=25, on_policy=0.5, on_policy_every=2,
                                                                on_policy_prompt=6, on_policy_start=0.5), device="cpu")
    b, op = timed.heal["time_budget"], timed.heal["on_policy"]
    assert b["probe_seconds_per_step"] == 0.1 and b["steps"] == 50  # 5 s / (0.05 + 0.1 / 2)
    assert op["first_step"] == 26 and op["rollouts"] == 12  # windows 13 ... 24 of 2 steps; the timing one is not counted


def test_a_time_budget_too_short_for_one_step_is_refused(source, tmp_path):
    with pytest.raises(UsageError, match="--time 1s leaves no time to train"):
        heal(str(source), tmp_path / "out", recipe=recipe(time_budget=1), device="cpu")
    assert not (tmp_path / "out").exists()


def test_only_the_samples_the_run_reads_are_drawn(source, tmp_path):
    notes = []
    report = heal(str(source), tmp_path / "out", recipe=recipe(tokens=4 * 128, sample_tokens=32 * 1000, min_steps=1),
                  device="cpu", hooks=HealHooks(note=notes.append))
    assert report.heal["data"][0]["tokens"] == 4 * 128
    assert any("sampling 512 tokens from the teacher" in n for n in notes)


def test_the_report_has_both_models_greedy_completions(source, tmp_path):
    report = heal(str(source), tmp_path / "out", recipe=recipe(tokens=4 * 128, min_steps=1), device="cpu")
    g = report.generation
    assert g["decoding"] == "greedy" and g["max_new_tokens"] == 64 and len(g["prompts"]) == 32
    for label in ("source", "healed"):
        m = g["models"][label]
        assert len(m["completions"]) == 32 and 0 < m["distinct_4grams"] <= 1
        assert 0 <= m["distinct_4grams_se"] < 0.5  # every completion here runs to 64 tokens
    card = (tmp_path / "out" / "README.md").read_text()
    assert "distinct 4-grams over the 32 completions" in card and "(4 of 32; `report.json` has every one)" in card
    assert g["prompts"][3] in card and g["prompts"][4] not in card  # the card shows the first four
    assert "its standard error over 32 completions" in card


def test_the_card_and_summary_say_what_was_not_measured_and_what_went_wrong(source, tmp_path):
    import dataclasses

    from bitquant import card
    from bitquant.source import resolve_source

    report = heal(str(source), tmp_path / "out", recipe=recipe(tokens=4 * 128, min_steps=1), device="cpu")
    assert report.perplexity is None
    text = (tmp_path / "out" / "README.md").read_text()
    assert "Perplexity not measured: run `bitquant eval OUT TEXT`" in text and "recovers" not in text
    g = json.loads(json.dumps(report.generation))
    g["models"]["source"]["distinct_4grams"], g["models"]["healed"]["distinct_4grams"] = 0.83, 0.03
    h = json.loads(json.dumps(report.heal))
    h["curve"] = [{"step": 1, "tokens": 128, "loss": 11.0, "stage": "kl"}, {"step": 2, "tokens": 256, "loss": 19.1, "stage": "kl"}]
    bad = dataclasses.replace(report, generation=g, heal=h)
    findings = bad.heal_findings()
    assert len(findings) == 3 and "repeat themselves (distinct 4-grams 0.03, the source 0.83)" in findings[0]
    assert "teacher's samples alone; half real text (--data FILE --data-share 0.5)" in findings[1]
    assert "no recipe measured so far, real text included, stops the repetition" in findings[1]
    assert "did not fall (11 at step 1, 19.1 at step 2)" in findings[2]
    with_text = {**h, "data": [{"kind": "text", "share": 1.0, "files": []}]}  # trained on text: no such advice
    assert dataclasses.replace(report, generation=g, heal=with_text).heal_findings() == [findings[0], findings[2]]
    rendered = card.render(bad, resolve_source(str(source)))
    assert "Its greedy completions repeat themselves" in rendered and "it is not usable for generation as it is." in rendered
    assert "The training loss did not fall" in rendered
    assert dataclasses.replace(report, generation=g, heal={**h, "curve": h["curve"][::-1]}).heal_findings() == findings[:2]


ON_POLICY = dict(on_policy=0.5, on_policy_prompt=6, on_policy_every=3)


def test_on_policy_steps_write_score_and_lower_the_loss(source, tmp_path):
    """Half of every batch is written by the student from prompts of the data; training on
    them lowers the divergence on them; the report says what was chosen."""
    report = heal(str(source), tmp_path / "out", recipe=recipe(**ON_POLICY, tokens=24 * 4 * 32), device="cpu")
    h = report.heal
    op = h["on_policy"]
    assert op["share"] == 0.5 and op["rows_per_step"] == 2 and op["every"] == 3 and op["prompt_tokens"] == 6
    assert op["rollouts"] == 8 and op["tokens_written"] == 8 * 6 * (32 - 6) and op["tokens_per_second"] > 0
    assert [d["kind"] for d in h["data"]] == ["teacher samples", "on-policy (written by the student)"]
    curve = [c["loss"] for c in h["curve"]]
    assert sum(curve[-4:]) / 4 < 0.7 * sum(curve[:4]) / 4
    assert h["exactness"]["relative_error"] == 0.0 and h["exactness"]["top1_agreement"] == 1.0


def test_on_policy_steps_can_start_after_a_share_of_the_steps(source, tmp_path):
    """on_policy_start: the first half of the steps trains on data rows alone (scored
    everywhere); the first rollout comes at the first window boundary from there."""
    from bitquant.training.on_policy import OnPolicy

    assert [OnPolicy(0.5, 1.0, 16, 32, 1, s).first_step(100) for s in (0.0, 0.3, 0.32, 0.5)] == [0, 32, 32, 64]
    report = heal(str(source), tmp_path / "out", recipe=recipe(**ON_POLICY, on_policy_start=0.5), device="cpu")
    op = report.heal["on_policy"]
    assert op["start"] == 0.5 and op["first_step"] == 6  # 12 steps, windows of 3
    assert op["rollouts"] == 2 and op["tokens_written"] == 2 * 6 * (32 - 6)
    assert report.heal["exactness"]["relative_error"] == 0.0
    curve = [c["loss"] for c in report.heal["curve"]]
    assert curve[5] < curve[0]


def test_unlikelihood_makes_the_students_own_text_repeat_less(source, tmp_path):
    """Greedy on-policy rows, with and without the unlikelihood term on their repeated
    4-grams: with it, the student's later rollouts repeat less (the report keeps each
    rollout's share of repeating tokens; the card says both), and the student still equals OUT."""
    from bitquant import card
    from bitquant.source import resolve_source

    shares = {}
    for alpha in (0.0, 10.0):
        r = recipe(on_policy=0.5, on_policy_prompt=6, on_policy_every=2, on_policy_temperature=0.0,
                   unlikelihood=alpha, tokens=24 * 4 * 32)
        report = heal(str(source), tmp_path / f"out{alpha}", recipe=r, device="cpu")
        op = report.heal["on_policy"]
        assert op["unlikelihood"] == alpha and op["unlikelihood_n"] == 4 and len(op["repeated_shares"]) == 12
        assert report.heal["exactness"]["relative_error"] == 0.0
        shares[alpha] = [d["share"] for d in op["repeated_shares"]]
        rendered = card.render(report, resolve_source(str(source)))
        assert ("unlikelihood term (weight 10)" in rendered) == (alpha > 0)
        assert "its own text repeated a 4-gram at " in rendered
    assert shares[0.0][0] == shares[10.0][0]  # the same first rollout (written before any step)
    later = {a: sum(s[6:]) / 6 for a, s in shares.items()}
    assert later[10.0] < 0.75 * later[0.0], later


def test_a_run_too_short_for_its_first_rollout_says_so(source, tmp_path):
    """12 steps, rollouts every 16 from half-way: the first would come at step 16, after the
    run; the user is told while it runs, and the summary and card say it too."""
    notes = []
    r = recipe(on_policy=0.5, on_policy_prompt=6, on_policy_every=16, on_policy_start=0.5)
    report = heal(str(source), tmp_path / "out", recipe=r, device="cpu", hooks=HealHooks(note=notes.append))
    op = report.heal["on_policy"]
    assert op["rollouts"] == 0 and op["first_step"] == 16 and report.heal["steps"] == 12
    said = "no on-policy step in this run: its 12 steps end before the first rollout at step 16"
    assert any(n.startswith(said) for n in notes), notes
    assert any("no on-policy step ran: the run's 12 steps ended before the first rollout at step 16" in f
               for f in report.heal_findings())
    ran = heal(str(source), tmp_path / "ran", recipe=r.replace(on_policy_every=4), device="cpu")
    assert ran.heal["on_policy"]["rollouts"] > 0
    assert not any("no on-policy step" in f for f in ran.heal_findings())


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_every_loss_trains_what_ships(source, tmp_path, loss):
    report = heal(str(source), tmp_path / "out", recipe=recipe(loss=loss, **ON_POLICY), device="cpu")
    assert report.heal["loss"]["kind"] == loss
    assert report.heal["exactness"]["relative_error"] == 0.0 and report.heal["exactness"]["top1_agreement"] == 1.0
    curve = [c["loss"] for c in report.heal["curve"]]
    assert curve[-1] < curve[0]


def test_trained_embeddings_take_the_compiled_loss_and_ship_what_trained(source, tmp_path, compiled_loss_calls):
    """``train: [projections, norms, embeddings]``: the head's gradient goes through the
    compiled chunks (forced on the CPU, as on CUDA), the embeddings and head move, and OUT is
    still the student bit for bit."""
    from safetensors.torch import load_file

    from bitquant.training import loss

    r = recipe(train=("projections", "norms", "embeddings"), lr=5e-3)  # 2e-2 shakes the embeddings (loss up 1.2x)
    report = heal(str(source), tmp_path / "out", recipe=r, device="cpu")
    assert compiled_loss_calls and not loss._COMPILED_FAILED
    assert report.heal["loss"]["implementation"] == "chunked (torch, each chunk compiled)"
    assert report.heal["exactness"]["relative_error"] == 0.0 and report.heal["exactness"]["top1_agreement"] == 1.0
    curve = [c["loss"] for c in report.heal["curve"]]
    assert curve[-1] < 0.8 * curve[0]
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(before[name].float(), after[name].float()), name


@pytest.mark.parametrize("start, stop, unlikelihood", [(0.0, 5, 0.0), (0.5, 7, 0.0), (0.0, 5, 2.0)])
def test_on_policy_run_resumes_to_identical_weights(source, tmp_path, start, stop, unlikelihood):
    """Stopped inside a rollout window (step 5 of windows of 3; with on_policy_start 0.5,
    step 7: data rows until step 6, then the window of steps 6-8), the resumed run trains on
    the same student-written sequences (and, with unlikelihood, the same repeats marked in
    them) and ends with the same weights."""
    r = recipe(**ON_POLICY, on_policy_start=start, unlikelihood=unlikelihood)
    whole = heal(str(source), tmp_path / "whole", recipe=r, device="cpu")

    def stop_there(p):
        if p["step"] == stop:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        heal(str(source), out, recipe=r, device="cpu", hooks=HealHooks(train=stop_there))
    resumed = heal(str(source), out, recipe=r, device="cpu")
    assert resumed.heal["resumed_from_step"] == stop
    assert sha(out / "model.safetensors") == sha(tmp_path / "whole" / "model.safetensors")
    assert resumed.heal["curve"][-1] == whole.heal["curve"][-1]
    assert resumed.heal["on_policy"]["repeated_shares"] == whole.heal["on_policy"]["repeated_shares"]


def test_the_rollout_writer_computes_what_ships(source, tmp_path):
    """The student's on-policy writer runs the exported model: its logits equal those of OUT
    loaded by bitquant's runtime, for the same latent weights."""
    from bitquant.training.on_policy import Snapshot

    out = tmp_path / "out"
    heal(str(source), out, recipe=recipe(), save_master=tmp_path / "master", device="cpu")
    student = student_from_master(tmp_path / "master")
    snapshot = Snapshot(student, 1e-5, torch.float32, torch.float32, "cpu")
    exported, _ = runtime.load_model(out, torch.float32, "cpu")
    ids = torch.tensor([IDS])
    with torch.inference_mode():
        assert torch.equal(snapshot.model(input_ids=ids).logits, exported(input_ids=ids).logits)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01)
        snapshot.update(student)  # in place: new codes, scales and norms
        assert not torch.equal(snapshot.model(input_ids=ids).logits, exported(input_ids=ids).logits)
