"""Alloy parameters <-> GGUF tensors (llama.cpp's names and layouts): the one table the GGUF
exporter (fuse/gguf.py) writes from and the reader (gguf_in.py) reads with.

Both directions go through `gguf_rules(spec, arch)`: each `Rule` ties GGUF tensors to Alloy
parameters through a `Transform` whose `load` is the reader's and whose `save` is the exporter's.
Names come from the `gguf` package (MODEL_TENSOR / TENSOR_NAMES). Layouts, as llama.cpp's
convert_hf_to_gguf.py writes them and its model code (src/models/*.cpp) reads them:
- "llama" (Llama, Mistral, Mixtral) rotates adjacent pairs (GPT-J style) while HF rotates the two
  halves of each head, so the rows of q (per query head) and k (per key/value head), weights and
  biases, are permuted:  w.reshape(heads, 2, head_dim // 2, in).swapaxes(1, 2).reshape(w.shape);
  `unpermute` undoes it. The other architectures rotate halves, as HF does (NEOX).
- Gemma architectures store every norm scale as 1 + w (Gemma 3's QK-norm too).
- Phi-3 keeps q|k|v fused as attn_qkv and gate|up as ffn_up; GPT-NeoX keeps q|k|v fused as
  attn_qkv too, rows [q; k; v] (its converter un-interleaves HF's per-head query_key_value).
- Mixture of experts: per layer a router `ffn_gate_inp` [experts, hidden] and the experts stacked,
  `ffn_gate_exps` / `ffn_up_exps` [experts, ff, hidden] and `ffn_down_exps` [experts, hidden, ff]
  (torch order; GGUF lists dims the other way round); Alloy's are `mlp.router` and per-expert MLPs
  `mlp.experts.{e}`, so one layer's stacked tensors fill that layer's experts and no other.
- GPT-2's Conv1D weights are stored transposed, as [out, in], with q|k|v fused.
- A head tied to the embeddings is no `output` tensor: llama.cpp reuses `token_embd`.
"""

from __future__ import annotations

import torch

from alloy.checkpoint.keymap import IDENTITY, SPLIT_GATE_UP, SPLIT_QKV, Rule, Transform
from alloy.spec import ModelSpec

# Architectures whose q/k rows are interleaved for GPT-J-style RoPE
PERMUTED_ARCHITECTURES = ("llama",)
# Architectures that keep q|k|v as one attn_qkv tensor, and gate|up as one ffn_up tensor
FUSED_QKV = ("phi3", "gptneox")
FUSED_GATE_UP = ("phi3",)
# GGUF tensors that are RoPE scaling, not parameters -> the architecture that reads them
ROPE_FACTOR_TENSORS = {"rope_freqs.weight": "llama", "rope_factors_long.weight": "phi3",
                       "rope_factors_short.weight": "phi3"}


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF (rotate-half) rows -> llama.cpp (interleaved pairs) rows, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(heads_of) -> Transform:
    return Transform("unpermute_rope_rows", lambda t, s: [unpermute(t[0], heads_of(s))],
                     lambda t, s: [permute(t[0], heads_of(s))])


UNPERMUTE_Q = _unpermute(lambda s: s.num_heads)
UNPERMUTE_K = _unpermute(lambda s: s.num_kv_heads)
# Gemma: the file holds the scale itself, 1 + w (in fp32, as the converter computes it)
NORM_PLUS_ONE = Transform("gemma_norm_plus_one", lambda t, s: [t[0] - 1], lambda t, s: [t[0].float() + 1])


def _unstack(t: list[torch.Tensor], s: ModelSpec) -> list[torch.Tensor]:
    if t[0].ndim < 1 or t[0].shape[0] != s.num_experts:  # fill turns this into a one-line CheckpointError
        raise RuntimeError(f"{t[0].shape[0] if t[0].ndim else 0} experts stacked, not {s.num_experts}")
    return list(t[0].unbind(0))


# One layer's experts stacked along a new first dim <-> each expert's own tensor
UNSTACK_EXPERTS = Transform("unstack_experts", _unstack, lambda t, s: [torch.stack(t, dim=0)])


def _name(tensor, layer: int | None = None, part: str = "weight") -> str:
    import gguf

    return gguf.TENSOR_NAMES[tensor].format(bid=layer) + "." + part


def tensor_names(spec: ModelSpec) -> dict[str, str]:
    """Alloy parameter name -> GGUF tensor name for the dense llama layout (no biases, no
    QK-norm, no experts): what a plain Llama file holds."""
    import gguf

    T = gguf.MODEL_TENSOR
    out = {"embed.tok.weight": _name(T.TOKEN_EMBD)}
    per_layer = [("attn_norm", T.ATTN_NORM), ("attn.wq", T.ATTN_Q), ("attn.wk", T.ATTN_K), ("attn.wv", T.ATTN_V),
                 ("attn.wo", T.ATTN_OUT), ("mlp_norm", T.FFN_NORM), ("mlp.gate", T.FFN_GATE),
                 ("mlp.up", T.FFN_UP), ("mlp.down", T.FFN_DOWN)]
    for i in range(spec.num_layers):
        for ours, theirs in per_layer:
            out[f"layers.{i}.{ours}.weight"] = _name(theirs, i)
    out["norm.weight"] = _name(T.OUTPUT_NORM)
    if not spec.tie_embeddings:
        out["head.weight"] = _name(T.OUTPUT)
    return out


def gguf_rules(spec: ModelSpec, arch: str) -> list[Rule]:
    """Alloy parameters <-> GGUF tensors of llama.cpp's architecture `arch`, for the whole model
    (every layer). The optional tensors (biases, QK-norm, sandwich norms) follow the spec's knobs."""
    import gguf

    T = gguf.MODEL_TENSOR
    if arch == "gpt2":
        return _gpt2_rules(spec)
    parts = ("weight", "bias") if spec.norm == "layernorm" else ("weight",)

    def norm(tensor, ours: str, layer: int | None = None) -> list[Rule]:
        scale = NORM_PLUS_ONE if spec.norm_offset else IDENTITY  # every Gemma scale, its QK-norm and final one too
        return [Rule((_name(tensor, layer, p),), (f"{ours}.{p}",), scale if p == "weight" else IDENTITY)
                for p in parts]

    rules = [Rule((_name(T.TOKEN_EMBD),), ("embed.tok.weight",)), *norm(T.OUTPUT_NORM, "norm")]
    if not spec.tie_embeddings:
        rules.append(Rule((_name(T.OUTPUT),), ("head.weight",)))
    for i in range(spec.num_layers):
        L = f"layers.{i}."
        rules += norm(T.ATTN_NORM, L + "attn_norm", i) + norm(T.FFN_NORM, L + "mlp_norm", i)
        if spec.norm_placement == "sandwich":
            rules += norm(T.ATTN_POST_NORM, L + "attn_post_norm", i) + norm(T.FFN_POST_NORM, L + "mlp_post_norm", i)
        rules += _attention_rules(spec, arch, i)
        rules += _mlp_rules(spec, arch, i)
    return rules


def _attention_rules(spec: ModelSpec, arch: str, i: int) -> list[Rule]:
    import gguf

    T, L = gguf.MODEL_TENSOR, f"layers.{i}."
    rules = []
    for part in ("weight", "bias") if spec.qkv_bias else ("weight",):
        if arch in FUSED_QKV:
            rules.append(Rule((_name(T.ATTN_QKV, i, part),), tuple(f"{L}attn.w{x}.{part}" for x in "qkv"), SPLIT_QKV))
            continue
        for x, tensor in (("q", T.ATTN_Q), ("k", T.ATTN_K), ("v", T.ATTN_V)):
            transform = IDENTITY
            if arch in PERMUTED_ARCHITECTURES and x != "v":  # weights and biases alike
                transform = UNPERMUTE_Q if x == "q" else UNPERMUTE_K
            rules.append(Rule((_name(tensor, i, part),), (f"{L}attn.w{x}.{part}",), transform))
    for part in ("weight", "bias") if spec.o_bias else ("weight",):
        rules.append(Rule((_name(T.ATTN_OUT, i, part),), (f"{L}attn.wo.{part}",)))
    if spec.qk_norm:
        scale = NORM_PLUS_ONE if spec.norm_offset else IDENTITY
        rules += [Rule((_name(T.ATTN_Q_NORM, i),), (L + "attn.q_norm.weight",), scale),
                  Rule((_name(T.ATTN_K_NORM, i),), (L + "attn.k_norm.weight",), scale)]
    return rules


def _mlp_rules(spec: ModelSpec, arch: str, i: int) -> list[Rule]:
    import gguf

    T, L = gguf.MODEL_TENSOR, f"layers.{i}."
    parts = ("weight", "bias") if spec.mlp_bias else ("weight",)
    if spec.is_moe_layer(i):
        rules = [Rule((_name(T.FFN_GATE_INP, i),), (L + "mlp.router.weight",))]
        for tensor, ours in ((T.FFN_GATE_EXP, "gate"), (T.FFN_UP_EXP, "up"), (T.FFN_DOWN_EXP, "down")):
            for p in parts:
                experts = tuple(f"{L}mlp.experts.{e}.{ours}.{p}" for e in range(spec.num_experts))
                rules.append(Rule((_name(tensor, i, p),), experts, UNSTACK_EXPERTS))
        return rules
    if arch in FUSED_GATE_UP:
        fused = [Rule((_name(T.FFN_UP, i, p),), (f"{L}mlp.gate.{p}", f"{L}mlp.up.{p}"), SPLIT_GATE_UP) for p in parts]
        return fused + [Rule((_name(T.FFN_DOWN, i, p),), (f"{L}mlp.down.{p}",)) for p in parts]
    modules = [(T.FFN_GATE, "gate")] if spec.mlp == "gated" else []
    modules += [(T.FFN_UP, "up"), (T.FFN_DOWN, "down")]
    return [Rule((_name(tensor, i, p),), (f"{L}mlp.{ours}.{p}",)) for tensor, ours in modules for p in parts]


def _gpt2_rules(spec: ModelSpec) -> list[Rule]:
    import gguf

    T = gguf.MODEL_TENSOR
    rules = [Rule((_name(T.TOKEN_EMBD),), ("embed.tok.weight",)), Rule((_name(T.POS_EMBD),), ("embed.pos.weight",))]
    rules += [Rule((_name(T.OUTPUT_NORM, part=p),), (f"norm.{p}",)) for p in ("weight", "bias")]
    if not spec.tie_embeddings:
        rules.append(Rule((_name(T.OUTPUT),), ("head.weight",)))
    for i in range(spec.num_layers):
        L = f"layers.{i}."
        for p in ("weight", "bias"):
            rules += [Rule((_name(T.ATTN_NORM, i, p),), (f"{L}attn_norm.{p}",)),
                      Rule((_name(T.ATTN_QKV, i, p),), tuple(f"{L}attn.w{x}.{p}" for x in "qkv"), SPLIT_QKV),
                      Rule((_name(T.ATTN_OUT, i, p),), (f"{L}attn.wo.{p}",)),
                      Rule((_name(T.FFN_NORM, i, p),), (f"{L}mlp_norm.{p}",)),
                      Rule((_name(T.FFN_UP, i, p),), (f"{L}mlp.up.{p}",)),
                      Rule((_name(T.FFN_DOWN, i, p),), (f"{L}mlp.down.{p}",))]
    return rules
