"""Text to padded id tensors for classic models: a word-level vocabulary, or BPE via `tokenizers`."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from alloy.errors import ConfigError

_WORDS = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Word ids with 0 = padding and 1 = out of vocabulary. Like Keras' pad_sequences, short
    texts are padded at the front ("pre"), so an LSTM's last state has read the real words."""

    PAD, OOV = 0, 1

    def __init__(self, num_words: int = 20000, max_len: int = 64, lower: bool = True, padding: str = "pre"):
        if padding not in ("pre", "post"):
            raise ConfigError(f"padding must be 'pre' or 'post', got {padding!r}")
        self.num_words, self.max_len, self.lower, self.padding = num_words, max_len, lower, padding
        self.index: dict[str, int] = {}

    def words(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower() if self.lower else text)

    def fit(self, texts) -> "WordTokenizer":
        counts = Counter(word for text in texts for word in self.words(text))
        if not counts:
            raise ConfigError("no words to build a vocabulary from")
        common = [w for w, _ in counts.most_common(self.num_words - 2)]
        self.index = {w: i + 2 for i, w in enumerate(common)}
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.index) + 2

    def encode(self, texts) -> torch.Tensor:
        """[len(texts), max_len] word ids: the first max_len words of each text, padded."""
        if not self.index:
            raise ConfigError("fit the tokenizer on training texts first")
        out = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.index.get(w, self.OOV) for w in self.words(text)][: self.max_len]
            if ids:
                if self.padding == "pre":
                    out[row, self.max_len - len(ids):] = torch.tensor(ids)
                else:
                    out[row, : len(ids)] = torch.tensor(ids)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"num_words": self.num_words, "max_len": self.max_len, "lower": self.lower,
                                          "padding": self.padding, "index": self.index}))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        data = json.loads(Path(path).read_text())
        tokenizer = cls(data["num_words"], data["max_len"], data["lower"], data["padding"])
        tokenizer.index = data["index"]
        return tokenizer


def encode_pairs(tokenizer, texts, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) from a `tokenizers.Tokenizer` (e.g. a BERT model's), padded and truncated."""
    pad_id = tokenizer.token_to_id("[PAD]") or 0
    tokenizer.enable_truncation(max_len)
    tokenizer.enable_padding(pad_id=pad_id, length=None)
    encoded = tokenizer.encode_batch(list(texts))
    return torch.tensor([e.ids for e in encoded]), torch.tensor([e.attention_mask for e in encoded])

__all__ = ["WordTokenizer", "encode_pairs"]
