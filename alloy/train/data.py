"""Text in, token stream out: corpus readers, the tokenizer, and a packed on-disk token file.

Text is read document by document (large files in 1 MiB pieces), tokenized in batches and
appended to `tokens.bin` (int32), so no corpus is ever held whole in memory. Workers map the
file and cut it into sequence-length blocks themselves (alloy.runtime.data).

Raw text is one stream, documents separated by an end-of-text id. Chat JSONL (alloy.train.instruct)
is packed whole conversations to a unit of seq_len tokens, with the tokens that carry no loss
stored as -(id + 1); such a file is tied to its seq_len.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from alloy.errors import ConfigError
from alloy.train.config import DataConfig

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl"}
CHUNK_CHARS = 1 << 20
EOT = "<|endoftext|>"
ENCODE_BATCH = 64  # documents per tokenizer call


def stdlib_files() -> list[Path]:
    """Python's own standard library sources: a corpus every machine with Python has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _files(path: str) -> list[Path]:
    if path == "stdlib":
        return stdlib_files()
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    raise ConfigError(f"data.path: {path}: no such file or directory")


def documents(cfg: DataConfig) -> Iterator[str]:
    """The corpus, document by document, stopping after cfg.max_bytes characters."""
    budget = cfg.max_bytes
    for file in _files(cfg.path):
        for text in _read(file, cfg.text_field):
            if budget <= 0:
                return
            text = text[:budget]
            budget -= len(text)
            if text.strip():
                yield text


def _read(file: Path, text_field: str) -> Iterator[str]:
    try:
        with open(file, encoding="utf-8", errors="replace") as handle:
            if file.suffix == ".jsonl":
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise ConfigError(f"{file}:{number}: not a JSON line") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ConfigError(f"{file}:{number}: no string field {text_field!r} (set data.text_field)")
                    yield record[text_field]
            else:
                while chunk := handle.read(CHUNK_CHARS):
                    yield chunk
    except OSError as err:
        raise ConfigError(f"{file}: cannot read ({err.strerror})") from None


def corpus_format(cfg: DataConfig) -> str:
    """"text" or "chat": data.format, or with "auto" what the files hold (a .jsonl whose first row
    has a chat shape is chat). One corpus is one format: a mix is refused, not guessed at."""
    files = _files(cfg.path)
    if cfg.format == "text":
        return "text"
    from alloy.train.instruct import is_chat_file

    if cfg.format == "chat":
        for file in files:
            if file.suffix != ".jsonl":
                raise ConfigError(f"{file}: data.format is chat, but this is not a .jsonl file")
        return "chat"
    kinds = {file: is_chat_file(file) if file.suffix == ".jsonl" else False for file in files}
    chat = [f for f, kind in kinds.items() if kind]
    text = [f for f, kind in kinds.items() if kind is False]
    if chat and text:
        raise ConfigError(f"data.path: {cfg.path} mixes chat rows ({chat[0].name}) and text ({text[0].name}); "
                          "train on one kind per run, or set data.format")
    return "chat" if chat else "text"


def chat_rows(cfg: DataConfig) -> Iterator[tuple[str, list[dict]]]:
    """("file:line", messages) of every conversation, stopping after cfg.max_bytes characters of
    message content."""
    from alloy.train.instruct import conversations

    budget = cfg.max_bytes
    for file in _files(cfg.path):
        for where, messages in conversations(file):
            if budget <= 0:
                return
            budget -= sum(len(m["content"]) for m in messages)
            yield where, messages


def rendered_conversations(cfg: DataConfig, fmt) -> Iterator[str]:
    """Each conversation as the chat template writes it: what a tokenizer is trained on."""
    for _, messages in chat_rows(cfg):
        yield fmt.render(messages, add_generation_prompt=False)


def train_tokenizer(texts: Iterator[str], vocab_size: int, special_tokens: tuple[str, ...] = (EOT,)):
    """A byte-level BPE (GPT-2 style) trained on the corpus, with `<|endoftext|>` as id 0 and the
    other special tokens (a chat template's markers) after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def end_of_text_id(tokenizer, spec, side_files: dict) -> int:
    """The id that ends a document (and a conversation): `<|endoftext|>` when the tokenizer has it
    (Alloy's own), else the model's EOS, else tokenizer_config.json's eos_token. Never a guess: id 0
    is "!" in Llama 3 and <unk> in Llama 2."""
    found = tokenizer.token_to_id(EOT)
    if found is not None:
        return found
    if spec.eos_token_id:
        return spec.eos_token_id[0]
    raw = side_files.get("tokenizer_config.json")
    token = json.loads(raw).get("eos_token") if raw else None
    token = token.get("content") if isinstance(token, dict) else token
    found = tokenizer.token_to_id(token) if isinstance(token, str) else None
    if found is None:
        raise ConfigError(f"no end-of-text token: the tokenizer has no {EOT}, config.json no eos_token_id and "
                          "tokenizer_config.json no eos_token; set the model's eos_token_id")
    return found


@dataclass(frozen=True)
class TokenFile:
    path: Path  # int32 tokens, documents separated by the end-of-text id; no-loss tokens as -(id + 1)
    count: int
    train_end: int  # tokens [0, train_end) train, [train_end, count) validation
    eot_id: int
    format: str = "text"  # "chat": packed in units of seq_len tokens
    seq_len: int | None = None  # the unit of chat data; None for text

    @property
    def train_stop(self) -> int:
        """End of the training token range. Chat data reads one token past train_end: the first
        (no-loss) token of the first validation unit is the last training block's final target,
        so every training unit makes a whole block."""
        return self.train_end + 1 if self.format == "chat" else self.train_end

    def to_dict(self) -> dict:
        # the file's name only: a run directory that is moved or copied reads its own tokens
        return {"path": self.path.name, "count": self.count, "train_end": self.train_end, "eot_id": self.eot_id,
                "format": self.format, "seq_len": self.seq_len}

    @classmethod
    def from_dict(cls, data: dict, directory: Path) -> "TokenFile":
        """Read back from `directory` (the run's data/), wherever the run directory now is."""
        return cls(Path(directory) / Path(data["path"]).name, int(data["count"]), int(data["train_end"]),
                   int(data["eot_id"]), data.get("format", "text"), data.get("seq_len"))


def tokenize_corpus(cfg: DataConfig, tokenizer, out_dir: Path, spec, *, side_files: dict | None = None,
                    seq_len: int, log=print) -> TokenFile:
    """Tokenize the corpus into out_dir/tokens.bin (streamed, batch by batch). `side_files`: the
    model's tokenizer_config.json / chat_template.jinja (name -> bytes), for its chat template and
    EOS; `seq_len`: the unit chat data is packed to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokens.bin"
    eot = end_of_text_id(tokenizer, spec, side_files or {})
    if not 0 <= eot < spec.vocab_size:
        raise ConfigError(f"the end-of-text id {eot} is beyond the model's vocab_size {spec.vocab_size}")
    chat = corpus_format(cfg) == "chat"
    with open(path.with_suffix(".tmp"), "wb") as handle:
        if chat:
            count, train_end = _write_chat(cfg, tokenizer, handle, eot, side_files or {}, seq_len, spec.vocab_size,
                                           log)
        else:
            count = _write_text(cfg, tokenizer, handle, eot, spec.vocab_size)
            train_end = count - int(count * cfg.val_fraction)
    if count == 0:
        path.with_suffix(".tmp").unlink()
        raise ConfigError(f"data.path: {cfg.path}: the corpus has no text")
    path.with_suffix(".tmp").replace(path)
    if chat:
        return TokenFile(path, count, train_end, eot, "chat", seq_len)
    return TokenFile(path, count, train_end, eot)


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and ids.max() >= vocab_size:
        raise ConfigError(f"the tokenizer makes id {int(ids.max())}, beyond the model's vocab_size {vocab_size}")


def _write_text(cfg: DataConfig, tokenizer, handle, eot: int, vocab_size: int) -> int:
    count, batch = 0, []

    def flush():
        nonlocal count
        for encoding in tokenizer.encode_batch(batch):
            ids = np.asarray(encoding.ids + [eot], dtype=np.int32)
            _check_ids(ids, vocab_size)
            ids.tofile(handle)
            count += ids.size
        batch.clear()

    for text in documents(cfg):
        batch.append(text)
        if len(batch) >= ENCODE_BATCH:
            flush()
    flush()
    return count


def _write_chat(cfg: DataConfig, tokenizer, handle, eot: int, side_files: dict, seq_len: int, vocab_size: int,
                log) -> tuple[int, int]:
    """Packed units, then one no-loss EOS: the last unit's final target. (count, train_end), the
    split on a unit boundary."""
    from alloy.train.instruct import ChatFormat, Packer, encode_conversations

    fmt = ChatFormat.for_model(side_files)
    if fmt.builtin:
        log("the model has no chat template: conversations are written in ChatML (<|im_start|>role ... <|im_end|>)")
    packer, rows = Packer(seq_len, eot), []

    def flush():
        for ids, loss in encode_conversations(tokenizer, fmt, rows, eot):
            _check_ids(ids, vocab_size)
            for unit in packer.add(ids, loss):
                unit.tofile(handle)
        rows.clear()

    for row in chat_rows(cfg):
        rows.append(row)
        if len(rows) >= ENCODE_BATCH:
            flush()
    flush()
    for unit in packer.finish():
        unit.tofile(handle)
    if packer.units == 0:
        return 0, 0
    np.asarray([-eot - 1], dtype=np.int32).tofile(handle)
    if packer.truncated:
        log(f"{packer.truncated} conversation(s) longer than seq_len {seq_len} were cut to it")
    val_units = int(packer.units * cfg.val_fraction)
    return packer.units * seq_len + 1, (packer.units - val_units) * seq_len
