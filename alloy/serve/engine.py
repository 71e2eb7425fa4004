"""Continuous batching: requests join and leave the running batch between decode steps.

One thread owns the model. Each request gets a row (a slot) of a `SlotCache`, prefilled alone
(in chunks, between decode steps, so streaming clients keep receiving tokens) and then decoded
with every other live row in one forward per step. Rows keep their own positions and KV slots:
nothing is re-padded when a request joins or leaves, and a row's tokens are what it would get
alone. A finished or cancelled request frees its row at the next step.

The model may be split over several devices: `stages` are contiguous layer slices (the first with
the embeddings, the last with the head), each with its own cache on its own device. A decode step
then splits the running rows into one group per stage and pipelines them through the stages'
threads (`alloy.infer.partition.Pipeline`), so while one device works on a group the next works
on the group before it.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from alloy.errors import AlloyError, ConfigError
from alloy.infer.fused import fused_decoder
from alloy.infer.sampling import Sampler, Sampling
from alloy.infer.tokenize import TextStream
from alloy.model import Transformer

PREFILL_CHUNK = 256  # prompt tokens per forward: a long prompt does not stall the running batch


class QueueFull(AlloyError):
    """The server's queue is full; the client should retry later."""


class ContextOverflow(ConfigError):
    """A prompt plus its max_tokens do not fit the context."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: Sequence[str] = ()
    logprobs: int = 0  # top alternatives reported per generated token (0: none)
    eos_ids: frozenset[int] = frozenset()


@dataclass
class Event:
    """One generated token, or the end of a request."""

    token: int | None = None
    text: str = ""  # text safe to show now (held back while it might be the start of a stop string)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" on the last event
    error: str | None = None


class Handle:
    """The consumer side of a request: `deliver` gets every Event, from the engine's thread."""

    def __init__(self, request: Request, deliver: Callable[[Event], None]):
        self.request, self.deliver = request, deliver
        self.cancelled = False
        self.submitted_s = time.perf_counter()
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.completion_tokens = 0

    def cancel(self) -> None:
        """Stop generating (a client that went away); the row is freed at the next step."""
        self.cancelled = True


@dataclass
class _Row:
    handle: Handle
    sampler: Sampler
    text: TextStream | None
    prefilled: int = 0  # prompt tokens in the cache so far
    last: int | None = None  # the token to feed next (decoding rows)
    seen: list[int] = field(default_factory=list)


class LocalStages:
    """Stages in this process: each with a SlotCache on its device; a forward over several rows
    splits them into a group per stage, pipelined through the stages' threads."""

    def __init__(self, stages: list[Transformer], max_batch: int, ctx_size: int | None):
        from alloy.infer.partition import Pipeline

        if not stages[0].has_embed or not stages[-1].has_head:
            raise ConfigError("serving needs the embeddings on the first stage and the head on the last")
        self.spec = stages[0].spec
        self.ctx_size = min(ctx_size or self.spec.max_seq_len, self.spec.max_seq_len)
        self.pipeline = Pipeline(stages)
        self.devices = self.pipeline.devices
        self.caches = [s.new_cache(max_batch, self.ctx_size, slots=True) for s in stages]
        # One CPU stage: decode steps in one C call (alloy.infer.fused), each row at its own slot.
        self.fused = fused_decoder(stages[0]) if len(stages) == 1 and self.devices[0].type == "cpu" else None

    def forward(self, ids: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Logits [rows, vocab] of the last position of rows [first, last), fed `ids` [rows, T]."""
        if self.fused is not None:
            rows = self.caches[0].rows(first, last)
            if self.fused.accepts(ids, None, None, rows):
                return self.fused(ids, rows)[:, -1]
        groups = min(len(self.caches), last - first)  # one group per stage keeps every stage busy
        bounds = [first + round(i * (last - first) / groups) for i in range(groups + 1)]
        work = [(ids[a - first:b - first], None, None, [cache.rows(a, b) for cache in self.caches])
                for a, b in zip(bounds, bounds[1:])]
        return self.pipeline.run_groups(work)[:, -1].float()

    def close(self) -> None:
        pass


class Engine:
    """Continuous batching over `stages` (one Transformer, or contiguous slices of one)."""

    def __init__(self, stages, *, tokenizer=None, max_batch: int = 16, max_queue: int = 64,
                 ctx_size: int | None = None, observer=None):
        """`stages`: a Transformer, a list of contiguous slices of one, or a runner that drives
        stages elsewhere (`alloy.serve.remote.RemoteStages`), built by `runner(...)`."""
        if max_batch < 1 or max_queue < 0:
            raise ConfigError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if callable(getattr(stages, "build", None)):
            self.runner = stages.build(max_batch, ctx_size)
        else:
            self.runner = LocalStages([stages] if isinstance(stages, Transformer) else list(stages), max_batch, ctx_size)
        self.spec, self.ctx_size = self.runner.spec, self.runner.ctx_size
        self.tokenizer, self.max_batch, self.max_queue = tokenizer, max_batch, max_queue
        self.observer = observer  # metrics: on_first_token(s), on_token(gap_s), on_finish(handle, reason)
        self.devices, self.caches = self.runner.devices, self.runner.caches
        self.rows: list[_Row | None] = [None] * max_batch
        self.pending: collections.deque[Handle] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = itertools.count()

    # ---- the client side ---------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Refuse a request that cannot run, before it queues."""
        if request.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if not request.prompt:
            raise ConfigError("the prompt is empty")
        bad = [t for t in request.prompt if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ConfigError(f"token ids outside the vocabulary [0, {self.spec.vocab_size}): {bad[:5]}")
        if len(request.prompt) + request.max_tokens > self.ctx_size:
            raise ContextOverflow(f"the prompt has {len(request.prompt)} tokens; with max_tokens={request.max_tokens} "
                                  f"that is beyond the context of {self.ctx_size} tokens")
        if request.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer")

    def submit(self, request: Request, deliver: Callable[[Event], None]) -> Handle:
        self.check(request)
        handle = Handle(request, deliver)
        with self._lock:
            if len(self.pending) >= self.max_queue + self.rows.count(None):  # a free row takes one more
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later")
            self.pending.append(handle)
            self._lock.notify()
        return handle

    @property
    def queue_depth(self) -> int:
        return len(self.pending)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    # ---- the engine's thread -----------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="alloy-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def run_here(self) -> None:
        """The engine's loop in the calling thread, until stop(). A server's main thread should
        run this and serve HTTP from another: the thread that loaded the model already owns an
        OpenMP thread pool, and a second pool (an engine thread's) puts more OpenMP threads than
        cores on the machine, which makes libgomp stop spinning and wake its workers by futex at
        every parallel op — measured 26 ms a token against 21 on the ~98M bench model, 2 cores."""
        self._loop()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stopping and not self.pending and self.active == 0:
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                with self._lock:
                    self._admit()
                self.step()
            except Exception as err:  # a bug must not leave clients waiting forever
                for b, row in enumerate(self.rows):
                    if row is not None:
                        self._finish(b, "error", error=f"{type(err).__name__}: {err}")
        for b, row in enumerate(self.rows):
            if row is not None:
                self._finish(b, "cancelled")
        for handle in self.pending:
            handle.deliver(Event(finish_reason="cancelled"))
        self.runner.close()

    def _admit(self) -> None:
        while self.pending and None in self.rows:
            handle = self.pending.popleft()
            if handle.cancelled:
                handle.deliver(Event(finish_reason="cancelled"))
                continue
            b = self.rows.index(None)  # the lowest free row: the decode batch stays a short prefix
            r = handle.request
            text = TextStream(self.tokenizer, r.stop or ()) if self.tokenizer is not None else None
            self.rows[b] = _Row(handle, Sampler(r.sampling, self.devices[-1]), text)
            for cache in self.caches:
                cache.lengths[b] = 0

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step: drop cancelled rows, a chunk of one prefill, one decode step."""
        for b, row in enumerate(self.rows):
            if row is not None and row.handle.cancelled:
                self._finish(b, "cancelled")
        filling = [b for b, row in enumerate(self.rows) if row is not None and row.last is None]
        if filling:  # oldest first
            b = min(filling, key=lambda i: self.rows[i].handle.submitted_s)
            self._prefill_chunk(b)
        decoding = [b for b, row in enumerate(self.rows) if row is not None and row.last is not None]
        if decoding:
            self._decode(decoding)

    def _forward(self, ids: torch.Tensor, first: int, last: int) -> torch.Tensor:
        return self.runner.forward(ids, first, last)

    def _prefill_chunk(self, b: int) -> None:
        row = self.rows[b]
        prompt = row.handle.request.prompt
        chunk = prompt[row.prefilled : row.prefilled + PREFILL_CHUNK]
        logits = self._forward(torch.tensor([chunk], device=self.devices[0]), b, b + 1)
        row.prefilled += len(chunk)
        if row.prefilled == len(prompt):
            row.seen = list(prompt)
            self._emit(b, logits[0])

    def _decode(self, decoding: list[int]) -> None:
        hi = max(decoding) + 1
        ids = torch.zeros(hi, 1, dtype=torch.long, device=self.devices[0])
        for b in decoding:
            ids[b, 0] = self.rows[b].last
        # Rows in [0, hi) that are free or mid-prefill ride along: their junk token lands at their
        # next slot (a prefill overwrites it) and their lengths are put back after.
        idle = [b for b in range(hi) if b not in decoding]
        kept = [cache.lengths[idle].clone() for cache in self.caches]
        logits = self._forward(ids, 0, hi)
        for cache, lengths in zip(self.caches, kept):
            cache.lengths[idle] = lengths
        for b in decoding:
            self._emit(b, logits[b])

    def _emit(self, b: int, logits: torch.Tensor) -> None:
        """Sample row b's next token from its logits [vocab], deliver it, and end the row if done."""
        row = self.rows[b]
        handle, request = row.handle, row.handle.request
        seen = torch.tensor([row.seen], device=logits.device) if request.sampling.repetition_penalty != 1.0 else None
        token = int(row.sampler(logits[None], seen)[0])
        event = Event(token=token)
        if request.logprobs:
            logprobs = torch.log_softmax(logits, dim=-1)
            event.logprob = float(logprobs[token])
            top = torch.topk(logprobs, min(request.logprobs, logprobs.numel()))
            event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        now = time.perf_counter()
        if self.observer is not None:
            if handle.first_token_s is None:
                self.observer.on_first_token(now - handle.submitted_s)
            else:
                self.observer.on_token(now - handle.last_token_s)
        handle.first_token_s = handle.first_token_s or now
        handle.last_token_s = now
        handle.completion_tokens += 1
        row.seen.append(token)
        row.last = token
        finish = None
        if token in request.eos_ids:
            finish = "stop"
        elif row.text is not None:
            event.text = row.text.push(token)
            if row.text.stopped:
                finish = "stop"
        if finish is None and (handle.completion_tokens >= request.max_tokens
                               or len(request.prompt) + handle.completion_tokens >= self.ctx_size):
            finish = "length"
        if finish is not None and row.text is not None:
            event.text += row.text.flush()  # what was held back (nothing after a stop string)
        handle.deliver(event)
        if finish is not None:
            self._finish(b, finish)

    def _finish(self, b: int, reason: str, error: str | None = None) -> None:
        handle = self.rows[b].handle
        self.rows[b] = None
        if self.observer is not None:
            self.observer.on_finish(handle, reason)
        handle.deliver(Event(finish_reason=reason, error=error))
