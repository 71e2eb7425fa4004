"""Hugging Face config.json <-> ModelSpec, one small adapter per family.

Adapters read both the transformers-5 form (`rope_parameters`, `layer_types`) and the older
form real checkpoints still ship (`rope_theta` + `rope_scaling`, `rotary_pct`, ...), and write
the transformers-5 form. A knob value Alloy does not implement is an error, never a guess.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from alloy.errors import ConfigError, UnsupportedModelError
from alloy.spec.spec import SIZE_LIMITS, ModelSpec

_MISSING = object()

# Hugging Face activation names -> ModelSpec.activation.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _get(cfg: dict[str, Any], *names: str, default: Any = _MISSING) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    if default is _MISSING:
        raise ConfigError(f"config.json of model_type {cfg.get('model_type')!r} lacks field {names[0]!r}")
    return default


def _activation(cfg: dict[str, Any], *names: str, default: str | None = None) -> str:
    name = _get(cfg, *names, default=default)
    if name not in _ACTIVATIONS:
        field = next((n for n in names if cfg.get(n) is not None), names[0])
        raise UnsupportedModelError(
            f"{field}={name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    return _ACTIVATIONS[name]


def _eos(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _per_head(cfg: dict[str, Any], hidden: str, heads: str) -> int:
    """hidden // heads: the head_dim a config leaves implicit (heads checked first, never divided by 0)."""
    count = cfg[heads]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"{heads} must be a positive integer, got {count!r}")
    return cfg[hidden] // count


def _rope(cfg: dict[str, Any], head_dim: int, default_partial: float = 1.0,
          params: dict[str, Any] | None = None, default_theta: float = 10000.0) -> dict[str, Any]:
    """RoPE knobs from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (older);
    `params` overrides where the family nests them (Gemma 3's per-layer-type tables)."""
    if params is None:
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", _get(cfg, "rope_theta", "rotary_emb_base", default=default_theta))
    partial = float(params.get(
        "partial_rotary_factor", _get(cfg, "partial_rotary_factor", "rotary_pct", default=default_partial)
    ))
    if not 0 < partial <= 1:  # 0 would read as rotary_dim 0, which means "all of head_dim"
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {partial}")
    out: dict[str, Any] = {"rope_theta": float(theta), "rotary_dim": 0}
    rotary_dim = int(head_dim * partial)
    if rotary_dim != head_dim:
        out["rotary_dim"] = rotary_dim
    if kind == "default":
        return out
    if kind == "linear":
        return out | {"rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if kind not in ("llama3", "yarn", "longrope"):
        raise UnsupportedModelError(
            f"rope_type={kind!r} is not supported; supported: default, linear, llama3, yarn, longrope"
        )
    # As transformers: a top-level original_max_position_embeddings (Phi-3) wins, then the
    # scaling's own, then the model's length.
    original = int(_get(cfg, "original_max_position_embeddings", default=None)
                   or params.get("original_max_position_embeddings") or _get(cfg, "max_position_embeddings"))
    out |= {"rope_scaling": kind, "rope_original_max_seq_len": original}
    if kind == "llama3":
        return out | {
            "rope_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
        }
    factor = params.get("factor")
    factor = float(factor if factor is not None else _get(cfg, "max_position_embeddings") / original)
    attention = params.get("attention_factor")
    if kind == "yarn":
        if attention is None:  # the paper's mscale, as transformers infers it
            def mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        return out | {
            "rope_factor": factor,
            "rope_attention_factor": float(attention),
            "rope_beta_fast": float(params.get("beta_fast") or 32),
            "rope_beta_slow": float(params.get("beta_slow") or 1),
            "rope_truncate": params.get("truncate", True),
        }
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return out | {
        "rope_factor": factor,
        "rope_attention_factor": float(attention),
        "rope_short_factor": tuple(float(x) for x in params["short_factor"]),
        "rope_long_factor": tuple(float(x) for x in params["long_factor"]),
    }


def _rope_to_hf(spec: ModelSpec) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": spec.rope_theta, "rope_type": "default"}
    if spec.rotary_dim:
        params["partial_rotary_factor"] = spec.rotary_dim / spec.head_dim
    if spec.rope_scaling == "linear":
        params |= {"rope_type": "linear", "factor": spec.rope_factor}
    elif spec.rope_scaling in ("llama3", "yarn", "longrope"):
        params |= {"rope_type": spec.rope_scaling, "factor": spec.rope_factor,
                   "original_max_position_embeddings": spec.rope_original_max_seq_len}
    if spec.rope_scaling == "llama3":
        params |= {"low_freq_factor": spec.rope_low_freq_factor, "high_freq_factor": spec.rope_high_freq_factor}
    elif spec.rope_scaling == "yarn":
        params |= {"attention_factor": spec.rope_attention_factor, "beta_fast": spec.rope_beta_fast,
                   "beta_slow": spec.rope_beta_slow}
        if not spec.rope_truncate:
            params["truncate"] = False
    elif spec.rope_scaling == "longrope":
        params |= {"attention_factor": spec.rope_attention_factor,
                   "short_factor": list(spec.rope_short_factor), "long_factor": list(spec.rope_long_factor)}
    return params


def _tokens_to_hf(spec: ModelSpec) -> dict[str, Any]:
    eos: Any = list(spec.eos_token_id) if len(spec.eos_token_id) > 1 else (
        spec.eos_token_id[0] if spec.eos_token_id else None
    )
    return {"bos_token_id": spec.bos_token_id, "eos_token_id": eos, "pad_token_id": spec.pad_token_id}


def _refuse(cfg: dict[str, Any], field: str, allowed: Any) -> None:
    """Reject a config knob whose value Alloy does not implement."""
    value = cfg.get(field, allowed)
    if value != allowed:
        raise UnsupportedModelError(
            f"{cfg.get('model_type')}: {field}={value!r} is not supported (only {allowed!r})"
        )


# ---- Llama-layout families: llama, mistral, qwen2, qwen3, gemma, gemma2, phi3 ---------------

def _sliding_layers(cfg: dict[str, Any], num_layers: int, window: int, default: Callable[[int], bool]):
    """layer_types from the config, or the family's default rule, as ("full"|"sliding", ...)."""
    if not window:
        return {"sliding_window": 0, "layer_types": ()}
    given = cfg.get("layer_types")
    if given is not None:
        types = tuple("sliding" if t == "sliding_attention" else "full" for t in given)
        unknown = set(given) - {"sliding_attention", "full_attention"}
        if unknown:
            raise UnsupportedModelError(f"layer_types value {sorted(unknown)[0]!r} is not supported")
    else:
        low, high = SIZE_LIMITS["num_layers"]  # bounded before the default rule runs once per layer
        if not isinstance(num_layers, int) or not low <= num_layers <= high:
            raise ConfigError(f"num_hidden_layers must be an integer from {low} to {high:,}, got {num_layers!r}")
        types = tuple("sliding" if default(i) else "full" for i in range(num_layers))
    return {"sliding_window": int(window), "layer_types": types}


def _llama_like(cfg: dict[str, Any], default_head_dim: int = 0, rope_params: dict[str, Any] | None = None,
                default_theta: float = 10000.0, **knobs: Any) -> ModelSpec:
    if "num_experts" not in knobs:  # a dense family's config that names experts is not what it says
        _refuse(cfg, "num_local_experts", None)
        _refuse(cfg, "num_experts", None)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    implied_head_dim = default_head_dim or _per_head(cfg, "hidden_size", "num_attention_heads")
    head_dim = _get(cfg, "head_dim", default=implied_head_dim)
    fields: dict[str, Any] = dict(
        family=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        intermediate_size=cfg["intermediate_size"],
        max_seq_len=_get(cfg, "max_position_embeddings", default=2048),
        norm_eps=_get(cfg, "rms_norm_eps", default=1e-6),
        activation=_activation(cfg, "hidden_activation", "hidden_act", default="silu"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=_eos(cfg),
        pad_token_id=cfg.get("pad_token_id"),
    )
    fields.update(_rope(cfg, head_dim, params=rope_params, default_theta=default_theta))
    fields.update(knobs)
    return ModelSpec(**fields)


def _llama_like_to_hf(spec: ModelSpec, architecture: str) -> dict[str, Any]:
    cfg = {
        "architectures": [architecture],
        "model_type": spec.family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_seq_len,
        "rms_norm_eps": spec.norm_eps,
        "hidden_act": _HF_ACTIVATION[spec.activation],
        "tie_word_embeddings": spec.tie_embeddings,
        "rope_parameters": _rope_to_hf(spec),
    }
    if spec.sliding_window:
        cfg["sliding_window"] = spec.sliding_window
        cfg["layer_types"] = [f"{t}_attention" for t in spec.layer_types]
    return cfg | _tokens_to_hf(spec)


def _llama_from(cfg):
    bias = bool(cfg.get("attention_bias", False))
    return _llama_like(cfg, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))


def _llama_to(spec):
    return _llama_like_to_hf(spec, "LlamaForCausalLM") | {
        "attention_bias": spec.qkv_bias, "mlp_bias": spec.mlp_bias,
    }


def _mistral_from(cfg):
    window = cfg.get("sliding_window") or 0
    return _llama_like(cfg, **_sliding_layers(cfg, cfg["num_hidden_layers"], window, lambda i: True))


def _mistral_to(spec):
    cfg = _llama_like_to_hf(spec, "MistralForCausalLM")
    cfg.pop("layer_types", None)  # Mistral slides on every layer; transformers warns on layer_types
    cfg.setdefault("sliding_window", None)
    return cfg


def _qwen_window(cfg: dict[str, Any]) -> dict[str, Any]:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else 0
    first_sliding = cfg.get("max_window_layers", cfg["num_hidden_layers"])
    return _sliding_layers(cfg, cfg["num_hidden_layers"], window or 0, lambda i: i >= first_sliding)


def _qwen_to(spec: ModelSpec, architecture: str) -> dict[str, Any]:
    cfg = _llama_like_to_hf(spec, architecture)
    cfg["use_sliding_window"] = bool(spec.sliding_window)
    if not spec.sliding_window:
        cfg["sliding_window"] = None
        cfg["layer_types"] = ["full_attention"] * spec.num_layers
    return cfg


def _qwen2_from(cfg):
    return _llama_like(cfg, qkv_bias=True, **_qwen_window(cfg))


def _qwen3_from(cfg):
    bias = bool(cfg.get("attention_bias", False))
    return _llama_like(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True, default_head_dim=128, **_qwen_window(cfg))


def _qwen3_to(spec):
    return _qwen_to(spec, "Qwen3ForCausalLM") | {"attention_bias": spec.qkv_bias}


def _gemma_knobs(cfg: dict[str, Any]) -> dict[str, Any]:
    # Gemma's released configs say hidden_act="gelu" but mean the tanh approximation.
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    return dict(
        norm_offset=1.0,
        embedding_scaled=True,
        activation=_ACTIVATIONS["gelu_pytorch_tanh" if act == "gelu" else act],
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        default_head_dim=256,
    )


def _gemma_from(cfg):
    bias = bool(cfg.get("attention_bias", False))
    return _llama_like(cfg, qkv_bias=bias, o_bias=bias, **_gemma_knobs(cfg))


def _gemma_to(spec, architecture="GemmaForCausalLM"):
    cfg = _llama_like_to_hf(spec, architecture)
    cfg["hidden_activation"] = cfg.pop("hidden_act")
    return cfg | {"attention_bias": spec.qkv_bias}


def _gemma2_knobs(cfg: dict[str, Any], default_sliding: Callable[[int], bool]) -> dict[str, Any]:
    bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window") or 0
    scalar = float(_get(cfg, "query_pre_attn_scalar", default=256))
    # the softmax scale is its inverse square root; past 1e30 (real ones are a head's width) the
    # scale's inverse square, written back, overflows a float
    if not 0 < scalar <= 1e30:
        raise ConfigError(f"query_pre_attn_scalar must be > 0 and at most 1e30, got {scalar}")
    return dict(
        qkv_bias=bias,
        o_bias=bias,
        norm_placement="sandwich",
        attn_scale=scalar**-0.5,
        attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
        **_gemma_knobs(cfg),
        **_sliding_layers(cfg, cfg["num_hidden_layers"], window, default_sliding),
    )


def _gemma2_from(cfg):
    return _llama_like(cfg, **_gemma2_knobs(cfg, lambda i: i % 2 == 0))


def _gemma3_from(cfg):
    """Gemma 3 text: Gemma 2's layout plus QK-norm, and sliding layers on their own RoPE base."""
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError("gemma3_text: use_bidirectional_attention=True is not supported")
    pattern = cfg.get("sliding_window_pattern") or 6  # configs from before layer_types
    if not isinstance(pattern, int) or pattern < 1:
        raise ConfigError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
    nested = cfg.get("rope_parameters") or {}
    if "full_attention" in nested or "sliding_attention" in nested:
        full = dict(nested.get("full_attention") or {})
        local = dict(nested.get("sliding_attention") or {})
    else:  # the older form: rope_theta + rope_scaling for full layers, rope_local_base_freq
        full, local = dict(nested or cfg.get("rope_scaling") or {}), {}
    local.setdefault("rope_theta", _get(cfg, "rope_local_base_freq", default=10000.0))
    if local.get("rope_type", local.get("type", "default")) != "default" and local != full:
        raise UnsupportedModelError("gemma3_text: sliding layers with scaled RoPE are not supported")
    knobs = _gemma2_knobs(cfg, lambda i: (i + 1) % pattern != 0)
    local_theta = 0.0 if local == full else float(local["rope_theta"])  # 0: the full layers' table
    return _llama_like(cfg, rope_params=full, default_theta=1_000_000.0, qk_norm=True,
                       rope_local_theta=local_theta, **knobs)


def _gemma3_to(spec):
    cfg = _gemma2_to(spec) | {"architectures": ["Gemma3ForCausalLM"]}
    full = cfg["rope_parameters"]
    local = {"rope_type": "default", "rope_theta": spec.rope_local_theta} if spec.rope_local_theta else full
    cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    cfg["layer_types"] = [f"{t}_attention" for t in spec.layer_types] or ["full_attention"] * spec.num_layers
    return cfg


def _gemma2_to(spec):
    return _gemma_to(spec, "Gemma2ForCausalLM") | {
        "query_pre_attn_scalar": _scalar_for_scale(spec.softmax_scale),
        "attn_logit_softcapping": spec.attn_softcap or None,
        "final_logit_softcapping": spec.final_softcap or None,
        "sliding_window": spec.sliding_window or None,
        "layer_types": [f"{t}_attention" for t in spec.layer_types] or None,
    }


def _scalar_for_scale(scale: float) -> float | int:
    """The query_pre_attn_scalar whose inverse square root is exactly `scale` (read back, the
    spec is the same): the whole number when one serves (256, not 255.99999999999997), else
    scale**-2 or a neighbouring float."""
    x = scale**-2
    for candidate in (round(x), x, math.nextafter(x, math.inf), math.nextafter(x, 0.0)):
        if candidate > 0 and candidate**-0.5 == scale:
            return candidate
    return x


def _phi3_from(cfg):
    window = cfg.get("sliding_window") or 0
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if params.get("rope_type", params.get("type")) in ("su", "yarn"):  # Phi-3's older names, as transformers
        params["rope_type"] = "longrope"
    # Phi3Config always has a top-level original length (4096 by default), which wins
    cfg = cfg | {"original_max_position_embeddings": cfg.get("original_max_position_embeddings") or 4096}
    return _llama_like(cfg, rope_params=params,
                       **_sliding_layers(cfg, cfg["num_hidden_layers"], window, lambda i: True))


def _phi3_to(spec):
    cfg = _llama_like_to_hf(spec, "Phi3ForCausalLM")
    if spec.head_dim == spec.hidden_size // spec.num_heads:
        cfg.pop("head_dim")  # Phi-3 derives it from hidden_size / heads
    cfg.pop("layer_types", None)
    cfg["rope_parameters"].setdefault("partial_rotary_factor", 1.0)
    cfg.setdefault("sliding_window", None)
    if spec.rope_original_max_seq_len:
        cfg["original_max_position_embeddings"] = spec.rope_original_max_seq_len
    return cfg


# ---- Mixture of experts: mixtral, qwen3_moe, olmoe --------------------------------------------

_EXPERT_COUNT = ("num_experts", "num_local_experts")  # transformers 5 writes the second for Qwen3-MoE


def _experts(cfg: dict[str, Any], count_fields: tuple[str, ...], default_count: int, default_top_k: int,
             renormalize: bool, dense: Callable[[int], bool] = lambda i: False,
             expert_width: int | None = None):
    count = _get(cfg, *count_fields, default=default_count)
    if not count:
        return {}
    if expert_width is not None and not (isinstance(expert_width, int) and expert_width >= 1):
        # the spec's 0 means "intermediate_size"; in a config it would be experts of no width
        raise ConfigError(f"moe_intermediate_size must be a positive integer, got {expert_width!r}")
    low, high = SIZE_LIMITS["num_layers"]  # bounded before the dense rule runs once per layer
    layers = cfg["num_hidden_layers"]
    if not isinstance(layers, int) or not low <= layers <= high:
        raise ConfigError(f"num_hidden_layers must be an integer from {low} to {high:,}, got {layers!r}")
    return dict(num_experts=count, experts_per_token=_get(cfg, "num_experts_per_tok", default=default_top_k),
                router_renormalize=bool(renormalize), expert_intermediate_size=expert_width or 0,
                dense_layers=tuple(i for i in range(layers) if dense(i)))


def _mixtral_from(cfg):
    window = cfg.get("sliding_window") or 0
    return _llama_like(cfg, default_theta=1_000_000.0,
                       **_experts(cfg, ("num_local_experts",), 8, 2, renormalize=True),
                       **_sliding_layers(cfg, cfg["num_hidden_layers"], window, lambda i: True))


def _moe_to_hf(spec: ModelSpec, count_field: str) -> dict[str, Any]:
    return {count_field: spec.num_experts, "num_experts_per_tok": spec.experts_per_token or None}


def _mixtral_to(spec):
    return _mistral_to(spec) | {"architectures": ["MixtralForCausalLM"]} | _moe_to_hf(spec, "num_local_experts")


def _qwen3_moe_from(cfg):
    bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else 0
    step = _get(cfg, "decoder_sparse_step", default=1)
    only_mlp = set(_get(cfg, "mlp_only_layers", default=[]))
    return _llama_like(
        cfg, qkv_bias=bias, o_bias=bias, qk_norm=True, default_head_dim=128,
        **_experts(cfg, _EXPERT_COUNT, 128, 8, renormalize=cfg.get("norm_topk_prob", False),
                   dense=lambda i: i in only_mlp or (i + 1) % step != 0,
                   expert_width=_get(cfg, "moe_intermediate_size", default=768)),
        **_sliding_layers(cfg, cfg["num_hidden_layers"], window or 0, lambda i: True),
    )


def _qwen3_moe_to(spec):
    cfg = _mistral_to(spec) | {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": spec.qkv_bias}
    cfg["use_sliding_window"] = bool(spec.sliding_window)
    return cfg | _moe_to_hf(spec, "num_experts") | {
        "norm_topk_prob": spec.router_renormalize, "decoder_sparse_step": 1,
        "mlp_only_layers": list(spec.dense_layers),
        "moe_intermediate_size": spec.expert_intermediate_size or spec.intermediate_size,
    }


def _olmoe_from(cfg):
    if cfg.get("clip_qkv") is not None:
        raise UnsupportedModelError(f"olmoe: clip_qkv={cfg['clip_qkv']!r} is not supported (only None)")
    bias = bool(cfg.get("attention_bias", False))
    if cfg.get("head_dim") not in (None, _per_head(cfg, "hidden_size", "num_attention_heads")):
        raise UnsupportedModelError("olmoe: head_dim must be hidden_size / num_attention_heads (its q_norm "
                                    "spans hidden_size)")
    return _llama_like(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True, qk_norm_per_head=False,
                       **_experts(cfg, _EXPERT_COUNT, 64, 8, renormalize=cfg.get("norm_topk_prob", False)))


def _olmo2_from(cfg):
    bias = bool(cfg.get("attention_bias", False))
    return _llama_like(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True, qk_norm_per_head=False,
                       norm_placement="output")


def _olmo2_to(spec):
    return _llama_like_to_hf(spec, "Olmo2ForCausalLM") | {"attention_bias": spec.qkv_bias}


def _olmoe_to(spec):
    cfg = _llama_like_to_hf(spec, "OlmoeForCausalLM")
    cfg.pop("head_dim")  # OLMoE derives it from hidden_size / heads
    return cfg | _moe_to_hf(spec, "num_experts") | {
        "attention_bias": spec.qkv_bias, "norm_topk_prob": spec.router_renormalize, "clip_qkv": None,
    }


# ---- GPT-2 ---------------------------------------------------------------------------------

def _gpt2_from(cfg):
    for field in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        _refuse(cfg, field, False)
    hidden, heads = cfg["n_embd"], cfg["n_head"]
    return ModelSpec(
        family="gpt2",
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=_per_head(cfg, "n_embd", "n_head"),
        intermediate_size=cfg.get("n_inner") or 4 * hidden,
        max_seq_len=cfg["n_positions"],
        norm="layernorm",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        positions="learned",
        attn_scale=0.0 if cfg.get("scale_attn_weights", True) else 1.0,
        qkv_bias=True,
        o_bias=True,
        mlp="plain",
        activation=_activation(cfg, "activation_function", default="gelu_new"),
        mlp_bias=True,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=_eos(cfg),
        pad_token_id=cfg.get("pad_token_id"),
    )


def _gpt2_to(spec):
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": spec.vocab_size,
        "n_embd": spec.hidden_size,
        "n_layer": spec.num_layers,
        "n_head": spec.num_heads,
        "n_inner": spec.intermediate_size,
        "n_positions": spec.max_seq_len,
        "layer_norm_epsilon": spec.norm_eps,
        "activation_function": "gelu_new" if spec.activation == "gelu_tanh" else spec.activation,
        "scale_attn_weights": spec.attn_scale != 1.0,
        "tie_word_embeddings": spec.tie_embeddings,
    } | _tokens_to_hf(spec)


# ---- GPT-NeoX / Pythia -----------------------------------------------------------------------

def _neox_from(cfg):
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = _per_head(cfg, "hidden_size", "num_attention_heads")
    bias = bool(cfg.get("attention_bias", True))
    return ModelSpec(
        family="gpt_neox",
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm="layernorm",
        norm_eps=cfg.get("layer_norm_eps", 1e-5),
        parallel_residual=bool(cfg.get("use_parallel_residual", True)),
        qkv_bias=bias,
        o_bias=bias,
        mlp="plain",
        activation=_activation(cfg, "hidden_act", default="gelu"),
        mlp_bias=True,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=_eos(cfg),
        pad_token_id=cfg.get("pad_token_id"),
        **_rope(cfg, head_dim, default_partial=0.25),
    )


def _neox_to(spec):
    rope = _rope_to_hf(spec)
    rope.setdefault("partial_rotary_factor", 1.0)
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_seq_len,
        "layer_norm_eps": spec.norm_eps,
        "use_parallel_residual": spec.parallel_residual,
        "attention_bias": spec.qkv_bias,
        "hidden_act": _HF_ACTIVATION[spec.activation],
        "tie_word_embeddings": spec.tie_embeddings,
        "rope_parameters": rope,
    } | _tokens_to_hf(spec)


# ---- BERT (encoder) --------------------------------------------------------------------------

def _bert_from(cfg):
    _refuse(cfg, "position_embedding_type", "absolute")
    _refuse(cfg, "is_decoder", False)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return ModelSpec(
        family="bert",
        causal=False,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=_per_head(cfg, "hidden_size", "num_attention_heads"),
        intermediate_size=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 512),
        norm="layernorm",
        norm_eps=cfg.get("layer_norm_eps", 1e-12),
        norm_placement="post",
        final_norm=False,
        embedding_norm=True,
        positions="learned",
        type_vocab_size=cfg.get("type_vocab_size", 2),
        qkv_bias=True,
        o_bias=True,
        mlp="plain",
        activation=_activation(cfg, "hidden_act", default="gelu"),
        mlp_bias=True,
        pad_token_id=cfg.get("pad_token_id"),
    )


def _bert_to(spec):
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_seq_len,
        "layer_norm_eps": spec.norm_eps,
        "type_vocab_size": spec.type_vocab_size,
        "hidden_act": _HF_ACTIVATION[spec.activation],
        "position_embedding_type": "absolute",
        "pad_token_id": spec.pad_token_id,
    }


ADAPTERS: dict[str, tuple[Callable[[dict], ModelSpec], Callable[[ModelSpec], dict]]] = {
    "llama": (_llama_from, _llama_to),
    "mistral": (_mistral_from, _mistral_to),
    "qwen2": (_qwen2_from, lambda s: _qwen_to(s, "Qwen2ForCausalLM")),
    "qwen3": (_qwen3_from, _qwen3_to),
    "gemma": (_gemma_from, _gemma_to),
    "gemma2": (_gemma2_from, _gemma2_to),
    "gemma3_text": (_gemma3_from, _gemma3_to),
    "phi3": (_phi3_from, _phi3_to),
    "mixtral": (_mixtral_from, _mixtral_to),
    "qwen3_moe": (_qwen3_moe_from, _qwen3_moe_to),
    "olmoe": (_olmoe_from, _olmoe_to),
    "olmo2": (_olmo2_from, _olmo2_to),
    "gpt2": (_gpt2_from, _gpt2_to),
    "gpt_neox": (_neox_from, _neox_to),
    "bert": (_bert_from, _bert_to),
}


def _adapter(model_type: Any) -> tuple[Callable, Callable]:
    if not isinstance(model_type, str) or model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def spec_from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    from_hf, _ = _adapter(cfg.get("model_type"))
    try:
        return from_hf(cfg)
    except KeyError as err:
        raise ConfigError(f"config.json of model_type {cfg['model_type']!r} lacks field {err.args[0]!r}") from None
    except (TypeError, ValueError, ArithmeticError) as err:  # a field of the wrong JSON type or value
        raise ConfigError(f"config.json of model_type {cfg['model_type']!r}: {err}") from None


def hf_config_from_spec(spec: ModelSpec) -> dict[str, Any]:
    _, to_hf = _adapter(spec.family)
    return to_hf(spec)
