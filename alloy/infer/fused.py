"""Decode steps in one compiled call (alloy/kernels/decode.c) for a model `prepare` made fast.

After `prepare`, a decode step's GEMVs stream at memory speed, and what is left is PyTorch's
dispatch of ~30 small ops per layer (norms, RoPE, cache writes, attention, activations,
residuals): half the step on a 4-bit model. `FusedDecoder.build(model)` reads the prepared
modules once — weight pointers, norm weights, the spec's shape — and each step is then one call
that runs every layer, the final norm and the head. The embeddings and the RoPE tables stay in
PyTorch (the model's own code, so the floats are its own), and so does the KV cache: prefill
writes it with PyTorch, decode with the kernel, into the same buffers.

It serves the shapes decode has most: RMSNorm blocks (pre-norm, Gemma's sandwich, OLMo 2's
output norms) with a dense
MLP, rotary or no positions, grouped-query attention with optional q/k norms, biases and sliding
windows; one token for each of `rows` sequences, each at its own position (a plain cache: all at
one; serving's slot cache: each request's own). Anything else — MoE layers, LayerNorm, logit
soft-capping in attention, padded batches — returns None from `build` or is declined per call,
and the model's own forward runs: same results.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from pathlib import Path

import torch
from torch import nn

from alloy import kernels
from alloy.kernels import quant as kernel_quant
from alloy.model.cache import KVCache, SlotCache

SOURCE = Path(kernels.__file__).with_name("decode.c")
LIN_KINDS = {torch.float32: 100, torch.bfloat16: 101, torch.int8: 102}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}
ROPE_TABLES = 3  # RoPE table rows a layer may read (alloy.model.layers: ROPE_FULL, ROPE_LOCAL, ROPE_LONG)
KV_BF16_ISAS = kernel_quant.VNNI_ISAS  # the AVX-512 builds, whose attention reads a bf16 KV cache


class _Lin(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("k", ctypes.c_long), ("n", ctypes.c_long), ("kind", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Lin), ("o", _Lin), ("up", _Lin), ("down", _Lin),
                *[(name, ctypes.c_void_p) for name in ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm",
                                                       "q_norm", "k_norm", "k_cache", "v_cache")],
                ("window", ctypes.c_long), ("rope_row", ctypes.c_int)]


class _Model(ctypes.Structure):
    _fields_ = [*[(name, ctypes.c_long) for name in ("rows", "hidden", "heads", "kv_heads", "head_dim", "rope_dim",
                                                    "ffn", "max_len")],
                ("eps", ctypes.c_float), ("softmax_scale", ctypes.c_float),
                *[(name, ctypes.c_int) for name in ("gated", "act", "qk_norm_per_head", "n_layers", "n_tables", "kv_bf16")],
                ("layers", ctypes.POINTER(_Layer)), ("final_norm", ctypes.c_void_p), ("head", _Lin)]


@functools.cache
def library(isa: str) -> ctypes.CDLL | None:
    lib = kernels.load(SOURCE, kernel_quant.ISA_FLAGS[isa][0], "fused decode steps")
    if lib is not None:
        lib.alloy_decode_step.argtypes = [ctypes.POINTER(_Model)] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
        lib.alloy_decode_step.restype = None
    return lib


class NotFusable(Exception):
    """Why a model keeps its own forward for decoding (said once, at build)."""


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _lin(module: nn.Module, isa: str) -> _Lin:
    from alloy.infer.optimize import DecodeLinear
    from alloy.quant.linear import QuantLinear

    bias = getattr(module, "bias", None)
    if isinstance(module, QuantLinear):
        if module.isa != isa or module.exact:
            raise NotFusable(f"a {module.fmt} layer without the {isa} kernels")
        kind, weight, scale = kernel_quant.FORMAT_IDS[module.kernel_fmt], module.blocks, None
    elif isinstance(module, DecodeLinear) and module.weight.dtype in LIN_KINDS:
        kind, weight, scale = LIN_KINDS[module.weight.dtype], module.weight, module.scale
    else:
        raise NotFusable(f"a {type(module).__name__} layer")
    for t in (weight, scale, bias):
        if t is not None and not (t.is_contiguous() and t.device.type == "cpu"):
            raise NotFusable("a weight that is not a contiguous CPU tensor")
    return _Lin(_ptr(weight), _ptr(scale), _ptr(bias), module.in_features, module.out_features, kind)


def _norm(module: nn.Module | None, eps: float) -> int | None:
    from alloy.infer.optimize import DecodeNorm

    if module is None:
        return None
    if not isinstance(module, DecodeNorm) or module.eps != eps:
        raise NotFusable(f"a {type(module).__name__} norm")
    return module.weight.data_ptr()


class FusedDecoder:
    """One token per row through every layer, the final norm and the head, in one C call."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL, layers: list[_Layer], head: _Lin, final_norm: int | None,
                 isa: str):
        self.model, self.lib, self.layers, self.head, self.final_norm, self.isa = model, lib, layers, head, final_norm, isa
        # (the cache buffers' addresses, struct, layer array, the cache, rows): keyed by where every
        # layer's keys and values are, not by the cache object — a freed cache's id can come back
        # with its buffers elsewhere, and serving hands a fresh view of the same buffers each step;
        # the same live cache object (generation's) skips computing the key
        self._bound: tuple[tuple, _Model, object, weakref.ref, int] | None = None
        # every slot's RoPE cos and sin [slots, ROPE_TABLES, 2, rope_dim], made once: per step they
        # cost ~30 us of PyTorch ops, a tenth of a small model's step
        self._rope_table: torch.Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module) -> "FusedDecoder":
        """The decoder for a prepared model, or NotFusable saying what keeps it on PyTorch."""
        from alloy.model.layers import MLP

        from alloy.infer.optimize import DecodeLinear
        from alloy.quant.linear import QuantLinear

        if not any(isinstance(m, (DecodeLinear, QuantLinear)) for m in model.modules()):
            raise NotFusable("a model alloy.infer.optimize.prepare has not converted")
        spec = model.spec
        isa = kernel_quant.best_isa()
        if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
            raise NotFusable("weights off the CPU (the kernels read host memory)")
        if isa is None or not kernels.enabled():
            raise NotFusable("no compiled kernels on this machine")
        if not (spec.causal and model.has_embed and model.has_head):
            raise NotFusable("not a whole causal model")
        if spec.norm != "rmsnorm" or spec.norm_placement not in ("pre", "sandwich", "output") or spec.parallel_residual:
            raise NotFusable(f"{spec.norm} {spec.norm_placement}-norm blocks")
        if spec.attn_softcap or spec.positions not in ("rope", "none") or spec.rope_dim % 2:
            raise NotFusable("attention soft-capping or learned positions")
        if spec.activation not in ACTIVATIONS:
            raise NotFusable(f"activation {spec.activation}")
        lib = library(isa)
        if lib is None:
            raise NotFusable("the fused kernel did not build")
        eps = spec.norm_eps
        layers = []
        for block in model.layers.values():
            attn, mlp = block.attn, block.mlp
            if type(mlp) is not MLP or attn.wqkv is None or (mlp.gated and mlp.gate_up is None):
                raise NotFusable("an MoE layer or unfused projections")
            if spec.norm_placement == "output":  # OLMo 2: x + norm(attn(x)), no norm on the way in
                norms = dict(attn_norm=None, mlp_norm=None, attn_post_norm=_norm(block.attn_norm, eps),
                             mlp_post_norm=_norm(block.mlp_norm, eps))
            else:
                norms = dict(attn_norm=_norm(block.attn_norm, eps), mlp_norm=_norm(block.mlp_norm, eps),
                             attn_post_norm=_norm(getattr(block, "attn_post_norm", None), eps),
                             mlp_post_norm=_norm(getattr(block, "mlp_post_norm", None), eps))
            layers.append(_Layer(
                qkv=_lin(attn.wqkv, isa), o=_lin(attn.wo, isa), up=_lin(mlp.gate_up if mlp.gated else mlp.up, isa),
                down=_lin(mlp.down, isa), **norms,
                q_norm=_norm(getattr(attn, "q_norm", None), eps), k_norm=_norm(getattr(attn, "k_norm", None), eps),
                window=attn.window, rope_row=attn.rope_row))
        head = getattr(model, "head", None)
        if head is None:
            raise NotFusable("a tied head without its own module (prepare gives it one)")
        return cls(model, lib, layers, _lin(head, isa), _norm(getattr(model, "norm", None), eps), isa)

    def accepts(self, ids: torch.Tensor, positions, attention_mask, cache) -> bool:
        """Whether this call is a step the kernel takes: one new token per row, no padding, an fp32
        cache (or bf16, on the AVX-512 builds: KV_BF16_ISAS) — plain, or a slot cache's rows — with
        room in every row."""
        if not (ids.dim() == 2 and ids.shape[1] == 1 and positions is None and attention_mask is None):
            return False
        if type(cache) is KVCache:
            room = isinstance(cache.length, int) and cache.length < cache.max_len
        else:
            room = type(cache) is SlotCache and bool((cache.lengths < cache.max_len).all())
        k = next(iter(cache.k.values()))
        kv_ok = k.dtype == torch.float32 or (k.dtype == torch.bfloat16 and self.isa in KV_BF16_ISAS)
        return room and ids.shape[0] == k.shape[0] and kv_ok

    def _bind(self, cache: KVCache, rows: int) -> _Model:
        if self._bound is not None and self._bound[3]() is cache and self._bound[4] == rows:
            return self._bound[1]
        key = tuple((cache.k[int(i)].data_ptr(), cache.v[int(i)].data_ptr()) for i in self.model.layers) + (rows,)
        if self._bound is not None and self._bound[0] == key:
            self._bound = (*self._bound[:3], weakref.ref(cache), rows)
            return self._bound[1]
        spec = self.model.spec
        layers = (_Layer * len(self.layers))()
        for i, (index, layer) in enumerate(zip(self.model.layers, self.layers)):
            k, v = cache.k[int(index)], cache.v[int(index)]
            if not (k.is_contiguous() and v.is_contiguous()):
                raise NotFusable("a KV cache that is not contiguous")
            layers[i] = layer
            layers[i].k_cache, layers[i].v_cache = k.data_ptr(), v.data_ptr()
        mlp = next(iter(self.model.layers.values())).mlp
        struct = _Model(rows=rows, hidden=spec.hidden_size, heads=spec.num_heads, kv_heads=spec.num_kv_heads,
                        head_dim=spec.head_dim, rope_dim=spec.rope_dim if spec.positions == "rope" else 0,
                        ffn=mlp.down.in_features, max_len=cache.max_len, eps=spec.norm_eps,
                        softmax_scale=spec.softmax_scale, gated=int(mlp.gated), act=ACTIVATIONS[spec.activation],
                        qk_norm_per_head=int(spec.qk_norm_per_head), n_layers=len(self.layers), n_tables=ROPE_TABLES,
                        kv_bf16=int(cache.k[int(next(iter(self.model.layers)))].dtype == torch.bfloat16),
                        layers=layers, final_norm=self.final_norm, head=self.head)
        self._bound = (key, struct, layers, weakref.ref(cache), rows)  # the array lives as long as the struct
        return struct

    def _rope_of(self, positions: torch.Tensor) -> torch.Tensor:
        """[rows, ROPE_TABLES, 2, rope_dim]: cos and sin of every table a layer reads, for positions
        [rows, 1] — the model's own tables (its _rope), so the floats are the forward's."""
        spec = self.model.spec
        tables = torch.zeros(positions.shape[0], ROPE_TABLES, 2, max(spec.rope_dim, 1))
        if spec.positions == "rope":
            for table, (cos, sin) in self.model._rope(positions, torch.float32).items():
                tables[:, table, 0], tables[:, table, 1] = cos[:, 0, 0], sin[:, 0, 0]
        return tables

    def _rope_rows(self, positions: torch.Tensor, max_len: int) -> torch.Tensor:
        """Each row's tables, looked up in every slot's (made once for the longest cache seen).
        LongRoPE picks its factors per call, by the call's furthest position: made per call there."""
        if self.model.spec.rope_scaling == "longrope":
            return self._rope_of(positions)
        if self._rope_table is None or self._rope_table.shape[0] < max_len:
            self._rope_table = self._rope_of(torch.arange(max_len)[:, None])
        return self._rope_table[positions[:, 0]]

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [rows, 1, vocab] for token ids [rows, 1], each row at its next slot; advances the cache."""
        model, spec = self.model, self.model.spec
        rows, length = ids.shape[0], cache.length
        pos = torch.full((rows,), length, dtype=torch.long) if isinstance(length, int) else length.to(torch.long).clone()
        positions = pos[:, None]  # as the forward numbers a slot cache's rows: each at its own length
        x = model.embed(ids, positions).reshape(rows, spec.hidden_size).float().contiguous()
        tables = self._rope_rows(positions, cache.max_len)
        logits = torch.empty(rows, self.head.n, dtype=torch.float32)
        struct = self._bind(cache, rows)
        self.lib.alloy_decode_step(ctypes.byref(struct), x.data_ptr(), logits.data_ptr(), pos.data_ptr(),
                                   tables.data_ptr(), torch.get_num_threads())
        cache.length = length + 1  # a slot cache's setter writes its lengths in place
        if spec.final_softcap:
            logits = torch.tanh(logits / spec.final_softcap) * spec.final_softcap
        return logits[:, None]


def fused_decoder(model: nn.Module) -> FusedDecoder | None:
    """The fused decoder for `model`, or None (its own forward then decodes)."""
    try:
        return FusedDecoder.build(model)
    except NotFusable:
        return None
