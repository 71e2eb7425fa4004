"""Inputs for fit/evaluate/predict, and tables of labelled text (CSV, TSV, JSONL).

x may be a tensor, a numpy array, a (nested) list, a tuple of those (several model inputs), or
a torch Dataset of (x, y) pairs; y likewise. Everything becomes tensors once, checked for
matching lengths and emptiness.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alloy.errors import ConfigError


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        array = np.asarray(value)
    except ValueError:
        raise ConfigError(f"{what}: rows of different lengths; pad them first (alloy.text.WordTokenizer pads)") from None
    if array.dtype == object:
        raise ConfigError(f"{what}: rows of different lengths or mixed types; pad them first")
    return torch.from_numpy(array.copy())


def as_inputs(x: Any, y: Any, *, what: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """((input tensors...), targets) with one length; a clear error otherwise."""
    if isinstance(x, torch.utils.data.Dataset) and y is None:
        pairs = [x[i] for i in range(len(x))]
        if not pairs:
            raise ConfigError(f"{what} is empty")
        x = [p[0] for p in pairs]
        y = [p[1] for p in pairs]
        x = torch.stack([_tensor(v, what) for v in x])
        y = torch.stack([_tensor(v, what) for v in y])
    inputs = tuple(_tensor(v, what) for v in (x if isinstance(x, tuple) else (x,)))
    targets = _tensor(y, what) if y is not None else None
    lengths = {len(t) for t in inputs} | ({len(targets)} if targets is not None else set())
    if len(lengths) > 1:
        sizes = [len(t) for t in inputs] + ([len(targets)] if targets is not None else [])
        raise ConfigError(f"{what}: x and y have different lengths ({', '.join(map(str, sizes))})")
    if 0 in lengths:
        raise ConfigError(f"{what} is empty")
    return inputs, targets


def read_table(path: str | Path, text_column: str | int = "text", label_column: str | int = "label"):
    """(texts, labels) from a CSV/TSV (header row) or JSONL file; columns by name or index."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}:{number}: not a JSON line") from None
        header = list(rows[0]) if rows else []
        table = [[row.get(key) for key in header] for row in rows]
    else:
        delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
            header, *table = list(reader)
    if not table:
        raise ConfigError(f"{path}: no rows")

    def column(key):
        if isinstance(key, int):
            if key >= len(header):
                raise ConfigError(f"{path}: no column {key} (it has {len(header)})")
            return key
        if key not in header:
            raise ConfigError(f"{path}: no column {key!r}; columns: {', '.join(header)}")
        return header.index(key)

    t, l = column(text_column), column(label_column)
    return [row[t] for row in table], [row[l] for row in table]


class LabelEncoder:
    """Label values <-> class indices 0..n-1 (sorted, so the mapping is stable)."""

    def __init__(self):
        self.classes: list = []

    def fit(self, labels) -> "LabelEncoder":
        self.classes = sorted(set(labels), key=lambda v: (str(type(v)), v))
        return self

    def transform(self, labels) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = next((v for v in labels if v not in index), None)
        if unknown is not None:
            raise ConfigError(f"label {unknown!r} was not seen when the encoder was fitted ({len(self.classes)} classes)")
        return torch.tensor([index[v] for v in labels])

    def fit_transform(self, labels) -> torch.Tensor:
        return self.fit(labels).transform(labels)

__all__ = ["LabelEncoder", "as_inputs", "read_table"]
