"""Instruction (chat) data: JSONL conversations rendered by the model's chat template, a loss mask
that keeps only the assistant's tokens, and packing of whole conversations into seq_len units.

Three row shapes are read (one per line, detected per file):
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
    {"instruction": "...", "input": "..." (optional), "output": "..."}       (Alpaca)
    {"prompt": "...", "completion": "..."}
The last two become [user, assistant] conversations.

Loss: an assistant turn's content and the template's end-of-turn marker after it (`<|im_end|>`,
`<|eot_id|>`, ...) carry loss, as does the end-of-text id that closes each conversation; the
system and user turns and the template's own headers do not. A turn's span in the rendered text is
found by rendering prefixes: messages[:i] with the generation prompt ends where assistant turn i's
content begins; messages[:i+1] without it ends where that turn ends. Tokens overlapping a span
(by the tokenizer's character offsets) carry loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from alloy.errors import ConfigError

# The template of a model that has none (a fresh model, a base model): ChatML, whose two markers
# Alloy's own tokenizer learns as special tokens when it is trained on conversations.
CHATML = (r"{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          r"'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatFormat:
    """What alloy.infer.tokenize.apply_chat_template reads from a model: its side files
    (tokenizer_config.json, chat_template.jinja). `builtin`: the model has no template; ChatML."""

    side_files: dict
    builtin: bool = False

    @classmethod
    def for_model(cls, side_files: dict | None) -> "ChatFormat":
        from alloy.checkpoint.io import chat_template

        files = dict(side_files or {})
        if chat_template(cls(files)):
            return cls(files)
        config = json.loads(files["tokenizer_config.json"]) if files.get("tokenizer_config.json") else {}
        files["tokenizer_config.json"] = json.dumps(config | {"chat_template": CHATML}).encode()
        return cls(files, builtin=True)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from alloy.infer.tokenize import apply_chat_template

        return apply_chat_template(self, messages, add_generation_prompt=add_generation_prompt)

    def tokenizer_config(self) -> bytes:
        """tokenizer_config.json with the template the run trained on inlined (a chat_template.jinja,
        or ChatML), so the fused model renders prompts as its training data was rendered."""
        from alloy.checkpoint.io import chat_template

        raw = self.side_files.get("tokenizer_config.json")
        config = json.loads(raw) if raw else {}
        return (json.dumps(config | {"chat_template": chat_template(self)}, indent=1) + "\n").encode()


def _shape(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt"
    return None


def is_chat_file(file: Path) -> bool | None:
    """Whether a .jsonl file's first non-empty row has a chat shape; None for an empty file."""
    try:
        with open(file, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        return False  # the text reader names the bad line
                    return isinstance(record, dict) and _shape(record) is not None
    except OSError as err:
        raise ConfigError(f"{file}: cannot read ({err.strerror})") from None
    return None


def conversations(file: Path) -> Iterator[tuple[str, list[dict]]]:
    """("file:line", messages) of every row of a chat JSONL file, each row checked."""
    if file.suffix != ".jsonl":
        raise ConfigError(f"{file}: data.format is chat, but this is not a .jsonl file")
    rows = 0
    try:
        with open(file, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"{where}: not a JSON line") from None
                rows += 1
                yield where, _messages(record, where)
    except OSError as err:
        raise ConfigError(f"{file}: cannot read ({err.strerror})") from None
    if rows == 0:
        raise ConfigError(f"{file}:1: empty file; a chat file needs one conversation per line")


def _messages(record, where: str) -> list[dict]:
    shape = _shape(record) if isinstance(record, dict) else None
    if shape is None:
        keys = ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
        raise ConfigError(f"{where}: a chat row needs 'messages', 'instruction' and 'output', or 'prompt' and "
                          f"'completion' (found: {keys})")
    if shape == "alpaca":
        _strings(record, ("instruction", "output") + (("input",) if record.get("input") is not None else ()), where)
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if shape == "prompt":
        _strings(record, ("prompt", "completion"), where)
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ConfigError(f"{where}: messages[{i}] has no string 'role'")
        if message["role"] not in ROLES:
            raise ConfigError(f"{where}: messages[{i}] has unknown role {message['role']!r} "
                              f"(allowed: {', '.join(ROLES)})")
        if not isinstance(message.get("content"), str):
            raise ConfigError(f"{where}: messages[{i}] ({message['role']}) has no string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: no assistant turn in 'messages'; nothing to learn from this row")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _strings(record: dict, keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if not isinstance(record[key], str):
            raise ConfigError(f"{where}: {key!r} must be a string, not {type(record[key]).__name__}")


def render_with_spans(fmt: ChatFormat, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn:
    its content and end-of-turn marker, without the layout whitespace after the marker."""
    text = fmt.render(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = fmt.render(messages[:i], add_generation_prompt=True)
        if not text.startswith(prompt):
            raise ConfigError(f"{where}: the chat template renders the prompt of messages[{i}] differently from "
                              "the whole conversation; cannot tell which tokens are the assistant's")
        start = len(prompt)
        turn = fmt.render(messages[: i + 1], add_generation_prompt=False)
        if len(turn) > start and text.startswith(turn):
            end = len(turn)
        else:  # the template writes a turn differently when it is the last one (Qwen3's think block)
            end = _turn_end(text, turn, start, message["content"], f"{where}: messages[{i}]")
        spans.append((start, start + len(text[start:end].rstrip())))
    return text, spans


def _turn_end(text: str, turn: str, start: int, content: str, where: str) -> int:
    """Where a turn ends in `text` when rendering it last wrote it differently: after its content,
    as much of the marker `turn` writes after that content as `text` also has."""
    content = content.strip()  # templates often trim
    found = text.find(content, start)
    if found < 0 or turn.rfind(content) < 0:
        raise ConfigError(f"{where}: the chat template does not write this assistant turn's content as given")
    tail, after = turn[turn.rfind(content) + len(content):], text[found + len(content):]
    marker = next((k for k in range(min(len(tail), len(after))) if tail[k] != after[k]), min(len(tail), len(after)))
    return found + len(content) + marker


def encode_conversations(tokenizer, fmt: ChatFormat, rows: list[tuple[str, list[dict]]],
                         eos_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss) per conversation: int64 ids ending in eos_id, and whether each is a loss target."""
    rendered = [render_with_spans(fmt, messages, where) for where, messages in rows]
    for (text, spans), encoding in zip(rendered, tokenizer.encode_batch([t for t, _ in rendered],
                                                                        add_special_tokens=False)):
        ids = np.asarray(encoding.ids, dtype=np.int64)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        loss = np.zeros(ids.size, dtype=bool)
        for start, end in spans:
            loss |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        if ids.size == 0 or ids[-1] != eos_id:  # a template that ends on EOS already keeps its own
            ids, loss = np.append(ids, eos_id), np.append(loss, False)
        loss[-1] = True  # the end of the conversation is learned: generation must stop
        yield ids, loss


def masked(ids: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """The token file's encoding (alloy.runtime.data): a no-loss token is stored as -(id + 1)."""
    return np.where(loss, ids, -ids - 1).astype(np.int32)


class Packer:
    """Whole conversations, greedily in order, into units of seq_len tokens: a unit is padded with
    a no-loss EOS, a conversation longer than a unit is cut to it (counted in `truncated`), and the
    first token of every unit is stored as no-loss: it is the last target of the block before it
    (DataSource reads tokens[i * seq_len : i * seq_len + seq_len + 1]), which is another unit."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id
        self.ids: list[np.ndarray] = []
        self.loss: list[np.ndarray] = []
        self.used = 0
        self.truncated = 0
        self.units = 0

    def add(self, ids: np.ndarray, loss: np.ndarray) -> Iterator[np.ndarray]:
        if ids.size > self.seq_len:
            ids, loss = ids[: self.seq_len], loss[: self.seq_len]
            self.truncated += 1
        if self.used + ids.size > self.seq_len:
            yield self._unit()
        self.ids.append(ids)
        self.loss.append(loss)
        self.used += ids.size

    def finish(self) -> Iterator[np.ndarray]:
        if self.used:
            yield self._unit()

    def _unit(self) -> np.ndarray:
        pad = self.seq_len - self.used
        ids = np.concatenate(self.ids + [np.full(pad, self.pad_id, dtype=np.int64)])
        loss = np.concatenate(self.loss + [np.zeros(pad, dtype=bool)])
        loss[0] = False
        self.ids, self.loss, self.used = [], [], 0
        self.units += 1
        return masked(ids, loss)
