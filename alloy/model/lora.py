"""LoRA: low-rank adapters on the linears of an unmodified Transformer, applied by module swap.

`apply_lora(model, LoraConfig(...))` replaces each targeted `nn.Linear` with a `LoraLinear` that
keeps the frozen base under the same parameter names (`layers.0.attn.wq.weight`), so the base's
state dict, key maps and checkpoints are untouched, and adds two trainable matrices:

    y = x W^T + b + scale * (dropout(x) A^T) B^T      A: [rank, in], B: [out, rank], scale = alpha / rank

Initialisation is PEFT's (A kaiming-uniform with a = sqrt(5), B zeros), so a fresh adapter
changes nothing. `merge_lora` folds W += scale * B A back into plain `nn.Linear`s.

QLoRA: `quantize_base(model, "q4_0")` then holds every block linear's frozen weight as GGUF
blocks (alloy.quant.linear.QuantLinear, exact mode), dequantized tile by tile in the forward and
again in the backward; the adapters stay in the model's float dtype.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alloy.errors import ConfigError

# Alloy's module names (alloy.model.layers): attention q/k/v/o, then the MLP's projections.
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "gate", "up", "down")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # leaf module names; None: DEFAULT_TARGETS the model has
    quantize_base: str | None = None  # QLoRA: the frozen block linears in this GGUF format (q8_0, q4_0, ...)

    def __post_init__(self):
        if self.targets is not None:  # a list from YAML or JSON: held as a tuple, so the config stays hashable
            object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None and not self.targets:
            raise ConfigError("LoRA targets is empty; name at least one linear (e.g. wq, wv) or leave it out")
        if self.quantize_base is not None:
            from alloy.quant import get_format

            get_format(self.quantize_base)  # an unknown format is refused here, before any model is built

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen linear (weight [out, in], bias [out] or None) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        self.rank, self.scale = rank, scale
        self.base: nn.Module | None = None  # QLoRA: a QuantLinear holding the frozen weight and bias instead
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init_lora_weights=True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same ops in the same order as PEFT's lora.Linear, so fp32 results agree to rounding.
        out = F.linear(x, self.weight, self.bias) if self.base is None else self.base(x)
        return out.add_(F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B), alpha=self.scale)

    @torch.no_grad()
    def quantize_base(self, fmt: str) -> None:
        from alloy.quant.linear import QuantLinear

        self.base = QuantLinear.from_weight(self.weight, self.bias, fmt, exact=True)
        del self.weight, self.bias  # the blocks are the only copy of the frozen weight
        self.bias = None

    def delta_weight(self) -> torch.Tensor:
        """scale * B A: what merging adds to the weight, [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Qualified name -> every nn.Linear inside the model's blocks (the head is not a target)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("layers.")}


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, new)


def _check_unfused(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if getattr(module, "wqkv", None) is not None or getattr(module, "gate_up", None) is not None:
            raise ConfigError(f"{name} holds fused decode projections (alloy.infer.optimize); "
                              "apply or merge LoRA before optimizing the model")


def target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The qualified names of the linears `config` targets in `model`, checked."""
    linears = _linears(model)
    if not linears:
        return []  # a pipeline stage of no layers (the final norm and head): nothing to adapt
    leaves = {name.rpartition(".")[2] for name in linears}
    if config.targets is None:
        wanted = set(DEFAULT_TARGETS) & leaves
    else:
        unknown = sorted(set(config.targets) - leaves)
        if unknown:
            raise ConfigError(f"LoRA target(s) {', '.join(unknown)} name no linear in this model; "
                              f"choose from {', '.join(sorted(leaves))}")
        wanted = set(config.targets)
    return [name for name in linears if name.rpartition(".")[2] in wanted]


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze every parameter of `model` and give each targeted linear a trainable adapter.
    In place; returns `model`. A model slice (pipeline stage) gets adapters on its own layers."""
    _check_unfused(model)
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ConfigError("the model already carries LoRA adapters; merge them first")
    names = target_names(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _swap(model, name, LoraLinear(model.get_submodule(name), config.rank, config.scale, config.dropout))
    return model


@torch.no_grad()
def quantize_base(model: nn.Module, fmt: str) -> nn.Module:
    """QLoRA: every linear in the model's blocks keeps its frozen weight as `fmt` GGUF blocks, an
    adapted one under its adapter, the others as a frozen QuantLinear; in place. Embeddings, norms
    and the head stay as they are (QLoRA's convention: they are a small part and quantize worst)."""
    from alloy.quant.linear import QuantLinear

    for name, module in list(model.named_modules()):
        if not name.startswith("layers."):
            continue
        if isinstance(module, LoraLinear) and module.base is None:
            module.quantize_base(fmt)
        elif type(module) is nn.Linear:
            if module.weight.requires_grad:
                raise ConfigError(f"{name} is trainable; quantize_base holds only frozen weights")
            _swap(model, name, QuantLinear.from_weight(module.weight, module.bias, fmt, exact=True, name=name))
    return model


@torch.no_grad()
def init_lora_params(model: nn.Module, seed: int) -> nn.Module:
    """PEFT's init drawn from a generator per (seed, module name), as alloy.model.init does for the
    base: a pipeline stage's adapters equal the whole model's, whatever the layout."""
    for name, module in lora_modules(model).items():
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3), times sqrt(3)
        values = torch.rand(module.lora_A.shape, generator=generator, dtype=torch.float64) * 2 * bound - bound
        module.lora_A.copy_(values.to(module.lora_A.dtype))
        module.lora_B.zero_()
    return model


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: `layers.0.attn.wq.lora_A` [rank, in] and `.lora_B` [out, rank], detached."""
    return {name: p.detach() for name, p in model.named_parameters()
            if name.endswith((".lora_A", ".lora_B"))}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base (W += scale * B A) and put plain nn.Linears back; in place."""
    for name, module in lora_modules(model).items():
        weight = module.weight if module.base is None else module.base.dequantized().to(module.lora_A.dtype)
        bias = module.bias if module.base is None else module.base.bias
        merged = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        merged.weight.copy_(weight + module.delta_weight().to(weight.dtype))
        if bias is not None:
            merged.bias.copy_(bias)
        merged.requires_grad_(weight.requires_grad)  # frozen like the rest of the base
        _swap(model, name, merged)
    return model
