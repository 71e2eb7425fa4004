"""Declarative maps between Hugging Face tensor names and Alloy's, one per checkpoint layout.

A `Rule` ties one or more HF tensors to one or more of Alloy's through a named, invertible
`Transform` (identity, Conv1D transpose, fused split, GPT-NeoX per-head interleave). Loading
runs `load`, saving runs `save`. Names use `{i}` for the layer index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from alloy.spec import ModelSpec

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Transform:
    name: str
    load: Callable[[Tensors, ModelSpec], Tensors]  # HF tensors -> Alloy tensors
    save: Callable[[Tensors, ModelSpec], Tensors]  # Alloy tensors -> HF tensors


IDENTITY = Transform("identity", lambda t, s: t, lambda t, s: t)
# GPT-2's Conv1D stores weights as [in, out]; nn.Linear wants [out, in].
TRANSPOSE = Transform("transpose", lambda t, s: [t[0].t()], lambda t, s: [t[0].t().contiguous()])


def _qkv_sizes(spec: ModelSpec) -> list[int]:
    return [spec.num_heads * spec.head_dim] + [spec.num_kv_heads * spec.head_dim] * 2


def _split(sizes: Callable[[ModelSpec], list[int]], name: str) -> Transform:
    """One fused tensor, concatenated along dim 0, <-> its parts (Phi-3 qkv_proj, gate_up_proj)."""
    return Transform(
        name,
        lambda t, s: list(torch.split(t[0], sizes(s), dim=0)),
        lambda t, s: [torch.cat(t, dim=0)],
    )


SPLIT_QKV = _split(_qkv_sizes, "split_qkv")
SPLIT_GATE_UP = _split(lambda s: [s.intermediate_size] * 2, "split_gate_up")
# GPT-2 c_attn: Conv1D ([in, 3*out]) and fused, so transpose then split.
CONV1D_SPLIT_QKV = Transform(
    "conv1d_split_qkv",
    lambda t, s: SPLIT_QKV.load([t[0].t()], s),
    lambda t, s: [torch.cat(t, dim=0).t().contiguous()],
)


def _neox_load(t: Tensors, s: ModelSpec) -> Tensors:
    # GPT-NeoX fuses q, k, v per head: rows are laid out [heads, (q|k|v), head_dim].
    fused = t[0].reshape(s.num_heads, 3, s.head_dim, *t[0].shape[1:])
    return [fused[:, j].reshape(s.num_heads * s.head_dim, *t[0].shape[1:]) for j in range(3)]


def _neox_save(t: Tensors, s: ModelSpec) -> Tensors:
    parts = [x.reshape(s.num_heads, 1, s.head_dim, *x.shape[1:]) for x in t]
    return [torch.cat(parts, dim=1).reshape(3 * s.num_heads * s.head_dim, *t[0].shape[1:])]


NEOX_QKV = Transform("neox_interleaved_qkv", _neox_load, _neox_save)


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    ours: tuple[str, ...]
    transform: Transform = IDENTITY


@dataclass(frozen=True)
class Layout:
    """How one family lays its tensors out in an HF checkpoint."""

    prefix: str  # the body's prefix when saving (e.g. "model."); head keys carry none
    load_prefixes: tuple[str, ...]  # body prefixes accepted when loading ("" always is)
    rules: Callable[[ModelSpec], list[Rule]]
    ignore: tuple[str, ...] = ()  # regexes of HF keys that carry nothing Alloy needs

    def expand(self, spec: ModelSpec) -> list[Rule]:
        """Rules with {i} replaced for every layer."""
        out = []
        for rule in self.rules(spec):
            if any("{i}" in name for name in rule.hf + rule.ours):
                for i in range(spec.num_layers):
                    out.append(Rule(tuple(n.format(i=i) for n in rule.hf),
                                    tuple(n.format(i=i) for n in rule.ours), rule.transform))
            else:
                out.append(rule)
        return out

    def ignored(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.ignore)


def _linear(hf: str, ours: str, bias: bool, transform: Transform = IDENTITY, bias_transform=IDENTITY):
    rules = [Rule((f"{hf}.weight",), tuple(f"{o}.weight" for o in ours.split("|")), transform)]
    if bias:
        rules.append(Rule((f"{hf}.bias",), tuple(f"{o}.bias" for o in ours.split("|")), bias_transform))
    return rules


def _norm(hf: str, ours: str, spec: ModelSpec, weight: str = "weight", bias: str = "bias"):
    rules = [Rule((f"{hf}.{weight}",), (f"{ours}.weight",))]
    if spec.norm == "layernorm":
        rules.append(Rule((f"{hf}.{bias}",), (f"{ours}.bias",)))
    return rules


def _head(spec: ModelSpec, hf_head: str) -> list[Rule]:
    return [] if spec.tie_embeddings else [Rule((hf_head,), ("head.weight",))]


def _llama_rules(spec: ModelSpec, moe_block: str = "mlp",
                 expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    L = "layers.{i}."
    rules = [Rule(("embed_tokens.weight",), ("embed.tok.weight",)), *_norm("norm", "norm", spec)]
    rules += _head(spec, "lm_head.weight")
    if spec.norm_placement == "output":  # OLMo 2: norms on the sublayers' outputs only
        rules += _norm(L + "post_attention_layernorm", L + "attn_norm", spec)
        rules += _norm(L + "post_feedforward_layernorm", L + "mlp_norm", spec)
    elif spec.norm_placement == "sandwich":  # Gemma 2 names its four norms this way
        rules += _norm(L + "input_layernorm", L + "attn_norm", spec)
        rules += _norm(L + "post_attention_layernorm", L + "attn_post_norm", spec)
        rules += _norm(L + "pre_feedforward_layernorm", L + "mlp_norm", spec)
        rules += _norm(L + "post_feedforward_layernorm", L + "mlp_post_norm", spec)
    else:
        rules += _norm(L + "input_layernorm", L + "attn_norm", spec)
        rules += _norm(L + "post_attention_layernorm", L + "mlp_norm", spec)
    for proj in "qkv":
        rules += _linear(f"{L}self_attn.{proj}_proj", f"{L}attn.w{proj}", spec.qkv_bias)
    rules += _linear(L + "self_attn.o_proj", L + "attn.wo", spec.o_bias)
    if spec.qk_norm:
        rules += [Rule((L + "self_attn.q_norm.weight",), (L + "attn.q_norm.weight",)),
                  Rule((L + "self_attn.k_norm.weight",), (L + "attn.k_norm.weight",))]
    return rules + _mlp_rules(spec, moe_block, "gate", expert)


def _mlp_rules(spec: ModelSpec, moe_block: str = "mlp", router: str = "gate",
               expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    """Dense MLPs, or per layer (MoE models mix both) the router and each expert's gate/up/down."""
    dense = [("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")]
    if not spec.num_experts:
        return [r for theirs, ours in dense for r in _linear(f"layers.{{i}}.mlp.{theirs}", f"layers.{{i}}.mlp.{ours}",
                                                             spec.mlp_bias)]
    rules = []
    for i in range(spec.num_layers):
        L = f"layers.{i}."
        if not spec.is_moe_layer(i):
            rules += [r for theirs, ours in dense for r in _linear(f"{L}mlp.{theirs}", f"{L}mlp.{ours}", spec.mlp_bias)]
            continue
        rules.append(Rule((f"{L}{moe_block}.{router}.weight",), (f"{L}mlp.router.weight",)))
        for e in range(spec.num_experts):
            for theirs, ours in zip(expert, ("gate", "up", "down")):
                rules += _linear(f"{L}{moe_block}.experts.{e}.{theirs}", f"{L}mlp.experts.{e}.{ours}", spec.mlp_bias)
    return rules


def _mixtral_rules(spec: ModelSpec) -> list[Rule]:
    return _llama_rules(spec, moe_block="block_sparse_moe", expert=("w1", "w3", "w2"))


def _phi3_rules(spec: ModelSpec) -> list[Rule]:
    L = "layers.{i}."
    fused = {L + f"self_attn.{p}_proj.weight" for p in "qkv"} | {L + f"mlp.{p}_proj.weight" for p in ("gate", "up")}
    rules = [r for r in _llama_rules(spec) if r.hf[0] not in fused]
    rules += _linear(L + "self_attn.qkv_proj", f"{L}attn.wq|{L}attn.wk|{L}attn.wv", False, SPLIT_QKV)
    rules += _linear(L + "mlp.gate_up_proj", f"{L}mlp.gate|{L}mlp.up", False, SPLIT_GATE_UP)
    return rules


def _gpt2_rules(spec: ModelSpec) -> list[Rule]:
    L, O = "h.{i}.", "layers.{i}."
    rules = [Rule(("wte.weight",), ("embed.tok.weight",)), Rule(("wpe.weight",), ("embed.pos.weight",))]
    rules += _norm("ln_f", "norm", spec) + _head(spec, "lm_head.weight")
    rules += _norm(L + "ln_1", O + "attn_norm", spec) + _norm(L + "ln_2", O + "mlp_norm", spec)
    rules += _linear(L + "attn.c_attn", f"{O}attn.wq|{O}attn.wk|{O}attn.wv", True, CONV1D_SPLIT_QKV, SPLIT_QKV)
    rules += _linear(L + "attn.c_proj", O + "attn.wo", True, TRANSPOSE)
    rules += _linear(L + "mlp.c_fc", O + "mlp.up", True, TRANSPOSE)
    rules += _linear(L + "mlp.c_proj", O + "mlp.down", True, TRANSPOSE)
    return rules


def _neox_rules(spec: ModelSpec) -> list[Rule]:
    L = "layers.{i}."
    rules = [Rule(("embed_in.weight",), ("embed.tok.weight",)), *_norm("final_layer_norm", "norm", spec)]
    rules += _head(spec, "embed_out.weight")
    rules += _norm(L + "input_layernorm", L + "attn_norm", spec)
    rules += _norm(L + "post_attention_layernorm", L + "mlp_norm", spec)
    rules += _linear(L + "attention.query_key_value", f"{L}attn.wq|{L}attn.wk|{L}attn.wv",
                     spec.qkv_bias, NEOX_QKV, NEOX_QKV)
    rules += _linear(L + "attention.dense", L + "attn.wo", spec.o_bias)
    rules += _linear(L + "mlp.dense_h_to_4h", L + "mlp.up", True)
    rules += _linear(L + "mlp.dense_4h_to_h", L + "mlp.down", True)
    return rules


def _bert_rules(spec: ModelSpec) -> list[Rule]:
    L, O = "encoder.layer.{i}.", "layers.{i}."
    rules = [
        Rule(("embeddings.word_embeddings.weight",), ("embed.tok.weight",)),
        Rule(("embeddings.position_embeddings.weight",), ("embed.pos.weight",)),
        Rule(("embeddings.token_type_embeddings.weight",), ("embed.types.weight",)),
        *_norm("embeddings.LayerNorm", "embed.norm", spec),
    ]
    for ours, theirs in (("wq", "query"), ("wk", "key"), ("wv", "value")):
        rules += _linear(f"{L}attention.self.{theirs}", f"{O}attn.{ours}", True)
    rules += _linear(L + "attention.output.dense", O + "attn.wo", True)
    rules += _norm(L + "attention.output.LayerNorm", O + "attn_norm", spec)
    rules += _linear(L + "intermediate.dense", O + "mlp.up", True)
    rules += _linear(L + "output.dense", O + "mlp.down", True)
    rules += _norm(L + "output.LayerNorm", O + "mlp_norm", spec)
    return rules


_ROTARY_BUFFERS = r"(.*\.)?rotary_emb\.inv_freq"
_LLAMA = Layout("model.", ("model.",), _llama_rules, ignore=(_ROTARY_BUFFERS,))

LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "qwen3_moe": _LLAMA,
    "olmoe": _LLAMA,
    "olmo2": _LLAMA,
    "mixtral": Layout("model.", ("model.",), _mixtral_rules, ignore=(_ROTARY_BUFFERS,)),
    "phi3": Layout("model.", ("model.",), _phi3_rules, ignore=(_ROTARY_BUFFERS,)),
    # Old GPT-2 checkpoints carry the causal-mask buffers attn.bias / attn.masked_bias.
    "gpt2": Layout("transformer.", ("transformer.",), _gpt2_rules,
                   ignore=(r"h\.\d+\.attn\.(masked_)?bias",)),
    "gpt_neox": Layout("gpt_neox.", ("gpt_neox.",), _neox_rules,
                       ignore=(_ROTARY_BUFFERS, r"layers\.\d+\.attention\.(masked_)?bias")),
    # Loaded as an encoder: the pooler and pretraining heads (cls.*) are not part of it.
    "bert": Layout("", ("bert.",), _bert_rules,
                   ignore=(r"pooler\..*", r"cls\..*", r"embeddings\.position_ids")),
}

# Head tensors are named without the body prefix; a tied head duplicates the embeddings.
HEAD_KEYS = ("lm_head.weight", "embed_out.weight")
