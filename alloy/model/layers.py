"""The pieces of one Transformer: norms, rotary positions, attention, MLP, block.

Each reads ModelSpec knobs. Numerics follow the reference implementations (norms in fp32,
RoPE tables in fp32 then cast) so fp32 logits match transformers to ~1e-5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alloy.spec import ModelSpec

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Norm(nn.Module):
    """RMSNorm (optionally `offset + weight`, Gemma) or LayerNorm with bias."""

    def __init__(self, spec: ModelSpec, dim: int | None = None, kind: str | None = None):
        super().__init__()
        dim = dim or spec.hidden_size
        self.kind = kind or spec.norm
        self.eps = spec.norm_eps
        self.offset = spec.norm_offset
        self.weight = nn.Parameter(torch.ones(dim) - self.offset)
        self.bias = nn.Parameter(torch.zeros(dim)) if self.kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        if not self.offset and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op instead of seven: the same arithmetic, and decode runs a norm per layer
            # on a single row, where per-op overhead is the cost
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        # bf16/fp16 are upcast to fp32; fp32 and fp64 keep their precision (fp64: equality tests)
        up = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(up)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.to(up))).type_as(x)
        return self.weight * xf.to(x.dtype)


# Rows of rope_inv_freq: one RoPE table per kind of layer and length.
ROPE_FULL, ROPE_LOCAL, ROPE_LONG = 0, 1, 2


def _plain_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _scaled_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """The full layers' inverse frequencies [rope_dim / 2], with the spec's context extension."""
    dim = spec.rope_dim
    inv_freq = _plain_inv_freq(spec.rope_theta, dim)
    if spec.rope_scaling == "linear":
        return inv_freq / spec.rope_factor
    if spec.rope_scaling == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        old_len = spec.rope_original_max_seq_len
        low_wavelen = old_len / spec.rope_low_freq_factor
        high_wavelen = old_len / spec.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.rope_factor, inv_freq)
        smooth = (old_len / wavelen - spec.rope_low_freq_factor) / (
            spec.rope_high_freq_factor - spec.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / spec.rope_factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if spec.rope_scaling == "yarn":
        return _yarn_inv_freq(spec)
    if spec.rope_scaling == "longrope":  # the short factors; ROPE_LONG holds the long ones
        return _longrope_inv_freq(spec, spec.rope_short_factor)
    return inv_freq


def _longrope_inv_freq(spec: ModelSpec, factors: tuple[float, ...]) -> torch.Tensor:
    """LongRoPE: each frequency divided by its own searched factor."""
    shape = torch.arange(0, spec.rope_dim, 2, dtype=torch.int64).float() / spec.rope_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * spec.rope_theta**shape)


def _yarn_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than beta_slow times over the original length are
    interpolated (divided by factor), more than beta_fast kept, a linear ramp between."""
    dim, base, old_len = spec.rope_dim, spec.rope_theta, spec.rope_original_max_seq_len

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(spec.rope_beta_fast), correction_dim(spec.rope_beta_slow)
    if spec.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return (1.0 / (spec.rope_factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies [3, rope_dim / 2] in fp32, one row per table: full layers (LongRoPE:
    its short factors), sliding layers (their own unscaled base, Gemma 3), LongRoPE's long factors."""
    full = _scaled_inv_freq(spec)
    local = _plain_inv_freq(spec.rope_local_theta, spec.rope_dim) if spec.rope_local_theta else full
    long = _longrope_inv_freq(spec, spec.rope_long_factor) if spec.rope_scaling == "longrope" else full
    return torch.stack([full, local, long])


def rope_scale(spec: ModelSpec, row: int) -> float:
    """What cos and sin of table `row` are multiplied by (1 for the unscaled local table)."""
    return 1.0 if row == ROPE_LOCAL and spec.rope_local_theta else spec.rope_attention_factor


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos, sin of shape [B, 1, T, rope_dim] for integer positions [B, T], times `scale` in fp32."""
    freqs = positions.float()[..., None] * inv_freq.float()  # (B, T, rope_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale == 1.0:
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading rope_dim features of each head (half-split layout, as in HF)."""
    rot_dim = cos.shape[-1]
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    rot = rot * cos + rotated * sin
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.spec = spec
        self.window = spec.layer_window(layer)
        self.rope_row = ROPE_LOCAL if self.window and spec.rope_local_theta else ROPE_FULL
        h, hd = spec.hidden_size, spec.head_dim
        self.wq = nn.Linear(h, spec.num_heads * hd, bias=spec.qkv_bias)
        self.wk = nn.Linear(h, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.wv = nn.Linear(h, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.wo = nn.Linear(spec.num_heads * hd, h, bias=spec.o_bias)
        self.wqkv = None  # [wq; wk; wv] as one matmul, set by alloy.infer.optimize for decoding
        if spec.qk_norm:  # over each head, or over all heads at once
            self.q_norm = Norm(spec, hd if spec.qk_norm_per_head else spec.num_heads * hd, kind="rmsnorm")
            self.k_norm = Norm(spec, hd if spec.qk_norm_per_head else spec.num_kv_heads * hd, kind="rmsnorm")

    def forward(self, x, rope, mask, cache=None, layer=None, start=0):
        spec = self.spec
        B, T, _ = x.shape
        if self.wqkv is not None:
            kv_dim = spec.num_kv_heads * spec.head_dim
            q, k, v = self.wqkv(x).split([spec.num_heads * spec.head_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if spec.qk_norm and not spec.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, spec.num_heads, spec.head_dim)
        k = k.view(B, T, spec.num_kv_heads, spec.head_dim)
        v = v.view(B, T, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm and spec.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, kv_heads, start + T, hd)
            if k.dtype != q.dtype:  # a bf16 cache under fp32 activations (prepare(model, "bf16") on CPU)
                k, v = k.to(q.dtype), v.to(q.dtype)
        attn_mask, is_causal = mask
        if spec.attn_softcap:
            out = _softcapped_attention(q, k, v, attn_mask, is_causal, spec.softmax_scale, spec.attn_softcap)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=spec.softmax_scale,
                enable_gqa=spec.num_kv_heads != spec.num_heads,
            )
        return self.wo(out.transpose(1, 2).reshape(B, T, spec.num_heads * spec.head_dim))


def _softcapped_attention(q, k, v, attn_mask, is_causal, scale, cap):
    """Attention with cap * tanh(scores / cap) on the logits (Gemma 2); SDPA cannot do this."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, heads, Tq, Tk)
    scores = torch.tanh(scores / cap) * cap
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    return probs @ v


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, width: int | None = None):
        super().__init__()
        h, f = spec.hidden_size, width or spec.intermediate_size
        self.gated = spec.mlp == "gated"
        self.act = _ACTIVATIONS[spec.activation]
        if self.gated:
            self.gate = nn.Linear(h, f, bias=spec.mlp_bias)
        self.up = nn.Linear(h, f, bias=spec.mlp_bias)
        self.down = nn.Linear(f, h, bias=spec.mlp_bias)
        self.gate_up = None  # [gate; up] as one matmul, set by alloy.infer.optimize for decoding

    def forward(self, x):
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        if self.gated:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """One layer. Where the norms sit and how residuals add are spec knobs."""

    def __init__(self, spec: ModelSpec, layer: int):
        from alloy.model.moe import MoE  # moe.py builds its experts from MLP, so imports this file

        super().__init__()
        self.spec = spec
        self.layer = layer
        self.attn_norm = Norm(spec)
        self.attn = Attention(spec, layer)
        self.mlp_norm = Norm(spec)
        self.mlp = MoE(spec) if spec.is_moe_layer(layer) else MLP(spec)
        if spec.norm_placement == "sandwich":
            self.attn_post_norm = Norm(spec)
            self.mlp_post_norm = Norm(spec)

    def forward(self, x, rope, masks, cache=None, start=0):
        """rope: {table row: (cos, sin)} as Transformer builds it, or None."""
        mask = masks[self.attn.window]
        rope = rope[self.attn.rope_row] if rope is not None else None
        attn = lambda h: self.attn(h, rope, mask, cache, self.layer, start)  # noqa: E731
        placement = self.spec.norm_placement
        if self.spec.parallel_residual:
            return x + attn(self.attn_norm(x)) + self.mlp(self.mlp_norm(x))
        if placement == "pre":
            x = x + attn(self.attn_norm(x))
            return x + self.mlp(self.mlp_norm(x))
        if placement == "sandwich":
            x = x + self.attn_post_norm(attn(self.attn_norm(x)))
            return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x)))
        if placement == "output":
            x = x + self.attn_norm(attn(x))
            return x + self.mlp_norm(self.mlp(x))
        x = self.attn_norm(x + attn(x))  # post-norm (BERT)
        return self.mlp_norm(x + self.mlp(x))
