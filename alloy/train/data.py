"""Text in, token stream out: corpus readers, the tokenizer, and a packed on-disk token file.

Text is read document by document (large files in 1 MiB pieces), tokenized in batches and
appended to `tokens.bin` (int32), so no corpus is ever held whole in memory. Workers map the
file and cut it into sequence-length blocks themselves (alloy.runtime.data).
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


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on the corpus, with `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@dataclass(frozen=True)
class TokenFile:
    path: Path  # int32 tokens, documents separated by the end-of-text id
    count: int
    train_end: int  # tokens [0, train_end) train, [train_end, count) validation
    eot_id: int

    def to_dict(self) -> dict:
        # the file's name only: a run directory that is moved or copied reads its own tokens
        return {"path": self.path.name, "count": self.count, "train_end": self.train_end, "eot_id": self.eot_id}

    @classmethod
    def from_dict(cls, data: dict, directory: Path) -> "TokenFile":
        """Read back from `directory` (the run's data/), wherever the run directory now is."""
        return cls(Path(directory) / Path(data["path"]).name, int(data["count"]), int(data["train_end"]),
                   int(data["eot_id"]))


def tokenize_corpus(cfg: DataConfig, tokenizer, out_dir: Path, vocab_size: int) -> TokenFile:
    """Tokenize the corpus into out_dir/tokens.bin (streamed, batch by batch)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokens.bin"
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        eot = 0  # a model's own tokenizer without our marker: id 0 separates documents
    count, batch = 0, []
    with open(path.with_suffix(".tmp"), "wb") as handle:
        def flush():
            nonlocal count
            for encoding in tokenizer.encode_batch(batch):
                ids = np.asarray(encoding.ids + [eot], dtype=np.int32)
                if ids.size and ids.max() >= vocab_size:
                    raise ConfigError(f"the tokenizer makes id {int(ids.max())}, beyond the model's "
                                      f"vocab_size {vocab_size}")
                ids.tofile(handle)
                count += ids.size
            batch.clear()

        for text in documents(cfg):
            batch.append(text)
            if len(batch) >= 64:
                flush()
        flush()
    if count == 0:
        path.with_suffix(".tmp").unlink()
        raise ConfigError(f"data.path: {cfg.path}: the corpus has no text")
    path.with_suffix(".tmp").replace(path)
    train_end = count - int(count * cfg.val_fraction)
    return TokenFile(path, count, train_end, eot)
