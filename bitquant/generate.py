"""Text generation from FP and ternary models, beside the runtime that runs them.

``bitquant generate`` streams one completion; heal's report measures the greedy
completions of fixed prompts by the source and the healed model, and
:func:`distinct_ngrams` turns a looping model ("the the the …") into one number.
Models are loaded by :func:`bitquant.runtime.load_model` (FP checkpoints through
transformers, ternary ones as deployed, W1.58A8: on a GPU, the packed W2A8 kernels). On
CUDA they decode with :class:`bitquant.decode.StaticDecoder` (a static KV cache, the
whole step replayed from one CUDA graph, optionally compiled by ``torch.compile`` first;
the prompt goes through it a token at a time);
on the CPU with transformers' ``generate`` and its KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bitquant.errors import UsageError, describe

#: Prompts completed greedily by the source and the healed model in heal's report: openings
#: of many kinds of text, none from alice29.txt or Paradise Lost. Their pooled distinct
#: 4-grams carry a standard error of about 0.02-0.03 for SmolLM2, where the four prompts the
#: report used until 2026-12-08 ("The capital of France is", ...) carried about 0.06.
PROMPTS = (
    "The history of the printing press begins", "She opened the letter and read", "To change a flat tire, first",
    "The main causes of the First World War were", "In the middle of the night, the old dog",
    "Photosynthesis is the process by which", "My favourite recipe for bread uses", "The meeting was postponed because",
    "Dear Sir, I am writing to complain about", "The river flows through the valley and",
    "When the train finally arrived at the station,", "A good night's sleep helps",
    "The scientist looked at the results and said", "There are many reasons to learn a second language.",
    "The city council voted on Tuesday to", "He had never seen the sea before, so", "The best way to learn to program is",
    "In 1969, astronauts", "The recipe calls for two eggs, a cup of flour and", "Once the snow had melted, the farmers",
    "The museum's new exhibition shows", "Water boils at a lower temperature on a mountain because",
    "The detective examined the room and noticed", "Our team won the match after",
    "The internet has changed the way people", "Every morning, the baker", "The theory of evolution explains",
    "I remember the summer when my grandmother", "The old castle on the hill", "To keep a garden healthy, you should",
    "The company announced that its profits", "Music has the power to",
)
#: Prompts completed at once (left-padded into one batch).
COMPLETION_BATCH = 32
#: New tokens per completion in the report.
REPORT_TOKENS = 64


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at ``temperature`` 0, else sampled at that
    temperature from the smallest set of tokens whose probability reaches ``top_p``."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")

    def config(self, tokenizer):
        from transformers import GenerationConfig

        sampled = self.temperature > 0
        eos = tokenizer.eos_token_id
        return GenerationConfig(
            do_sample=sampled, temperature=self.temperature if sampled else None, top_p=self.top_p if sampled else None,
            top_k=None, max_new_tokens=self.max_new_tokens, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0),
        )


@dataclass
class Generation:
    """One completion: its text and token ids, and how fast it was produced."""

    text: str
    ids: list[int]
    prompt_tokens: int
    seconds: float
    #: of ``seconds``, those spent building the static decoder (graph capture; with
    #: ``compile``, torch.compile's work, which the first step waits for)
    setup: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second once the decoder was built."""
        rest = self.seconds - self.setup
        return len(self.ids) / rest if rest > 0 else 0.0


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """The prompt's token ids; with ``chat``, wrapped in the tokenizer's chat template as one
    user turn, ready for the assistant's answer."""
    if not prompt.strip():
        raise UsageError("the prompt is empty; give PROMPT or pipe text on stdin")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat needs a chat template, and this model's tokenizer has none; drop --chat")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


class _Stream:
    """A transformers streamer that hands each new piece of text to ``on_text`` (decoding
    the whole completion each time, so multi-token characters come out whole)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands the prompt over first
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self._show(last=False)

    def end(self) -> None:
        self._show(last=True)

    def _show(self, last: bool) -> None:
        """Hand over what the decoded text adds to what was shown (a half character waits
        for the rest, unless this is the end)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not last:
            return
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
        self.shown = text


@torch.inference_mode()
def generate(model, tokenizer, ids: torch.Tensor, sampling: Sampling,
             on_text: Callable[[str], None] | None = None, static: bool | None = None,
             compile: bool | str = False) -> Generation:
    """Complete the prompt ``ids`` ([1, n]) with ``model``; ``on_text`` gets the text as it
    is produced. Seeded: the same seed gives the same completion on the same device.
    ``compile`` (the static decoder only): its step through ``torch.compile`` first."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    stream = _Stream(tokenizer, on_text or (lambda _text: None))
    torch.manual_seed(sampling.seed)
    if static is None:
        static = device.type == "cuda"
    began = time.perf_counter()
    setup = 0.0
    if static:
        new, setup = _static_generate(model, ids, sampling, tokenizer.eos_token_id, stream, compile)
    else:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=sampling.config(tokenizer),
                             streamer=stream)
        new = out[0, ids.shape[1]:].tolist()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    stream.end()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new, ids.shape[1], seconds, setup)


def _static_generate(model, ids: torch.Tensor, sampling: Sampling, eos: int | None, stream: _Stream,
                     compile: bool | str = False) -> tuple[list[int], float]:
    """Decode with :class:`bitquant.decode.StaticDecoder`: the prompt a token at a time,
    then ``max_new_tokens`` tokens or up to EOS, each handed to ``stream``. Returns the new
    tokens and the seconds spent building the decoder."""
    from bitquant import activity
    from bitquant.decode import StaticDecoder

    n = ids.shape[1]
    began = time.perf_counter()
    if compile:
        activity.step("compiling the decode step (torch.compile; about 30 s for a 7B model)")
    decoder = StaticDecoder(model, 1, n + sampling.max_new_tokens, compile=compile)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    setup = time.perf_counter() - began
    generator = torch.Generator(device=ids.device).manual_seed(sampling.seed)
    stream.put(ids)  # the prompt, as transformers' generate hands it over first
    for i in range(n):
        logits = decoder.step(ids[:, i : i + 1], i)
    new: list[int] = []
    for t in range(sampling.max_new_tokens):
        token = next_token(logits, sampling, generator)
        new.append(int(token))
        stream.put(token.reshape(1))
        if new[-1] == eos or t + 1 == sampling.max_new_tokens:
            break
        logits = decoder.step(token.reshape(1, 1), n + t)
    return new, setup


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """The next token from one row of logits ([1, vocab]): the argmax at temperature 0, else
    a draw from softmax(logits / temperature) restricted to the smallest set of most likely
    tokens whose probability reaches ``top_p``."""
    if sampling.temperature == 0:
        return logits[0].argmax()
    probs = torch.softmax(logits[0].float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < sampling.top_p  # mass before each token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return torch.multinomial(probs, 1, generator=generator)[0]


def run_generate(model: str, prompt: str, sampling: Sampling, *, chat: bool = False, device: str = "auto",
                 dtype: str = "auto", revision: str | None = None, token: str | None = None,
                 on_text: Callable[[str], None] | None = None, compile: bool = False) -> Generation:
    """``bitquant generate``: load ``model`` (anything ``eval`` takes), complete ``prompt``;
    ``compile``: the CUDA decoder's step through ``torch.compile``."""
    from bitquant import activity, runtime
    from bitquant.evaluate import EvalSettings
    from bitquant.source import resolve_source

    settings = EvalSettings(device=device, dtype=dtype)
    activity.step(f"opening {model}")
    folder = resolve_source(model, revision=revision, token=token).path
    runtime.check_evaluable(folder)
    tokenizer = runtime.load_tokenizer(folder)
    ids = prompt_ids(tokenizer, prompt, chat)
    where = settings.resolved_device()
    if compile and where != "cuda":
        raise UsageError("--compile needs a CUDA device (it compiles the CUDA-graph decoder); drop --compile "
                         "or use --device cuda")
    activity.step(f"loading {model}")
    lm, _ = runtime.load_model(folder, settings.resolved_dtype(where), where)
    return generate(lm, tokenizer, ids, sampling, on_text, compile=compile)


@torch.inference_mode()
def completions(model, tokenizer, prompts: tuple[str, ...] = PROMPTS, max_new_tokens: int = REPORT_TOKENS,
                progress: Callable[[int, int], None] | None = None, batch: int = COMPLETION_BATCH) -> list[Generation]:
    """Greedy completions of ``prompts`` (no chat template), ``batch`` at a time: the prompts
    left-padded, with their attention mask, through transformers' ``generate``, each row cut
    after its first EOS. Each row gets the greedy tokens it gets alone, up to float rounding
    (equal on tiny models in the tests, and for all 32 prompts on SmolLM2, FP and ternary);
    on 2 CPU cores the 32 took 7.2 s in one batch against 81.7 s one at a time (SmolLM2 FP,
    ``bench/report_completions.py``).
    Each completion's ``seconds`` is its batch's share."""
    device = next(model.parameters()).device
    config = Sampling(max_new_tokens=max_new_tokens).config(tokenizer)
    stops = _stop_ids(model, tokenizer)
    out: list[Generation] = []
    for begin in range(0, len(prompts), batch):
        rows = [prompt_ids(tokenizer, p, chat=False)[0] for p in prompts[begin : begin + batch]]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.int64)  # padding: masked out, so any id in the table
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
        began = time.perf_counter()
        result = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=config)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        share = (time.perf_counter() - began) / len(rows)
        for i, r in enumerate(rows):
            new = result[i, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stops), None)
            if end is not None:  # a finished row is padded after its EOS
                new = new[: end + 1]
            out.append(Generation(tokenizer.decode(new, skip_special_tokens=True), new, len(r), share))
        if progress:
            progress(len(out), len(prompts))
    return out


def _stop_ids(model, tokenizer) -> set[int]:
    """The EOS ids ``generate`` stops a row at: the tokenizer's, and those of the model's own
    generation config, which transformers adds where the config passed names none."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(own if isinstance(own, (list, tuple)) else [own])]
    return {int(i) for i in ids if i is not None}


def distinct_ngrams(sequences: list[list[int]], n: int = 4) -> float:
    """The share of distinct n-grams among all n-grams of ``sequences`` (token ids, each
    sequence's n-grams taken on its own, then pooled): 1.0 when nothing repeats, near 0 for
    a model that loops. ``nan`` when no sequence has n tokens."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def distinct_se(sequences: list[list[int]], n: int = 4) -> float | None:
    """The standard error of the mean of each sequence's own distinct n-gram share (sequences
    under n tokens left out): how far :func:`distinct_ngrams` over these few completions may
    stand from the figure over many. None with fewer than two sequences."""
    import statistics

    each = [distinct_ngrams([s], n) for s in sequences if len(s) >= n]
    return round(statistics.stdev(each) / len(each) ** 0.5, 4) if len(each) > 1 else None


def generation_report(models: list[tuple[str, Path]], tokenizer, device: str,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """The report's ``generation``: for each (label, folder), the greedy completions of
    :data:`PROMPTS` (``REPORT_TOKENS`` new tokens each, in one batch), their pooled
    ``distinct_4grams`` and its standard error (``distinct_4grams_se``: about 0.02-0.03 over
    the 32 prompts for SmolLM2, FP or healed). Should the batch fail (on a GPU the batched
    road has run only under Triton's interpreter so far), that model's prompts are completed
    one at a time and ``one_at_a_time`` names the model and the error."""
    from bitquant import runtime
    from bitquant.evaluate import EvalSettings

    dtype = EvalSettings().resolved_dtype(device)  # as bitquant eval and generate: float32 on CPU, bf16 on CUDA
    out = {"prompts": list(PROMPTS), "max_new_tokens": REPORT_TOKENS, "decoding": "greedy", "models": {}}
    total = len(models) * len(PROMPTS)
    for k, (label, folder) in enumerate(models):
        model, _ = runtime.load_model(folder, dtype, device)
        step = (lambda done, _n, k=k: progress(k * len(PROMPTS) + done, total)) if progress else None
        try:
            gens = completions(model, tokenizer, progress=step)
        except Exception as e:  # a finished run is not lost over its report's completions: one at a time instead
            out.setdefault("one_at_a_time", {})[label] = describe(e)
            gens = one_at_a_time(model, tokenizer, progress=step)
        del model
        out["models"][label] = {
            "completions": [g.text for g in gens],
            "distinct_4grams": round(distinct_ngrams([g.ids for g in gens], 4), 4),
            "distinct_4grams_se": distinct_se([g.ids for g in gens], 4),
            "new_tokens": [len(g.ids) for g in gens],
        }
    return out


def one_at_a_time(model, tokenizer, prompts: tuple[str, ...] = PROMPTS, max_new_tokens: int = REPORT_TOKENS,
                  progress: Callable[[int, int], None] | None = None) -> list[Generation]:
    """Greedy completions of ``prompts`` as the report made them until 2026-12-08: one
    prompt at a time, through the static decoder on CUDA (the report's fallback, and the
    baseline of ``bench/report_completions.py``)."""
    sampling = Sampling(max_new_tokens=max_new_tokens)
    out = []
    for prompt in prompts:
        out.append(generate(model, tokenizer, prompt_ids(tokenizer, prompt, chat=False), sampling))
        if progress:
            progress(len(out), len(prompts))
    return out
