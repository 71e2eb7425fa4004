"""Text in and out: prompts through the model's tokenizer (and chat template), streamed text back."""

from __future__ import annotations

import json
from typing import Sequence

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


def apply_chat_template(model, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render messages with the Jinja chat template in the model's tokenizer_config.json."""
    raw = getattr(model, "side_files", {}).get("tokenizer_config.json")
    config = json.loads(raw) if raw else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise ConfigError("the model has no chat template (tokenizer_config.json 'chat_template'); drop --chat")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ConfigError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
               if k.endswith("_token") and isinstance(v, (str, dict))}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special)
    except TemplateError as err:
        raise ConfigError(f"chat template: {err}") from None


class TextStream:
    """Turn one row's growing token list into text pieces that are safe to print now.

    Holds back an incomplete UTF-8 character (decoded as U+FFFD) and any tail that could be the
    start of a stop string, so printed text never has to be taken back.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.tokens: list[int] = []
        self.printed = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.stopped = True
            return self._emit(text[:min(hits)])
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # keep back a suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._emit(text[:safe])

    def flush(self) -> str:
        return "" if self.stopped else self._emit(self.tokenizer.decode(self.tokens))

    def _emit(self, text: str) -> str:
        piece = text[self.printed:] if len(text) > self.printed else ""
        self.printed = max(self.printed, len(text))
        return piece
