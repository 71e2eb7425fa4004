"""Hugging Face config.json <-> ModelSpec, one small adapter per family.

Adapters read both the transformers-5 form (`rope_parameters`, `layer_types`) and the older
form real checkpoints still ship (`rope_theta` + `rope_scaling`, `rotary_pct`, ...), and write
the transformers-5 form. A knob value Alloy does not implement is an error, never a guess.
"""

from __future__ import annotations

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


def _rope(cfg: dict[str, Any], head_dim: int, default_partial: float = 1.0) -> dict[str, Any]:
    """RoPE knobs from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (older)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", _get(cfg, "rope_theta", "rotary_emb_base", default=10000.0))
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
    if kind == "llama3":
        return out | {
            "rope_scaling": "llama3",
            "rope_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_seq_len": int(params["original_max_position_embeddings"]),
        }
    raise UnsupportedModelError(
        f"rope_type={kind!r} is not supported; supported: default, linear, llama3"
    )


def _rope_to_hf(spec: ModelSpec) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": spec.rope_theta, "rope_type": "default"}
    if spec.rotary_dim:
        params["partial_rotary_factor"] = spec.rotary_dim / spec.head_dim
    if spec.rope_scaling == "linear":
        params |= {"rope_type": "linear", "factor": spec.rope_factor}
    elif spec.rope_scaling == "llama3":
        params |= {
            "rope_type": "llama3",
            "factor": spec.rope_factor,
            "low_freq_factor": spec.rope_low_freq_factor,
            "high_freq_factor": spec.rope_high_freq_factor,
            "original_max_position_embeddings": spec.rope_original_max_seq_len,
        }
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


def _llama_like(cfg: dict[str, Any], default_head_dim: int = 0, **knobs: Any) -> ModelSpec:
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
        **_rope(cfg, head_dim),
    )
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


def _gemma2_from(cfg):
    bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window") or 0
    scalar = float(_get(cfg, "query_pre_attn_scalar", default=256))
    if not scalar > 0:  # the softmax scale is its inverse square root
        raise ConfigError(f"query_pre_attn_scalar must be > 0, got {scalar}")
    return _llama_like(
        cfg,
        qkv_bias=bias,
        o_bias=bias,
        norm_placement="sandwich",
        attn_scale=scalar**-0.5,
        attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
        **_gemma_knobs(cfg),
        **_sliding_layers(cfg, cfg["num_hidden_layers"], window, lambda i: i % 2 == 0),
    )


def _gemma2_to(spec):
    return _gemma_to(spec, "Gemma2ForCausalLM") | {
        "query_pre_attn_scalar": _int_if_whole(spec.softmax_scale**-2),
        "attn_logit_softcapping": spec.attn_softcap or None,
        "final_logit_softcapping": spec.final_softcap or None,
        "sliding_window": spec.sliding_window or None,
        "layer_types": [f"{t}_attention" for t in spec.layer_types] or None,
    }


def _int_if_whole(x: float) -> float | int:
    x = round(x, 6)
    return int(x) if x == int(x) else x


def _phi3_from(cfg):
    window = cfg.get("sliding_window") or 0
    return _llama_like(cfg, **_sliding_layers(cfg, cfg["num_hidden_layers"], window, lambda i: True))


def _phi3_to(spec):
    cfg = _llama_like_to_hf(spec, "Phi3ForCausalLM")
    cfg.pop("head_dim")  # Phi-3 derives it from hidden_size / heads
    cfg.pop("layer_types", None)
    cfg["rope_parameters"].setdefault("partial_rotary_factor", 1.0)
    cfg.setdefault("sliding_window", None)
    return cfg


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
    "phi3": (_phi3_from, _phi3_to),
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
