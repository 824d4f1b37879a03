"""Batched decoding with a static KV cache, one new token per sequence per step, through
the model's own decoder blocks: heal's teacher sampling.

transformers' ``generate`` with its static cache attends over the whole cache length at
every step and spends much of each step outside the model (argument handling in every
module call, logits processors, stopping criteria that wait for the GPU). This loop keeps
one preallocated key/value buffer per block, attends to the positions written so far
(step t reads t keys, not the cache length), groups query heads per key/value head
instead of repeating keys, and draws the next token with the Gumbel-max trick on the GPU.
The projections, norms, rotary embedding and MLP are the model's own modules, and the
family table (:mod:`bitquant.families`) says where a block differs from Llama's (fused
q/k/v, norms around the MLP, layers without rotary embedding, sliding windows), so the
arithmetic is transformers'; a test checks each step's logits against the model's full
forward pass, for every family.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bitquant import families
from bitquant.families import Family


def _rotary(layer: torch.nn.Module) -> Callable:
    """The model family's own ``apply_rotary_pos_emb`` (from the module of its attention class)."""
    return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb


def _block_step(layer, h: torch.Tensor, pe, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int | torch.Tensor,
                rotary, family: Family, window: int | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder block on one new token per sequence (``h``: [B, 1, hidden]), its key and
    value written at ``pos`` of the block's cache ([B, kv_heads, length, head_dim]), attending
    to positions 0..pos (the last ``window`` of them in a sliding-window layer). The block's
    own modules do the arithmetic; only the attention's plumbing is done here, without
    transformers' per-call argument handling, which costs more than the arithmetic at one
    token a step. The family's fields say where its block differs from Llama's.

    ``pos`` is a Python int (the keys read are sliced to 0..pos), or a one-element tensor on
    the device with ``mask`` ([1, 1, 1, length] booleans, the positions this layer may attend to):
    then the whole cache is read under the mask and the step has fixed shapes and no host
    values, as a CUDA graph needs."""
    attn = layer.self_attn
    b = h.shape[0]
    hd = k_cache.shape[-1]
    kv = k_cache.shape[1]
    x = layer.input_layernorm(h)
    if "qkv_proj" in family.fused:  # one matrix: q rows, then k, then v
        q, k, v = attn.qkv_proj(x).split([attn.config.num_attention_heads * hd, kv * hd, kv * hd], dim=-1)
        q, k, v = q.view(b, 1, -1, hd), k.view(b, 1, kv, hd), v.view(b, 1, kv, hd)
    else:
        q = attn.q_proj(x).view(b, 1, -1, hd)
        k = attn.k_proj(x).view(b, 1, kv, hd)
        v = attn.v_proj(x).view(b, 1, kv, hd)
    if "self_attn.q_norm" in family.norms:  # Qwen3, Gemma 3: per-head norms before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if not family.nope_layers or attn.use_rope:
        q, k = rotary(q, k, *pe)
    heads = q.shape[1]
    if isinstance(pos, torch.Tensor):
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v.transpose(1, 2))
        keys, values = k_cache, v_cache
    else:
        k_cache[:, :, pos] = k[:, :, 0]
        v_cache[:, :, pos] = v[:, 0]
        first = 0 if window is None else max(0, pos + 1 - window)
        keys, values = k_cache[:, :, first : pos + 1], v_cache[:, :, first : pos + 1]
    # grouped-query attention without repeating keys: each key/value head's query heads
    # become that head's "query positions" (all attend to every cached position)
    o = F.scaled_dot_product_attention(q.reshape(b, kv, heads // kv, hd), keys, values, attn_mask=mask,
                                       scale=attn.scaling)
    o = attn.o_proj(o.reshape(b, 1, heads * hd))
    if family.sandwich_norms:
        h = h + layer.post_attention_layernorm(o)
        return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
    h = h + o
    return h + layer.mlp(layer.post_attention_layernorm(h))


class _Parts(NamedTuple):
    """What a decoding step needs of a model: its pieces, the family's row, and one
    zeroed key/value cache per block ([rows, kv_heads, length, head_dim])."""

    config: object
    body: torch.nn.Module
    head: torch.nn.Module
    family: Family
    rotary: Callable
    windows: list[int | None]
    caches: list[tuple[torch.Tensor, torch.Tensor]]


def _parts(model, rows: int, length: int) -> _Parts:
    config = model.config
    body, head = model.get_decoder(), model.get_output_embeddings()
    layers = body.layers
    device, dtype = head.weight.device, body.embed_tokens.weight.dtype
    kv, hd = config.num_key_value_heads, layers[0].self_attn.head_dim
    caches = [(torch.zeros(rows, kv, length, hd, dtype=dtype, device=device),
               torch.zeros(rows, kv, length, hd, dtype=dtype, device=device)) for _ in layers]
    family = families.family_of_model(model)
    windows = [families.sliding_window(family, config, layer.self_attn) for layer in layers]
    return _Parts(config, body, head, family, _rotary(layers[0]), windows, caches)


def _step(parts: _Parts, h: torch.Tensor, pos: int | torch.Tensor, position_ids: torch.Tensor,
          masks: dict[int | None, torch.Tensor] | None = None) -> torch.Tensor:
    """The embeddings ``h`` ([rows, 1, hidden]) of the tokens at position ``pos`` through every
    block (see :func:`_block_step` for ``pos`` and ``masks``, one per window length); float32
    logits of the next position. The embedding lookup is the caller's: it stays outside a
    CUDA graph, as the table may live in host memory (:class:`bitquant.runtime.HostEmbedding`)."""
    body = parts.body
    pes = families.position_embeddings(parts.family, body.rotary_emb, parts.config, h, position_ids)
    for layer, pe, window, (k_cache, v_cache) in zip(body.layers, pes, parts.windows, parts.caches):
        h = _block_step(layer, h, pe, k_cache, v_cache, pos, parts.rotary, parts.family, window,
                        None if masks is None else masks[window])
    return families.soft_cap(parts.head(body.norm(h[:, -1])), parts.config).float()


def choose(logits: torch.Tensor, temperature: float, generator: torch.Generator, top_p: float = 1.0) -> torch.Tensor:
    """One next token per row of float32 ``logits`` ([rows, vocab]): the argmax at
    ``temperature`` 0, else a draw from softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches ``top_p`` (Gumbel-max on
    the device: argmax of logits / T plus Gumbel noise, the excluded tokens at -inf)."""
    if temperature == 0:
        return logits.argmax(-1)
    if top_p < 1:
        z = logits / temperature
        sorted_z, order = z.sort(-1, descending=True)
        probs = torch.softmax(sorted_z, -1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # the mass before a token already reaches top_p
        logits = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
        temperature = 1.0
    return gumbel_argmax(logits, temperature, generator)


@torch.inference_mode()
def sample_batch(model, rows: int, length: int, bos_id: int, temperature: float, banned: list[int],
                 generator: torch.Generator, on_step: Callable[[int, torch.Tensor], None] | None = None,
                 prompts: torch.Tensor | None = None, top_p: float = 1.0, greedy: int = 0) -> torch.Tensor:
    """``rows`` sequences of ``length`` token ids (int64, on the model's device), each
    starting with ``bos_id`` (or with the rows of ``prompts``, [rows, P]), every next token
    drawn by :func:`choose` at ``temperature`` and ``top_p`` (the first ``greedy`` tokens after
    the prompt: the argmax) with the ``banned`` ids (EOS) excluded. ``generator`` (on the
    model's device) makes it repeatable. ``on_step(pos, logits)`` sees each step's float32
    logits (before the ban). Eager, reading each block's cache only up to the position."""
    parts = _parts(model, rows, length)
    device = parts.head.weight.device
    step = lambda tokens, pos: _step(parts, parts.body.embed_tokens(tokens), pos,  # noqa: E731
                                     torch.full((1, 1), pos, dtype=torch.long, device=device))
    return _draw(step, rows, length, bos_id, temperature, banned, generator, on_step, prompts, top_p, greedy, device)


@torch.inference_mode()
def sample_graph(decoder: "StaticDecoder", length: int, bos_id: int, temperature: float, banned: list[int],
                 generator: torch.Generator, prompts: torch.Tensor | None = None, top_p: float = 1.0,
                 greedy: int = 0) -> torch.Tensor:
    """:func:`sample_batch` through a :class:`StaticDecoder` (on CUDA, each step one CUDA graph
    replay): the same draws, for as many rows as the decoder was built with."""
    device = decoder.h.device
    return _draw(decoder.step, decoder.h.shape[0], length, bos_id, temperature, banned, generator, None, prompts,
                 top_p, greedy, device)


def _draw(step: Callable, rows: int, length: int, bos_id: int, temperature: float, banned: list[int],
          generator: torch.Generator, on_step, prompts: torch.Tensor | None, top_p: float, greedy: int,
          device) -> torch.Tensor:
    out = torch.empty(rows, length, dtype=torch.int64, device=device)
    if prompts is None:
        out[:, 0] = bos_id
        first = 1
    else:
        first = prompts.shape[1]
        out[:, :first] = prompts.to(device)
    ban = torch.tensor(banned, dtype=torch.long, device=device) if banned else None
    for pos in range(length - 1):
        logits = step(out[:, pos : pos + 1], pos)
        if pos + 1 < first:
            continue  # the prompt's tokens are given
        if on_step:
            on_step(pos, logits)
        if ban is not None:  # in place: a fresh tensor, or a graph's output that the next replay rewrites
            logits.index_fill_(1, ban, float("-inf"))
        out[:, pos + 1] = choose(logits, 0.0 if pos + 1 < first + greedy else temperature, generator, top_p)
    return out


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from softmax(logits / temperature): argmax(logits / T + Gumbel noise)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    noise = -torch.log(-torch.log(u.clamp_(1e-20, 1.0)))
    return (logits / temperature + noise).argmax(-1)


class StaticDecoder:
    """One token per sequence per step through the model's own blocks, with shapes fixed by
    a static cache of ``length`` positions, so that on CUDA the step (every block and the
    head; the embedding lookup comes before it, as the token table may be in host memory)
    is captured once in a CUDA graph and replayed: one launch a token
    instead of several hundred, which is what a 7B model's decode at batch 1 is bound by.
    Elsewhere (CPU, or ``graph=False``) the same step runs eagerly; the tests check its
    logits against the full forward pass there.

    ``step(tokens, pos)`` embeds ``tokens`` ([rows, 1]) outside the graph, runs them at
    position ``pos`` and returns the float32 logits for the next position ([rows, vocab];
    the same tensor every step)."""

    def __init__(self, model, rows: int, length: int, graph: bool | None = None, compile: bool | str = False):
        self.parts = _parts(model, rows, length)
        self._run = _step
        if compile:  # True: inductor (fuses the norms, rotary and residuals); or a backend's name
            # inductor keeps eager's roundings to bf16 between the ops it fuses. Without it,
            # on an H100, SmolLM2's logits after a prompt moved by 3.5% (FP) and 16% (ternary)
            # of the largest; with it they equal eager's, at the same speed (docs/measurements.md)
            import torch._inductor.config as inductor  # an older torch without the option fuses as it does

            exact = {"emulate_precision_casts": True} if hasattr(inductor, "emulate_precision_casts") else {}
            options = {"options": exact} if compile is True else {"backend": compile}
            self._run = torch.compile(_step, dynamic=False, **options)
        self.length = length
        device = self.parts.head.weight.device
        self.h = torch.zeros(rows, 1, self.parts.config.hidden_size, dtype=self.parts.caches[0][0].dtype,
                             device=device)  # the graph's input: this step's embeddings
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.places = torch.arange(length, device=device).view(1, 1, 1, length)
        self.logits: torch.Tensor | None = None
        self.graph = None
        if graph is None:
            graph = device.type == "cuda"
        if graph:
            self._capture()

    def _masks(self) -> dict[int | None, torch.Tensor]:
        seen = self.places <= self.pos
        masks: dict[int | None, torch.Tensor] = {None: seen}
        for w in set(self.parts.windows) - {None}:
            masks[w] = seen & (self.places > self.pos - w)
        return masks

    def _step(self) -> torch.Tensor:
        return self._run(self.parts, self.h, self.pos, self.pos.view(1, 1), self._masks())

    @torch.inference_mode()
    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernels compiled, workspaces allocated
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        if not 0 <= pos < self.length:
            raise ValueError(f"position {pos} is outside the cache of {self.length}")
        self.h.copy_(self.parts.body.embed_tokens(tokens.reshape(self.h.shape[0], 1).to(self.h.device)))
        self.pos.fill_(pos)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._step()
        return self.logits
