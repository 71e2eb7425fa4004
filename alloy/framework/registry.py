"""The familiar names: optimizers, losses and metrics by string, as in the seed's example.

Losses take the model's raw outputs (logits for classification) and return a per-sample
vector, so the training loop can weigh every sample exactly — across uneven batch shares too.
Metrics accumulate sums over batches (and ranks), so an epoch's figure is exact, not an
average of batch averages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.nn.functional as F

from alloy.errors import ConfigError

OPTIMIZERS = {
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3}),
    "sgd": (torch.optim.SGD, {"lr": 1e-2}),
}


def make_optimizer(spec, params, lr: float | None = None) -> torch.optim.Optimizer:
    """`spec`: a name above, an optimizer class, or an optimizer instance (its class and settings
    are reused for `params`)."""
    if isinstance(spec, str):
        if spec.lower() not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {spec!r}; choose from {', '.join(OPTIMIZERS)} or pass one")
        cls, defaults = OPTIMIZERS[spec.lower()]
        return cls(params, **(defaults | ({"lr": lr} if lr else {})))
    if isinstance(spec, torch.optim.Optimizer):
        return spec.__class__(params, **(spec.defaults | ({"lr": lr} if lr else {})))
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return spec(params, **({"lr": lr} if lr else {}))
    raise ConfigError(f"optimizer must be a name ({', '.join(OPTIMIZERS)}), an optimizer class or instance")


def _upcast(outputs):
    """bf16/fp16 outputs in fp32; fp32 and fp64 ones as they are (a float64 model's loss stays float64)."""
    return outputs.to(torch.promote_types(outputs.dtype, torch.float32))


def _cross_entropy(outputs, y):
    return F.cross_entropy(_upcast(outputs), y.long(), reduction="none")


def _mse(outputs, y):
    outputs = _upcast(outputs)
    return F.mse_loss(outputs, y.to(outputs.dtype).view_as(outputs), reduction="none").flatten(1).mean(1)


def _binary(outputs, y):
    outputs = _upcast(outputs)
    return F.binary_cross_entropy_with_logits(outputs.view(-1), y.to(outputs.dtype).view(-1), reduction="none")


LOSSES: dict[str, tuple[Callable, bool]] = {  # name -> (per-sample loss, labels are class indices)
    "sparse_categorical_crossentropy": (_cross_entropy, True),
    "cross_entropy": (_cross_entropy, True),
    "mse": (_mse, False),
    "mean_squared_error": (_mse, False),
    "binary_crossentropy": (_binary, False),
}


def make_loss(spec) -> tuple[Callable, bool]:
    """(per-sample loss function, whether labels are class indices)."""
    if isinstance(spec, str):
        if spec.lower() not in LOSSES:
            raise ConfigError(f"unknown loss {spec!r}; choose from {', '.join(LOSSES)} or pass a callable")
        return LOSSES[spec.lower()]
    if callable(spec):
        def per_sample(outputs, y, _fn=spec):
            value = _fn(outputs, y)
            # A mean-reduced loss of n samples weighs like n samples of that mean.
            return value.expand(outputs.shape[0]) if value.dim() == 0 else value
        return per_sample, False
    raise ConfigError("loss must be a name or a callable(outputs, targets)")


class Metric(ABC):
    """Sums over batches and ranks: `update` adds to `sums`, `result` reads the epoch's value."""

    name = "metric"

    def __init__(self):
        self.sums = torch.zeros(2, dtype=torch.float64)

    @abstractmethod
    def update(self, outputs: torch.Tensor, y: torch.Tensor, losses: torch.Tensor) -> None: ...

    @abstractmethod
    def result(self) -> float: ...


class Accuracy(Metric):
    name = "accuracy"

    def update(self, outputs, y, losses):
        predicted = outputs.argmax(-1) if outputs.dim() > 1 and outputs.shape[-1] > 1 else (outputs.view(-1) > 0).long()
        self.sums += torch.tensor([(predicted.view(-1) == y.view(-1).long()).sum().item(), y.numel()], dtype=torch.float64)

    def result(self):
        return float(self.sums[0] / self.sums[1]) if self.sums[1] else 0.0


class F1(Metric):
    """Binary F1 of class 1; macro-averaged over classes when there are more than two."""

    name = "f1"

    def __init__(self):
        self.classes = 0
        self.sums = torch.zeros(0, dtype=torch.float64)

    def update(self, outputs, y, losses):
        classes = outputs.shape[-1] if outputs.dim() > 1 and outputs.shape[-1] > 1 else 2
        if self.sums.numel() == 0:
            self.classes, self.sums = classes, torch.zeros(3 * classes, dtype=torch.float64)
        predicted = outputs.argmax(-1) if classes > 2 or outputs.dim() > 1 else (outputs.view(-1) > 0).long()
        predicted, y = predicted.view(-1), y.view(-1).long()
        for c in range(classes):  # true positives, false positives, false negatives
            self.sums[3 * c] += ((predicted == c) & (y == c)).sum().item()
            self.sums[3 * c + 1] += ((predicted == c) & (y != c)).sum().item()
            self.sums[3 * c + 2] += ((predicted != c) & (y == c)).sum().item()

    def result(self):
        scores = []
        for c in range(self.classes):
            tp, fp, fn = self.sums[3 * c : 3 * c + 3].tolist()
            scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        if self.classes == 2:
            return scores[1]
        return sum(scores) / len(scores) if scores else 0.0


class Perplexity(Metric):
    name = "perplexity"

    def update(self, outputs, y, losses):
        self.sums += torch.tensor([losses.sum().item(), losses.numel()], dtype=torch.float64)

    def result(self):
        return float(torch.exp(self.sums[0] / self.sums[1])) if self.sums[1] else float("nan")


METRICS = {"accuracy": Accuracy, "acc": Accuracy, "f1": F1, "perplexity": Perplexity}


def make_metric(spec) -> Metric:
    if isinstance(spec, Metric):
        return spec.__class__()
    if isinstance(spec, str) and spec.lower() in METRICS:
        return METRICS[spec.lower()]()
    if isinstance(spec, type) and issubclass(spec, Metric):
        return spec()
    raise ConfigError(f"unknown metric {spec!r}; choose from {', '.join(METRICS)} or pass an alloy Metric")
