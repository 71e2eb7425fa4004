"""ModelSpec: one flat, frozen description of a standard transformer.

Every field is an orthogonal architecture knob. The model reads knobs, never names: `family`
only tells the checkpoint adapters which Hugging Face layout to read and write.
Plain Python (no torch), so a 70B spec can be planned on a laptop.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alloy.errors import ConfigError, UnsupportedModelError
from alloy.jsonio import read_json_object

NORMS = ("rmsnorm", "layernorm")
NORM_PLACEMENTS = ("pre", "post", "sandwich", "output")
POSITIONS = ("rope", "learned")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn", "longrope")
MLPS = ("gated", "plain")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
LAYER_TYPES = ("full", "sliding")

# (lowest, highest) of each size. The highs are far above any released model (Llama 3.1 405B:
# 126 layers, hidden 16384, 128 heads, FFN 53248; vocabularies up to ~262k; contexts up to 10M)
# yet small enough that a per-layer loop is instant and size products stay far inside int64:
# `num_hidden_layers: 1000000000` is refused here instead of being expanded layer by layer.
SIZE_LIMITS = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "num_layers": (1, 1 << 10),
    "num_heads": (1, 1 << 10),
    "num_kv_heads": (1, 1 << 10),
    "head_dim": (1, 1 << 12),
    "intermediate_size": (1, 1 << 20),
    "max_seq_len": (1, 1 << 24),
    "rotary_dim": (0, 1 << 12),
    "type_vocab_size": (0, 1 << 16),
    "sliding_window": (0, 1 << 30),
    "rope_original_max_seq_len": (0, 1 << 24),
    "num_experts": (0, 1 << 12),
    "experts_per_token": (0, 1 << 12),
    "expert_intermediate_size": (0, 1 << 20),
}
MAX_PARAMS = 10**14  # 250x Llama 3.1 405B: more is a typo, not a model


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each field's annotation admits (a JSON config can hold anything); checked before any
# other check compares, multiplies or iterates a value.
_ADMITS = {
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "int": _is_int,
    "float": lambda v: (isinstance(v, float) and math.isfinite(v)) or (_is_int(v) and abs(v) < 1e308),
    "int | None": lambda v: v is None or _is_int(v),
    "tuple[int, ...]": lambda v: isinstance(v, tuple) and all(map(_is_int, v)),
    "tuple[float, ...]": lambda v: isinstance(v, tuple) and all(_ADMITS["float"](x) for x in v),
    "tuple[str, ...]": lambda v: isinstance(v, tuple) and all(isinstance(t, str) for t in v),
}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    family: str  # Hugging Face model_type; only the checkpoint adapters read it
    causal: bool = True  # decoder (logits) or bidirectional encoder (hidden states)

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int

    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # scale = offset + weight (Gemma stores weight - 1)
    norm_placement: str = "pre"  # pre: x + f(n(x)); post: n(x + f(x)); sandwich: x + n2(f(n1(x)));
    # output: x + n(f(x)) (OLMo 2)
    parallel_residual: bool = False  # x + attn(n1(x)) + mlp(n2(x)) (GPT-NeoX)
    final_norm: bool = True
    embedding_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    embedding_scaled: bool = False  # embeddings times sqrt(hidden_size) (Gemma)

    positions: str = "rope"  # rope, or learned absolute positions
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # leading dims of each head that rotate; 0 means all of head_dim
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 0
    rope_attention_factor: float = 1.0  # cos and sin times this (YaRN's mscale, LongRoPE's factor)
    rope_beta_fast: float = 32.0  # YaRN: the ramp between interpolated and kept frequencies,
    rope_beta_slow: float = 1.0  # in rotations over the original length
    rope_truncate: bool = True  # YaRN: ramp ends rounded to whole dimensions
    rope_short_factor: tuple[float, ...] = ()  # LongRoPE: per-frequency divisors [rope_dim / 2] used up
    rope_long_factor: tuple[float, ...] = ()  # to the original length, and past it
    rope_local_theta: float = 0.0  # RoPE base of sliding layers, unscaled (Gemma 3); 0: as full layers
    type_vocab_size: int = 0  # token-type (segment) embeddings (BERT)

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # RMSNorm of q and k before RoPE (Qwen3, Gemma 3, OLMoE)
    qk_norm_per_head: bool = True  # per head (Qwen3); False: over all heads at once (OLMoE)
    attn_scale: float = 0.0  # 0 means head_dim ** -0.5
    attn_softcap: float = 0.0  # 0 means none; else cap * tanh(scores / cap)
    sliding_window: int = 0  # keys within this many positions, on "sliding" layers
    layer_types: tuple[str, ...] = ()  # per layer "full" | "sliding"; () means all full (no window)

    mlp: str = "gated"  # gated: down(act(gate(x)) * up(x)); plain: down(act(up(x)))
    activation: str = "silu"
    mlp_bias: bool = False
    # Mixture of experts: a router picks experts_per_token of num_experts gated MLPs per token.
    num_experts: int = 0  # 0: every layer has one dense MLP
    experts_per_token: int = 0
    expert_intermediate_size: int = 0  # each expert's FFN width; 0 means intermediate_size
    router_renormalize: bool = True  # the chosen experts' softmax weights rescaled to sum to 1
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP (intermediate_size) in an MoE model

    tie_embeddings: bool = False
    final_softcap: float = 0.0  # 0 means none
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _ADMITS[f.type](value):
                kind = "a finite number" if f.type == "float" else f.type
                raise ConfigError(f"ModelSpec.{f.name} must be {kind}, got {reprlib.repr(value)}")
            if f.type == "float":  # a JSON 10**100 is an int, which torch cannot take past int64
                object.__setattr__(self, f.name, float(value))
        for name, allowed in (
            ("norm", NORMS),
            ("norm_placement", NORM_PLACEMENTS),
            ("positions", POSITIONS),
            ("rope_scaling", ROPE_SCALINGS),
            ("mlp", MLPS),
            ("activation", ACTIVATIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise UnsupportedModelError(
                    f"ModelSpec.{name}={value!r} is not supported; supported: {', '.join(allowed)}"
                )
        for name, (low, high) in SIZE_LIMITS.items():
            if not low <= getattr(self, name) <= high:
                raise ConfigError(f"ModelSpec.{name} must be from {low} to {high:,}, got {getattr(self, name)}")
        self._check_experts()  # before num_params, which counts dense_layers
        if self.num_params() > MAX_PARAMS:
            raise ConfigError(f"the spec describes {self.num_params():.3g} parameters, over the limit of "
                              f"{MAX_PARAMS:.0e}; check vocab_size, hidden_size, intermediate_size, num_layers")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = set(self.layer_types) - set(LAYER_TYPES)
        if bad:
            raise UnsupportedModelError(f"layer_types value {sorted(bad)[0]!r}; supported: full, sliding")
        if "sliding" in self.layer_types and self.sliding_window <= 0:
            raise ConfigError("layer_types has sliding layers but sliding_window is not set")
        if "sliding" not in self.layer_types:  # one canonical form for "no sliding window"
            object.__setattr__(self, "layer_types", ())
            object.__setattr__(self, "sliding_window", 0)
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(f"rotary_dim={self.rotary_dim} must be even and at most head_dim={self.head_dim}")
        if self.positions == "rope" and self.rope_dim % 2:
            raise ConfigError(f"RoPE rotates pairs of dimensions; head_dim={self.head_dim} is odd")
        if "sliding" not in self.layer_types or (  # no sliding layer reads the local base, or it is
                self.rope_local_theta == self.rope_theta and self.rope_scaling == "none"  # the full table
                and self.rope_attention_factor == 1.0):
            object.__setattr__(self, "rope_local_theta", 0.0)
        if not self.qk_norm:
            object.__setattr__(self, "qk_norm_per_head", True)
        self._check_knobs()
        self._check_rope()

    def _check_knobs(self) -> None:
        """Float knobs within their domain: rope_inv_freq divides by the factors and the
        original length, a negative eps makes a norm's rsqrt NaN."""
        for name in ("norm_eps", "attn_scale", "attn_softcap", "final_softcap"):  # 0: none / the default
            if getattr(self, name) < 0:
                raise ConfigError(f"ModelSpec.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rope_theta", "rope_factor", "rope_attention_factor"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelSpec.{name} must be > 0, got {getattr(self, name)}")
        if self.rope_scaling == "llama3" and not (
            0 < self.rope_low_freq_factor <= self.rope_high_freq_factor and self.rope_original_max_seq_len > 0
        ):
            raise ConfigError(
                "llama3 RoPE scaling needs 0 < low_freq_factor <= high_freq_factor and "
                f"original_max_position_embeddings > 0, got {self.rope_low_freq_factor}, "
                f"{self.rope_high_freq_factor}, {self.rope_original_max_seq_len}"
            )

    def _check_rope(self) -> None:
        if self.rope_local_theta < 0:
            raise ConfigError(f"ModelSpec.rope_local_theta must be >= 0, got {self.rope_local_theta}")
        if self.rope_scaling in ("yarn", "longrope") and self.rope_original_max_seq_len <= 0:
            raise ConfigError(f"{self.rope_scaling} RoPE scaling needs original_max_position_embeddings > 0")
        if self.rope_scaling == "yarn":
            if not (self.rope_beta_fast > 0 and self.rope_beta_slow > 0):  # logs of both are taken
                raise ConfigError(f"yarn RoPE scaling needs beta_fast and beta_slow > 0, "
                                  f"got {self.rope_beta_fast}, {self.rope_beta_slow}")
            if self.rope_theta == 1:  # the ramp divides by log(rope_theta)
                raise ConfigError("yarn RoPE scaling needs rope_theta != 1")
        lengths = {len(self.rope_short_factor), len(self.rope_long_factor)}
        if self.rope_scaling == "longrope":
            if lengths != {self.rope_dim // 2}:
                raise ConfigError(f"longrope short_factor and long_factor need {self.rope_dim // 2} entries "
                                  f"(rope_dim / 2) each, got {len(self.rope_short_factor)} and "
                                  f"{len(self.rope_long_factor)}")
            if min(self.rope_short_factor + self.rope_long_factor) <= 0:
                raise ConfigError("longrope short_factor and long_factor entries must be > 0")
        elif lengths != {0}:
            raise ConfigError(f"short_factor / long_factor belong to longrope scaling, not {self.rope_scaling!r}")

    def _check_experts(self) -> None:
        if not self.num_experts:
            if self.experts_per_token or self.dense_layers or self.expert_intermediate_size:
                raise ConfigError("experts_per_token, dense_layers and expert_intermediate_size need num_experts > 0")
            return
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(f"experts_per_token must be from 1 to num_experts={self.num_experts}, "
                              f"got {self.experts_per_token}")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"dense_layers has layer {bad[0]}, outside the model's {self.num_layers} layers")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(self.dense_layers))))

    # Derived figures, used by the model and the planner alike.
    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or self.head_dim**-0.5

    @property
    def embedding_multiplier(self) -> float:
        return math.sqrt(self.hidden_size) if self.embedding_scaled else 1.0

    def layer_window(self, layer: int) -> int:
        """Sliding window of `layer` in positions, 0 for full attention."""
        if self.layer_types and self.layer_types[layer] == "sliding":
            return self.sliding_window
        return 0

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.num_experts) and layer not in self.dense_layers

    def _ffn_params(self, width: int) -> int:
        mlp_in = 2 if self.mlp == "gated" else 1
        return self.hidden_size * width * (mlp_in + 1) + (width * mlp_in + self.hidden_size) * self.mlp_bias

    def mlp_params(self, *, moe: bool, active: bool = False) -> int:
        """Parameters of one layer's MLP: dense, or an MoE layer's router plus all its experts
        (memory) or, with `active`, the experts_per_token a token runs through (FLOPs)."""
        if not moe:
            return self._ffn_params(self.intermediate_size)
        experts = self.experts_per_token if active else self.num_experts
        return self.hidden_size * self.num_experts + experts * self._ffn_params(
            self.expert_intermediate_size or self.intermediate_size)

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once; every expert counted)."""
        h, hd, kv = self.hidden_size, self.head_dim, self.num_kv_heads
        norm_params = h * (2 if self.norm == "layernorm" else 1)
        attn = h * hd * (self.num_heads * 2 + kv * 2)
        attn += (self.num_heads + 2 * kv) * hd * self.qkv_bias + h * self.o_bias
        attn += (2 * hd if self.qk_norm_per_head else (self.num_heads + kv) * hd) * self.qk_norm
        moe_layers = self.num_layers - len(self.dense_layers) if self.num_experts else 0
        mlps = (moe_layers * self.mlp_params(moe=True)
                + (self.num_layers - moe_layers) * self.mlp_params(moe=False))
        norms = norm_params * (4 if self.norm_placement == "sandwich" else 2)
        embed = self.vocab_size * h
        embed += self.max_seq_len * h * (self.positions == "learned")
        embed += self.type_vocab_size * h + norm_params * self.embedding_norm
        head = 0 if (self.tie_embeddings or not self.causal) else self.vocab_size * h
        return self.num_layers * (attn + norms) + mlps + embed + head + norm_params * self.final_norm

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_types"] = list(self.layer_types)
        out["eos_token_id"] = list(self.eos_token_id)
        for name in ("rope_short_factor", "rope_long_factor", "dense_layers"):
            out[name] = list(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields})
        if unknown:
            raise ConfigError(f"unknown ModelSpec field {unknown[0]!r}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ConfigError(f"ModelSpec field {missing[0]!r} is missing")
        data = dict(data)
        for name in ("layer_types", "eos_token_id", "rope_short_factor", "rope_long_factor",
                     "dense_layers"):  # JSON lists; anything else fails the type check
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)

    # Hugging Face config.json in and out; the per-family adapters live in alloy.spec.hf.
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path) -> "ModelSpec":
        from alloy.spec.hf import spec_from_hf_config

        return spec_from_hf_config(read_config(config) if not isinstance(config, dict) else config)

    def to_hf_config(self) -> dict[str, Any]:
        from alloy.spec.hf import hf_config_from_spec

        return hf_config_from_spec(self)


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a config.json (or the one inside a directory) with a one-line error on failure."""
    path = Path(path)
    return read_json_object(path / "config.json" if path.is_dir() else path, "config file")
