"""Make a loaded model fast at decoding, as functions applied to it (the model code stays plain).

Decoding one token is a chain of GEMVs (one activation row against every weight), so its speed
is how fast the weights stream from memory plus a fixed cost per op. `prepare(model, dtype)`:

- fuses q/k/v and gate/up into one matmul each (fewer ops, longer GEMVs);
- on CPU, swaps every nn.Linear (and a tied head) for a `DecodeLinear` that stores the weight in
  `dtype` — fp32, bf16 or per-channel int8 — and runs decode steps on Alloy's GEMV kernels
  (alloy.kernels). Everything else (norms, attention, the KV cache: bf16 for bf16 where the fused
  step reads it) stays fp32. int8 is
  weight-only: a quarter of the bytes to stream, fp32 arithmetic. bf16 is half the bytes, and its
  matmuls take bf16 operands, as llama.cpp's BF16 and PyTorch's bf16 linear do: the activation is
  rounded to bf16 as it enters one, the products (exact in fp32) summed in fp32 — on AVX512_BF16,
  `vdpbf16ps`, twice the products an instruction. Prefill (many rows) goes to a GEMM, which is
  faster there: PyTorch's or oneDNN's, whichever the machine measured faster (alloy.kernels.gemm;
  for bf16, PyTorch's bf16 GEMM, its output then rounded to bf16 too, where that measured faster).
- elsewhere (CUDA), or on a CPU without the kernels: the model in bf16 for bf16/int8, and int8 as
  alloy.infer.quantize.Int8Linear.
- q8_0 / q4_0 / q4_1 / q4_k (GGUF block formats, alloy.quant): every nn.Linear becomes a
  QuantLinear holding the blocks, quantized one layer at a time from the checkpoint's dtype (the
  model is never whole in fp32); the head is Q8_0 for every format (llama.cpp's 4-bit mixes
  also keep the output matrix at 6-8 bits), and so is the token table, whose blocks a tied
  head shares. On CPU the arithmetic is the activation in int8 per 32 inputs against the blocks
  (decode) or fp32 (prefill, fallback), with keys and values in bf16 where the fused step reads
  them (as llama.cpp's f16 cache). On a GPU the blocks are quantized on the host a layer at a
  time, held on the device in GGUF's layout and decoded there by PyTorch, tile by tile, for an
  fp32 GEMM: the memory of the format, not yet its speed (no fused GPU kernel).

The result is for inference only: its state dict no longer matches the checkpoint's names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alloy.checkpoint.io import StackedRows
from alloy.errors import ConfigError
from alloy import kernels
from alloy.kernels import gemm, memory
from alloy.infer.quantize import int8_rows, quantize_int8
from alloy.quant import HEAD_FORMAT, check_width, get_format, quantize
from alloy.quant.linear import QuantEmbedding, QuantLinear
from alloy.model.layers import MLP, Attention, Norm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16,  # activations without kernels
          "q8_0": torch.float32, "q4_0": torch.float32, "q4_1": torch.float32, "q4_k": torch.float32}
QUANT_FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k")  # GGUF block formats: alloy.quant
GEMV_MAX_ROWS = 16  # up to this many rows (batch x new tokens) the GEMV kernel beats MKL's GEMM here


def decode_dtype(name: str) -> str:
    """`name` if it is a format `prepare` decodes in (a key of DTYPES), else a ConfigError."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r} for generation; choose from {', '.join(DTYPES)}")
    return name


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's activations are in (its first floating-point parameter's)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


class DecodeLinear(nn.Module):
    """y = x @ W.T + b with W [out, in] kept in fp32, bf16 or int8 (with a per-row fp32 scale); fp32 x
    (rounded to bf16 on its way into a bf16 W: bf16 operands, fp32 sums)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, storage: str):
        super().__init__()
        weight = weight.detach()
        if storage == "int8":
            q, scale = int8_rows(weight.float())
            self.register_buffer("weight", q)
            self.register_buffer("scale", scale.float())
        else:
            # fp32 storage shares the tensor: a tied head costs no second copy
            keep = storage == "fp32" and weight.dtype == torch.float32 and weight.is_contiguous()
            self.register_buffer("weight", weight if keep else weight.to(DTYPES[storage]).contiguous())
            self.scale = None
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features, self.storage = weight.shape[1], weight.shape[0], storage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        # (the kernels read host memory: a prepared model moved to a GPU takes PyTorch's ops)
        if rows <= GEMV_MAX_ROWS and x.dtype == torch.float32 and x.is_cpu:
            y = kernels.gemv(x.reshape(rows, self.in_features).contiguous(), self.weight, self.scale, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if self.weight.dtype == torch.bfloat16 and x.dtype == torch.float32:  # bf16 operands, as the kernels take them
            return gemm.linear_bf16(x, self.weight, self.bias)
        w = self.weight.to(x.dtype)
        if self.scale is not None:
            w = w * self.scale[:, None].to(x.dtype)
        return gemm.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights {self.storage}"


class DecodeNorm(nn.Module):
    """RMSNorm for fp32 activations with the effective weight (Gemma's 1 + w folded in) on Alloy's
    kernel for decode-sized inputs; PyTorch's formula for the rest."""

    def __init__(self, norm: Norm):
        super().__init__()
        weight = norm.weight.detach().float()
        self.weight = nn.Parameter((weight + norm.offset) if norm.offset else weight, requires_grad=False)
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        rows = x.numel() // n
        if rows <= GEMV_MAX_ROWS and x.dtype == torch.float32 and x.is_cpu:
            return kernels.rms_norm(x.reshape(rows, n).contiguous(), self.weight, self.eps).view(x.shape)
        return F.rms_norm(x.float(), (n,), self.weight, self.eps).to(x.dtype)


def _cat_linear(parts: list[nn.Linear]) -> nn.Linear:
    first = parts[0]
    if any(not isinstance(p.weight, torch.Tensor) for p in parts):
        return _stacked_linear(parts)
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(False)


def _stacked_linear(parts: list[nn.Linear]) -> nn.Linear:
    """The fused nn.Linear of parts whose weights are rows still on disk (alloy.infer.load: read
    and quantized a chunk at a time): its weight stacks their rows, never a fused float copy."""
    first = parts[0]
    with torch.device("meta"):
        fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None)
    del fused.weight
    fused.weight = StackedRows([p.weight for p in parts])
    if first.bias is not None:  # in the weight's dtype, as the fused nn.Linear holds it
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]).to(first.weight.dtype), requires_grad=False)
    return fused.requires_grad_(False)


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, Attention) and module.wqkv is None:
            module.wqkv = _cat_linear([module.wq, module.wk, module.wv])
            del module.wq, module.wk, module.wv
        if isinstance(module, MLP) and module.gated and module.gate_up is None:
            module.gate_up = _cat_linear([module.gate, module.up])
            del module.gate, module.up
    return model


def uses_kernels(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu" and kernels.available()


@torch.no_grad()
def prepare(model: nn.Module, dtype: str = "fp32", *, fuse: bool = True) -> nn.Module:
    """Convert `model` in place for fast decoding in `dtype` (fp32, bf16, int8 or a GGUF block
    format: q8_0, q4_0, q4_1, q4_k) and return it."""
    dtype = decode_dtype(dtype)
    model.eval().requires_grad_(False)
    if fuse:
        fuse_projections(model)
    if dtype in QUANT_FORMATS:
        return _prepare_quantized(model, dtype)
    if not uses_kernels(model):
        model.to(DTYPES[dtype])
        return quantize_int8(model) if dtype == "int8" else model
    model.to(torch.float32)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, DecodeLinear(child.weight, child.bias, dtype))
            elif isinstance(child, Norm) and child.kind == "rmsnorm":
                setattr(module, name, DecodeNorm(child))
    # A tied head is a matmul against the embedding table, not a module: give it one, so it
    # streams at the kernel's rate (and in bf16/int8) like every other weight.
    embed = getattr(model, "embed", None)
    if getattr(model, "has_head", False) and not hasattr(model, "head") and embed is not None:
        model.head = DecodeLinear(embed.tok.weight, None, dtype)
    if dtype == "bf16":
        _bf16_cache_where_fused(model)
    return to_huge_pages(model)


def _bf16_cache_where_fused(model: nn.Module) -> None:
    """bf16 keys and values in the KV cache when the fused step decodes this model (bf16 or a block
    format) and reads them (the AVX-512 builds): half the cache's bytes, which at batch 8 were a
    quarter of what a bf16 step reads and near half of a Q4_0 one's. Elsewhere the cache stays fp32: the
    forward would widen a bf16 cache every step."""
    from alloy.infer.fused import KV_BF16_ISAS, fused_decoder

    decoder = fused_decoder(model)
    if decoder is not None and decoder.isa in KV_BF16_ISAS:
        model.kv_cache_dtype = torch.bfloat16


@torch.no_grad()
def _prepare_quantized(model: nn.Module, fmt: str) -> nn.Module:
    """Every linear (and the token table) as GGUF blocks of `fmt`, quantized a layer at a time on
    the CPU. On another device the blocks move there in GGUF's own layout and PyTorch decodes them
    (alloy.quant.linear: the compiled kernels read host memory only)."""
    device = next(model.parameters()).device
    isa = "auto" if device.type == "cpu" else None
    # Check every width before quantizing anything, so a bad model fails in a second, not midway.
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            check_width(get_format(HEAD_FORMAT if name == "head" else fmt), module.in_features, name)
    embed = getattr(model, "embed", None)
    if embed is not None:
        check_width(get_format(HEAD_FORMAT), embed.tok.weight.shape[1], "embed.tok")
    for parent_name, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear:
                # one layer at a time: the fp32 copy of a weight lives only inside quantize()
                layer_fmt = HEAD_FORMAT if full == "head" else fmt
                layer = QuantLinear.from_weight(child.weight, child.bias, layer_fmt, name=full, isa=isa)
                setattr(module, name, layer.to(device))
    if embed is not None:
        # The token table in the head's format; a tied head reads the same blocks (one copy).
        dim = embed.tok.weight.shape[1]
        blocks = quantize(embed.tok.weight, HEAD_FORMAT).to(device)
        if getattr(model, "has_head", False) and not hasattr(model, "head"):
            model.head = QuantLinear(blocks, HEAD_FORMAT, dim, isa=isa)  # (its kernel's layout: the lookup reads that)
            embed.tok = QuantEmbedding(model.head.blocks, HEAD_FORMAT, dim, layout=model.head.kernel_fmt, isa=isa)
        else:
            embed.tok = QuantEmbedding(blocks, HEAD_FORMAT, dim, isa=isa)
    model.to(torch.float32)  # what is left: norms, position embeddings, biases (the blocks are uint8)
    if device.type == "cpu" and kernels.available():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, Norm) and child.kind == "rmsnorm":
                    setattr(module, name, DecodeNorm(child))
    # Keys and values in bf16 too, as llama.cpp keeps them in f16 for every weight format: at batch
    # 8 a Q4_0 step read ~47 MB of fp32 cache against ~55 MB of blocks.
    _bf16_cache_where_fused(model)
    # Blocks stay where quantize put them: moving them gained nothing measurable (a ~98M model's
    # blocks sit in L3 here), and a copy after loading would undo the bounded peak above.
    return model


STREAMED = {DecodeLinear: ("weight", "scale")}  # what every decode step reads


@torch.no_grad()
def to_huge_pages(model: nn.Module) -> nn.Module:
    """Move the weights a decode step streams into huge pages (alloy.kernels.memory: 1.5x the read
    rate of 4 KiB pages on the Xeon of docs/BENCHMARKS.md), one tensor at a time so the peak is
    the model plus its largest tensor. A tensor shared with another module (a tied head's fp32
    weight is the token table) moves once, and every holder gets the new one."""
    if not memory.huge_pages():
        return model
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and tensor.device.type == "cpu":
                holders.setdefault(tensor.data_ptr(), []).append((module, name))
    streamed = {getattr(m, name).data_ptr(): getattr(m, name) for m in model.modules()
                for name in STREAMED.get(type(m), ()) if getattr(m, name, None) is not None}
    ptrs = [p for p, t in streamed.items() if t.is_contiguous() and t.numel()]
    homes = iter(memory.packed([(tuple(streamed[p].shape), streamed[p].dtype) for p in ptrs]))
    del streamed
    for ptr in ptrs:
        home = next(homes)
        owners = holders.pop(ptr)
        home.copy_(getattr(*owners[0]))
        for module, name in owners:  # the old tensor goes with its last holder
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(home, requires_grad=False)
            else:
                module._buffers[name] = home
    return model


def decode_inventory(inventory, dtype: str):
    """The inventory as a decode plan in `dtype` should see it: on CPUs with Alloy's kernels, int8
    is weight-only and bf16 multiplies bf16 operands in fp32 (`vdpbf16ps` where the CPU has it), so
    a CPU without a fast bf16 matmul still decodes bf16 weights at its fp32 rate, reading half the
    bytes, and one with it at its bf16 rate. Other devices are unchanged."""
    if dtype == "fp32" or dtype in QUANT_FORMATS or not kernels.available():
        return inventory
    devices = []
    for d in inventory.devices:
        if d.kind == "cpu" and "fp32" in d.matmul_flops:
            fp32 = d.matmul_flops["fp32"]
            rate = fp32 if dtype == "int8" else max(fp32, d.matmul_flops.get("bf16", 0.0))
            d = d.model_copy(update={"matmul_flops": {**d.matmul_flops, "bf16": rate},
                                     "slow_dtypes": {k: v for k, v in d.slow_dtypes.items() if k != "bf16"}})
        devices.append(d)
    return inventory.model_copy(update={"devices": devices})
