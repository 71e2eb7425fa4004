"""KV-cached generation: prefill the prompts once, then one token per step from a static cache.

The loop is the same for one model on one device and for a model split over several
(`alloy.infer.partition.Pipeline`): both are `Runner`s — they make per-request state (the KV
caches) and map (ids, positions, mask) to logits. Prompts of different lengths are left-padded;
each row gets its own positions and the padding slots are masked out, so a row generates exactly
what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import torch

from alloy.errors import ConfigError
from alloy.infer.fused import fused_decoder
from alloy.infer.sampling import Sampler, Sampling
from alloy.model import Transformer


class Runner(Protocol):
    device: torch.device  # where token ids go in (and logits come out)
    spec: object

    def new_state(self, batch_size: int, max_len: int): ...
    def __call__(self, ids, positions, attention_mask, state) -> torch.Tensor: ...


class ModelRunner:
    """A whole model on one device."""

    def __init__(self, model: Transformer):
        if not model.spec.causal:
            raise ConfigError(f"{model.spec.family} is an encoder; it does not generate text")
        if not (model.has_embed and model.has_head):
            raise ConfigError("generation needs a model with its embeddings and head; use a Pipeline for slices")
        self.model, self.spec = model, model.spec
        self.device = next(model.parameters()).device
        self.fused = fused_decoder(model) if self.device.type == "cpu" else None  # decode steps in one C call

    def new_state(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    def __call__(self, ids, positions, attention_mask, state):
        if self.fused is not None and self.fused.accepts(ids, positions, attention_mask, state):
            return self.fused(ids, state)
        return self.model(ids, positions=positions, attention_mask=attention_mask, cache=state)


def as_runner(model) -> Runner:
    return ModelRunner(model) if isinstance(model, Transformer) else model


@dataclass
class Generation:
    tokens: list[int]  # generated ids (the prompt excluded), up to and including an EOS / stop hit
    finish_reason: str = "length"  # "length", "eos" or "stop"
    text: str | None = None  # decoded continuation (stop string removed) when a tokenizer is given
    prompt_tokens: int = 0


@dataclass
class _Batch:
    ids: torch.Tensor  # [B, P] left-padded prompts
    positions: torch.Tensor | None  # [B, P], None when no row is padded
    mask: torch.Tensor | None  # [B, P + max_new] 1 = real slot, None when no row is padded
    lengths: torch.Tensor  # [B] prompt lengths
    pad: torch.Tensor = field(default=None)  # [B] padding slots per row


def validate(spec, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise ConfigError("no prompts given")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ConfigError(f"prompt {i} is empty; give at least one token")
        bad = [t for t in prompt if not 0 <= t < spec.vocab_size]
        if bad:
            raise ConfigError(f"prompt {i} has token ids outside the vocabulary [0, {spec.vocab_size}): {bad[:5]}")
        if len(prompt) + max_new_tokens > spec.max_seq_len:
            raise ConfigError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that is "
                              f"beyond the model's context of {spec.max_seq_len} positions")


def left_pad(prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, device) -> _Batch:
    lengths = torch.tensor([len(p) for p in prompts])
    P = int(lengths.max())
    pad = P - lengths
    ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    if int(pad.max()) == 0:
        return _Batch(ids, None, None, lengths.to(device), pad.to(device))
    slots = torch.arange(P + max_new_tokens)
    mask = (slots[None, :] >= pad[:, None]).to(device)  # padding sits in slots [0, pad)
    positions = (slots[None, :P] - pad[:, None]).clamp(min=0).to(device)
    return _Batch(ids, positions, mask, lengths.to(device), pad.to(device))


@torch.inference_mode()
def stream(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
           eos_ids: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B] on the model's device, once per step.

    Stops after max_new_tokens steps or when every row has produced an EOS; rows that finished
    earlier keep producing (ignored) tokens so shapes stay static.
    """
    runner = as_runner(model)
    spec = runner.spec
    validate(spec, prompts, max_new_tokens)
    eos = torch.tensor(list(spec.eos_token_id if eos_ids is None else eos_ids), dtype=torch.long, device=runner.device)
    batch = left_pad(prompts, max_new_tokens, spec.pad_token_id or 0, runner.device)
    B, P = batch.ids.shape
    state = runner.new_state(B, P + max_new_tokens)
    sampler = Sampler(sampling, runner.device)
    seen = batch.ids if sampling.repetition_penalty != 1.0 else None  # pad ids only matter if they recur
    mask = batch.mask
    logits = runner(batch.ids, batch.positions, None if mask is None else mask[:, :P], state)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=runner.device)
    for step in range(max_new_tokens):
        token = sampler(logits, seen)
        yield token
        done |= torch.isin(token, eos)
        if step + 1 == max_new_tokens or bool(done.all()):
            return
        if seen is not None:
            seen = torch.cat([seen, token[:, None]], dim=1)
        positions = None if mask is None else (batch.lengths + step)[:, None]
        step_mask = None if mask is None else mask[:, :P + step + 1]
        logits = runner(token[:, None], positions, step_mask, state)[:, -1]


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_ids: Sequence[int] | None = None, stop: Sequence[str] = (), tokenizer=None) -> list[Generation]:
    """Generate a continuation per prompt (token id lists). Stop strings need a tokenizer."""
    if stop and tokenizer is None:
        raise ConfigError("stop strings need a tokenizer")
    spec = as_runner(model).spec
    eos = set(spec.eos_token_id if eos_ids is None else eos_ids)
    out = [Generation([], prompt_tokens=len(p)) for p in prompts]
    for token in stream(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids):
        for row, t in enumerate(token.tolist()):
            gen = out[row]
            if gen.finish_reason != "length":
                continue
            gen.tokens.append(t)
            if t in eos:
                gen.finish_reason = "eos"
            elif stop and any(s in tokenizer.decode(gen.tokens[-_STOP_WINDOW:]) for s in stop):
                gen.finish_reason = "stop"
        if all(g.finish_reason != "length" for g in out):
            break
    if tokenizer is not None:
        for gen in out:
            gen.text = _cut_at_stop(tokenizer.decode(gen.tokens), stop)
    return out


_STOP_WINDOW = 32  # tokens decoded to look for a stop string (a stop string longer than this is not seen)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]
