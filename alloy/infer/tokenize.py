"""Text in and out: prompts through the model's tokenizer (and chat template), streamed text back."""

from __future__ import annotations

import json
from typing import Sequence

from alloy.checkpoint.io import chat_template
from alloy.errors import ConfigError


def encode(model, text: str, *, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of a prompt; with `chat`, the user message rendered by the model's chat template."""
    tokenizer = require_tokenizer(model)
    if not chat:
        return tokenizer.encode(text).ids
    rendered = apply_chat_template(model, [*([{"role": "system", "content": system}] if system else []),
                                           {"role": "user", "content": text}])
    return tokenizer.encode(rendered, add_special_tokens=False).ids


def require_tokenizer(model):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("the model directory has no tokenizer.json; pass token ids instead of text")
    return tokenizer


def apply_chat_template(model, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render messages with the model's Jinja chat template in the environment transformers uses:
    loop controls, `tojson` without HTML escaping, `raise_exception` and `strftime_now`."""
    template = chat_template(model)
    if not template:
        raise ConfigError("the model has no chat template (chat_template.jinja or tokenizer_config.json "
                          "'chat_template'); use plain completions")
    raw = getattr(model, "side_files", {}).get("tokenizer_config.json")
    config = json.loads(raw) if raw else {}
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
               if k.endswith("_token") and isinstance(v, (str, dict))}
    from jinja2 import TemplateError

    try:
        return _environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special, **extra)
    except TemplateError as err:
        raise ConfigError(f"chat template: {err}") from None


def _environment():
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ConfigError(f"chat template: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # as transformers does: no HTML escaping (jinja's own tojson turns < into \u003c)
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def eos_ids(model) -> set[int]:
    """The ids that end a generation: the spec's, and generation_config.json's (chat models often
    end a turn on a token the config's eos_token_id does not name)."""
    ids = set(model.spec.eos_token_id)
    raw = getattr(model, "side_files", {}).get("generation_config.json")
    if raw:
        value = json.loads(raw).get("eos_token_id")
        ids |= set(value if isinstance(value, list) else [] if value is None else [value])
    return ids


class TextStream:
    """Turn one row's growing token list into text pieces that are safe to print now.

    Holds back an incomplete UTF-8 character (decoded as U+FFFD) and any tail that could be the
    start of a stop string, so printed text never has to be taken back.

    Incremental: each token decodes a short window (the tokens since the last complete piece, with
    the few before them as context, as vLLM and TGI do: a SentencePiece or byte-level decoder needs
    the previous token to place a leading space), so a long generation costs O(n), not O(n^2).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # everything decoded so far
        self.printed = 0
        self.stopped = False
        self._prefix = self._read = 0  # window [prefix, read) is context; [read, ...) not yet in text
        self._longest_stop = max(map(len, self.stop), default=0)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        context = self.tokenizer.decode(self.tokens[self._prefix:self._read])
        window = self.tokenizer.decode(self.tokens[self._prefix:])
        if len(window) > len(context) and not window.endswith("\ufffd"):
            self.text += window[len(context):]
            self._prefix, self._read = self._read, len(self.tokens)
        stop_at = self._stop_hit()
        if stop_at is not None:
            return self._emit(self.text[:stop_at])
        safe = len(self.text)
        for s in self.stop:  # keep back a suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text.endswith(s[:k], 0, safe):
                    safe -= k
                    break
        return self._emit(self.text[:safe])

    def flush(self) -> str:
        if self.stopped:
            return ""
        if self._read < len(self.tokens):  # an incomplete character at the end: as the decoder has it
            context = self.tokenizer.decode(self.tokens[self._prefix:self._read])
            self.text += self.tokenizer.decode(self.tokens[self._prefix:])[len(context):]
            self._prefix = self._read = len(self.tokens)
        stop_at = self._stop_hit()  # the held-back tail may hold a stop string too
        return self._emit(self.text if stop_at is None else self.text[:stop_at])

    def _stop_hit(self) -> int | None:
        """Where the first stop string starts, if one has appeared; the stream then stops there.
        Only the tail can hold a new one: what was printed had none."""
        tail_from = max(0, self.printed - self._longest_stop)
        hits = [h for h in (self.text.find(s, tail_from) for s in self.stop) if h >= 0]
        if not hits:
            return None
        self.stopped = True
        return min(hits)

    def _emit(self, text: str) -> str:
        piece = text[self.printed:] if len(text) > self.printed else ""
        self.printed = max(self.printed, len(text))
        return piece
