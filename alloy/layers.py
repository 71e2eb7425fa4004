"""Building blocks for the seed's classic model (Embedding -> LSTM -> Dense), and a classifier
on top of a transformer encoder. Plain torch modules: any of them works with alloy.Model."""

from __future__ import annotations

import torch
from torch import nn

from alloy.errors import ConfigError

Sequential = nn.Sequential


class Embedding(nn.Embedding):
    def __init__(self, vocab_size: int, dim: int, padding_idx: int | None = 0):
        super().__init__(vocab_size, dim, padding_idx=padding_idx)


class LSTM(nn.Module):
    """[B, T, in] -> [B, units]: the last hidden state, or the mean over time."""

    def __init__(self, input_size: int, units: int, output: str = "last", bidirectional: bool = False):
        super().__init__()
        if output not in ("last", "mean"):
            raise ConfigError(f"LSTM output must be 'last' or 'mean', got {output!r}")
        self.lstm = nn.LSTM(input_size, units, batch_first=True, bidirectional=bidirectional)
        self.output = output

    def forward(self, x):
        states, (hidden, _) = self.lstm(x)
        if self.output == "mean":
            return states.mean(1)
        return torch.cat(list(hidden[-(1 + self.lstm.bidirectional):]), dim=-1)  # (B, units * directions)


class Dense(nn.Module):
    """Linear, then an optional activation; leave it None for the logits a classification loss wants."""

    ACTIVATIONS = {None: nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}

    def __init__(self, in_features: int, units: int, activation: str | None = None):
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ConfigError(f"activation {activation!r}; choose from {', '.join(map(str, self.ACTIVATIONS))} "
                              "(a classification loss takes logits, so no softmax here)")
        self.linear = nn.Linear(in_features, units)
        self.activation = self.ACTIVATIONS[activation]()

    def forward(self, x):
        return self.activation(self.linear(x))


class EncoderClassifier(nn.Module):
    """A transformer encoder (e.g. a loaded BERT-family checkpoint) with a classification head on
    its mean-pooled hidden states: forward(input_ids, attention_mask) -> logits [B, classes]."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__()
        if getattr(getattr(encoder, "spec", None), "causal", False):
            raise ConfigError("EncoderClassifier needs an encoder (bidirectional) model, got a causal decoder")
        self.encoder = encoder
        hidden = encoder.spec.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.encoder(input_ids, attention_mask=attention_mask)
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(self.dropout(pooled))

__all__ = ["Dense", "Embedding", "EncoderClassifier", "LSTM", "Sequential"]
