"""An HF directory -> one GGUF file (llama.cpp's format), via the `gguf` package's writer.

Each family is written as the llama.cpp architecture its converter (convert_hf_to_gguf.py) writes
it as -- llama (and Mistral without a window, and Mixtral), qwen2, qwen3, qwen3moe, olmoe, gemma,
gemma2, gemma3, phi3, gptneox -- and only where that architecture expresses every knob of the
spec; any other knob value is refused by name, as is any other family. Streaming: the header and
tensor table are written from the shapes alone, then the tensors one layer at a time (each read
with `alloy.load(..., layers=(i, i + 1))`).

The tensors are alloy.checkpoint.gguf_names.gguf_rules run backwards (each rule's `save`): the
table the reader (alloy.checkpoint.gguf_in) reads with, so the two cannot disagree. Its docstring
has the layouts (q/k row permutation for "llama", fused q|k|v for Phi-3 and GPT-NeoX, experts
stacked per layer, Gemma's 1 + w norms). What the exporter adds, from llama.cpp's converter and
model code (llama-model.cpp, models/*.cpp):
- Gemma architectures imply the embedding scale sqrt(hidden), GELU-tanh and the tied head.
- Llama 3.1's RoPE scaling is a tensor, rope_freqs [rope_dim / 2]: the divisor of each inverse
  frequency (LlamaModel.generate_extra_tensors). LongRoPE (Phi-3) is two, rope_factors_short and
  rope_factors_long, with `rope.scaling.attn_factor` and the original length.
- Mixtures of experts: `expert_count` and `expert_used_count` (and for qwen3moe the experts' width,
  `expert_feed_forward_length`). llama.cpp's graphs hard-code the routing: softmax, top-k, then
  renormalised for "llama" (Mixtral) and "qwen3moe", not for "olmoe"; every layer has experts, as
  wide as feed_forward_length except in qwen3moe. So Qwen3-MoE's norm_topk_prob=False or dense
  layers (mlp_only_layers), OLMoE's norm_topk_prob=True, are refused by name.
- GPT-NeoX: LayerNorm (`attention.layer_norm_epsilon`), `use_parallel_residual`, partial rotary as
  `rope.dimension_count`, biases everywhere and an untied head, all of which llama.cpp requires.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from alloy.checkpoint.gguf_names import gguf_rules
from alloy.errors import UnsupportedModelError
from alloy.fuse.export import publish, temp_beside
from alloy.model import Transformer
from alloy.spec import ModelSpec, read_config

# HF model_type -> the llama.cpp architecture its converter writes.
ARCH_OF_FAMILY = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                  "qwen3_moe": "qwen3moe", "olmoe": "olmoe", "gemma": "gemma", "gemma2": "gemma2",
                  "gemma3_text": "gemma3", "phi3": "phi3", "gpt_neox": "gptneox"}
# family -> knob -> the values its architecture can hold (None: any). Anything else is refused by name.
_COMMON: dict[str, Any] = dict(
    causal=(True,), norm=("rmsnorm",), parallel_residual=(False,), final_norm=(True,), embedding_norm=(False,),
    positions=("rope",), type_vocab_size=(0,), mlp=("gated",), num_experts=(0,), qk_norm_per_head=(True,),
    attn_softcap=(0.0,), final_softcap=(0.0,), rotary_dim=(0,), layer_types=((),),
    rope_scaling=("none", "linear"), rope_attention_factor=(1.0,))
_PLAIN = _COMMON | dict(norm_offset=(0.0,), norm_placement=("pre",), embedding_scaled=(False,),
                        activation=("silu",), qk_norm=(False,))
_GEMMA = _COMMON | dict(norm_offset=(1.0,), embedding_scaled=(True,), activation=("gelu_tanh",),
                        qkv_bias=(False,), o_bias=(False,), mlp_bias=(False,))
# every layer a mixture of experts (llama.cpp's graphs have no dense layer among them), no expert biases
_MOE = dict(num_experts=None, dense_layers=((),), mlp_bias=(False,))
_LLAMA = _PLAIN | dict(rope_scaling=("none", "linear", "llama3"))
_QWEN3 = _PLAIN | dict(qk_norm=(True,), o_bias=(False,), mlp_bias=(False,))
KNOBS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    # experts as wide as feed_forward_length; models/llama.cpp renormalises the top-k weights
    "mixtral": _LLAMA | _MOE | dict(expert_intermediate_size=(0,), router_renormalize=(True,)),
    "qwen2": _PLAIN | dict(o_bias=(False,), mlp_bias=(False,)),
    "qwen3": _QWEN3,
    "qwen3_moe": _QWEN3 | _MOE | dict(router_renormalize=(True,)),  # models/qwen3moe.cpp renormalises
    # q/k norms over all heads, [n_embd]; models/olmoe.cpp does not renormalise, adds no bias, needs `output`
    "olmoe": _PLAIN | _MOE | dict(qk_norm=(True,), qk_norm_per_head=(False,), expert_intermediate_size=(0,),
                                  router_renormalize=(False,), qkv_bias=(False,), o_bias=(False,),
                                  tie_embeddings=(False,)),
    "gemma": _GEMMA | dict(norm_placement=("pre",), qk_norm=(False,), tie_embeddings=(True,)),
    # sliding layers, softcaps and the query scale: checked in _check_layout
    "gemma2": _GEMMA | dict(norm_placement=("sandwich",), qk_norm=(False,), tie_embeddings=(True,),
                            attn_softcap=None, final_softcap=None, layer_types=None),
    "gemma3_text": _GEMMA | dict(norm_placement=("sandwich",), qk_norm=(True,), final_softcap=None, layer_types=None),
    "phi3": _PLAIN | dict(qkv_bias=(False,), o_bias=(False,), mlp_bias=(False,), rotary_dim=None, layer_types=None,
                          rope_scaling=("none", "linear", "longrope"), rope_attention_factor=None),
    # models/gptneox.cpp: LayerNorm, GELU, every bias and the `output` tensor required
    "gpt_neox": _COMMON | dict(norm=("layernorm",), parallel_residual=(False, True), mlp=("plain",),
                               activation=("gelu",), qkv_bias=(True,), o_bias=(True,), mlp_bias=(True,),
                               tie_embeddings=(False,), rotary_dim=None, norm_offset=(0.0,), norm_placement=("pre",),
                               embedding_scaled=(False,), qk_norm=(False,)),
}
# What a refused knob is called in the HF config, where that says more than the knob's name
HF_NAMES = {"router_renormalize": "norm_topk_prob", "dense_layers": "mlp_only_layers / decoder_sparse_step",
            "tie_embeddings": "tie_word_embeddings", "qkv_bias": "attention_bias", "o_bias": "attention_bias"}
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint8}


# ---- which architecture, and can it say this spec ------------------------------------------

def gguf_architecture(spec: ModelSpec) -> str:
    """The llama.cpp architecture `spec` is written as, or UnsupportedModelError naming the family
    or the first knob that architecture cannot express."""
    arch = ARCH_OF_FAMILY.get(spec.family)
    if arch is None:
        raise UnsupportedModelError(f"GGUF export does not support model family {spec.family!r}; "
                                    f"supported: {', '.join(sorted(ARCH_OF_FAMILY))}")
    for knob, allowed in KNOBS[spec.family].items():
        if allowed is not None and getattr(spec, knob) not in allowed:
            hf = f", {HF_NAMES[knob]} in config.json" if knob in HF_NAMES else ""
            raise UnsupportedModelError(
                f"GGUF export writes {spec.family!r} as llama.cpp's '{arch}' architecture, which cannot express "
                f"{knob}={getattr(spec, knob)!r}{hf} (it needs {' or '.join(map(repr, allowed))})")
    _check_layout(spec, arch)
    return arch


def _check_layout(spec: ModelSpec, arch: str) -> None:
    def refuse(what: str):
        raise UnsupportedModelError(f"GGUF export: llama.cpp's '{arch}' architecture cannot express {what}")

    if arch in ("qwen2", "phi3", "olmoe", "gptneox") and spec.head_dim * spec.num_heads != spec.hidden_size:
        refuse(f"head_dim={spec.head_dim} with {spec.num_heads} heads in hidden_size={spec.hidden_size} "
               "(it sizes queries by hidden_size)")
    if arch in ("olmoe", "gptneox") and spec.num_kv_heads != spec.num_heads:
        why = "its k_norm spans n_embd" if arch == "olmoe" else "it fuses q|k|v of n_embd each"
        refuse(f"num_key_value_heads={spec.num_kv_heads} with {spec.num_heads} query heads ({why}: as many "
               "key/value heads as query heads)")
    implied = llama_cpp_softmax_scale(spec, arch)
    if not math.isclose(spec.softmax_scale, implied, rel_tol=1e-6):
        refuse(f"attn_scale={spec.softmax_scale:.6g} (query_pre_attn_scalar={spec.softmax_scale ** -2:.6g}); "
               f"it scales queries by {implied:.6g}")
    sliding = tuple(t == "sliding" for t in spec.layer_types)
    if arch == "gemma2":
        if sliding != tuple(i % 2 == 0 for i in range(spec.num_layers)):
            refuse(f"layer_types={spec.layer_types!r} (it slides every other layer, starting with the first)")
        if not (spec.attn_softcap and spec.final_softcap):
            refuse("attention or final logits without a softcap (it always caps both)")
    if arch == "phi3" and sliding and not all(sliding):
        refuse(f"layer_types={spec.layer_types!r} (a window on every layer or none)")
    if arch == "gemma3" and any(sliding) and not spec.rope_local_theta and spec.rope_scaling != "none":
        refuse(f"rope_scaling={spec.rope_scaling!r} on sliding layers (it scales only the full layers)")


def llama_cpp_softmax_scale(spec: ModelSpec, arch: str) -> float:
    """The query scale llama.cpp uses: GGUF has no key for it. Gemma 2 27B (46 layers) and Gemma 3
    27B (62) scale by (hidden / heads) ** -0.5 (models/gemma2.cpp, gemma3.cpp); all else by head_dim ** -0.5."""
    if (arch, spec.num_layers) in (("gemma2", 46), ("gemma3", 62)):
        return (spec.hidden_size // spec.num_heads) ** -0.5
    return spec.head_dim ** -0.5


# ---- tensors -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Planned:
    """One GGUF tensor, made from the Alloy parameters `ours` (none: computed from the spec)."""

    name: str
    ours: tuple[str, ...]
    make: Callable[[list[torch.Tensor]], torch.Tensor]


def tensor_plan(spec: ModelSpec, arch: str, params: list[str]) -> list[Planned]:
    """Every GGUF tensor of the file, in the order written: computed RoPE factors, then those made
    from `params` (the model's parameter names, in its order), each at the place of its first
    parameter. They are gguf_rules' tensors, made by each rule's `save` (llama's permuted q/k,
    Gemma's 1 + w, fused q|k|v, stacked experts). Each parameter is used exactly once."""
    plan = [Planned(name, (), lambda _, t=t: t) for name, t in rope_factor_tensors(spec).items()]
    order = {p: n for n, p in enumerate(params)}
    rules = gguf_rules(spec, arch)
    held = {o for rule in rules for o in rule.ours}
    for param in params:
        if param not in held:
            raise UnsupportedModelError(f"GGUF export: no '{arch}' tensor holds parameter {param!r}")
    assert held <= order.keys(), f"GGUF rules for {arch} name parameters the model lacks: {sorted(held - order.keys())}"
    for rule in sorted(rules, key=lambda r: min(order[o] for o in r.ours)):
        (name,) = rule.hf
        plan.append(Planned(name, rule.ours, lambda ts, r=rule: r.transform.save(ts, spec)[0]))
    used = [p for entry in plan for p in entry.ours]
    assert sorted(used) == sorted(params), "every parameter in exactly one GGUF tensor"
    return plan


def rope_factor_tensors(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The RoPE tensors llama.cpp's converter computes: fp32 divisors of each inverse frequency."""
    if spec.rope_scaling == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(spec)}
    if spec.rope_scaling == "longrope":
        return {"rope_factors_long.weight": torch.tensor(spec.rope_long_factor, dtype=torch.float32),
                "rope_factors_short.weight": torch.tensor(spec.rope_short_factor, dtype=torch.float32)}
    return {}


def llama3_rope_factors(spec: ModelSpec) -> torch.Tensor:
    """Llama 3.1's scaling as divisors [rope_dim / 2], as LlamaModel.generate_extra_tensors computes
    them: wavelengths under original / high_freq_factor kept (1), over original / low_freq_factor
    slowed by `factor`, a smooth ramp between."""
    dim, factor, original = spec.rope_dim, spec.rope_factor, spec.rope_original_max_seq_len
    low, high = spec.rope_low_freq_factor, spec.rope_high_freq_factor
    inv_freq = 1.0 / spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelen < original / high, 1.0, torch.where(wavelen > original / low, factor, ramp))
    return divisors.float()


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """llama.cpp keeps 1-D tensors (norms, biases, RoPE factors) in fp32 whatever the file type."""
    return (tensor.float() if tensor.ndim == 1 else tensor.to(dtype)).contiguous()


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: raw bytes, typed BF16 in the table
        return tensor.view(torch.uint8).numpy()
    return tensor.numpy()


# Block formats a GGUF export writes (alloy.quant): every 2-d weight in the format, except the token
# table and the output matrix, which are Q8_0 (alloy.quant.HEAD_FORMAT: llama.cpp keeps
# its output matrix at 6-8 bits too), and 1-d tensors, which stay fp32 (as llama-quantize leaves them).
BLOCK_FILE_TYPES = {"q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q4_k": "MOSTLY_Q4_K_S"}
HEAD_TENSORS = ("token_embd.weight", "output.weight")


def _block_format(entry_name: str, ndim: int, fmt: str | None) -> str | None:
    """The block format tensor `entry_name` is written in, None for floats."""
    if fmt is None or ndim < 2:
        return None
    from alloy.quant import HEAD_FORMAT

    return HEAD_FORMAT if entry_name in HEAD_TENSORS else fmt


def _quantized(tensor: torch.Tensor, fmt: str) -> torch.Tensor:
    """A weight [..., k] as GGUF blocks uint8 [..., k / block * bytes] (alloy.quant's bytes)."""
    from alloy.quant import quantize

    rows = quantize(tensor.reshape(-1, tensor.shape[-1]), fmt)
    return rows.view(*tensor.shape[:-1], rows.shape[-1])


def export_gguf(model_dir: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    """Write the HF directory `model_dir` as one GGUF file at `out`: fp32, fp16 or bf16, or a block
    format (q8_0, q4_0, q4_1, q4_k: the bytes Alloy decodes with, quantized one layer at a time)."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedModelError("GGUF export needs the gguf package: pip install 'alloy-lm[export]'") from None
    from alloy.checkpoint.io import load, torch_dtype
    from alloy.quant import check_width, get_format

    directory = Path(model_dir)
    spec = ModelSpec.from_hf_config(read_config(directory / "config.json"))
    arch = gguf_architecture(spec)
    target = Path(out)
    block_fmt = dtype if dtype in BLOCK_FILE_TYPES else None
    out_dtype = torch.float32 if block_fmt else torch_dtype(dtype) or torch.float32
    with torch.device("meta"):
        shapes = {k: tuple(p.shape) for k, p in Transformer(spec).named_parameters()}  # a tied head once
    plan = tensor_plan(spec, arch, list(shapes))
    metas = {entry.name: _stored(entry.make([torch.empty(shapes[o], device="meta") for o in entry.ours]), out_dtype)
             for entry in plan}
    formats = {name: _block_format(name, meta.dim(), block_fmt) for name, meta in metas.items()}
    for name, fmt in formats.items():  # every width checked before a byte is written
        if fmt is not None:
            check_width(get_format(fmt), metas[name].shape[-1], name)

    tmp = temp_beside(target)
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        file_type = getattr(gguf.LlamaFileType, BLOCK_FILE_TYPES[block_fmt]) if block_fmt else None
        _write_metadata(writer, spec, arch, directory, out_dtype, file_type)
        if (directory / "tokenizer.json").is_file():
            write_tokenizer(writer, spec, directory)
        for entry in plan:  # the tensor table, from shapes alone
            meta, fmt = metas[entry.name], formats[entry.name]
            if fmt is not None:
                spec_q = get_format(fmt)
                shape = (*meta.shape[:-1], meta.shape[-1] // spec_q.block_size * spec_q.type_size)  # in bytes
                writer.add_tensor_info(entry.name, shape, np.dtype(np.uint8), math.prod(shape),
                                       getattr(gguf.GGMLQuantizationType, fmt.upper()))
                continue
            raw = gguf.GGMLQuantizationType.BF16 if meta.dtype == torch.bfloat16 else None
            shape = tuple(meta.shape) if raw is None else (*meta.shape[:-1], meta.shape[-1] * 2)  # in bytes
            writer.add_tensor_info(entry.name, shape, np.dtype(NUMPY_DTYPES[meta.dtype]),
                                   meta.numel() * meta.element_size(), raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        slices = [dict(layers=(0, 0), embed=True, head=False)]
        slices += [dict(layers=(i, i + 1), embed=False, head=False) for i in range(spec.num_layers)]
        slices += [dict(layers=(spec.num_layers,) * 2, embed=False, head=True)]
        written = 0
        for piece in [None, *slices]:  # None: the computed RoPE tensors; then one layer in memory at a time
            state = {} if piece is None else load(directory, **piece).state_dict()  # dtype as stored
            while written < len(plan) and all(o in state for o in plan[written].ours):
                entry = plan[written]
                tensor = _stored(entry.make([state[o] for o in entry.ours]), out_dtype)
                if formats[entry.name] is not None:
                    tensor = _quantized(tensor, formats[entry.name])
                writer.write_tensor_data(_as_numpy(tensor))
                written += 1
        assert written == len(plan), f"GGUF tensor {plan[written].name} was not written"
        writer.close()
        return publish(tmp, target)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _write_metadata(writer, spec: ModelSpec, arch: str, directory: Path, dtype: torch.dtype,
                    file_type=None) -> None:
    import gguf

    writer.add_name(directory.name)
    writer.add_file_type(file_type if file_type is not None else
                         {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                          torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    writer.add_vocab_size(spec.vocab_size)
    writer.add_context_length(spec.max_seq_len)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    if arch == "gptneox":  # LayerNorm, and the residual form (GPTNeoXModel.set_gguf_parameters)
        writer.add_layer_norm_eps(spec.norm_eps)
        writer.add_parallel_residual(spec.parallel_residual)
    else:
        writer.add_layer_norm_rms_eps(spec.norm_eps)
    if spec.num_experts:  # TextModel.set_gguf_parameters; qwen3moe's experts have their own width
        writer.add_expert_count(spec.num_experts)
        writer.add_expert_used_count(spec.experts_per_token)
        if arch == "qwen3moe":
            writer.add_expert_feed_forward_length(spec.expert_intermediate_size or spec.intermediate_size)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.rope_dim)
    if spec.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(spec.rope_factor)
    if spec.rope_scaling == "longrope":  # as Phi3MiniModel: no scaling type, the factor tensors say it
        writer.add_rope_scaling_orig_ctx_len(spec.rope_original_max_seq_len)
        writer.add_rope_scaling_attn_factors(spec.rope_attention_factor)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(spec.attn_softcap)
        writer.add_final_logit_softcapping(spec.final_softcap)
        writer.add_sliding_window(spec.sliding_window)
    if arch == "gemma3":
        if spec.final_softcap:
            writer.add_final_logit_softcapping(spec.final_softcap)
        if spec.sliding_window:  # llama.cpp's defaults: 5 sliding layers then 1 full, local base 10k
            writer.add_sliding_window(spec.sliding_window)
            writer.add_sliding_window_pattern(_sliding_pattern(spec))
            writer.add_rope_freq_base_swa(spec.rope_local_theta or spec.rope_theta)
    if arch == "phi3":
        writer.add_sliding_window(spec.sliding_window)  # 0: none, as the converter writes


def _sliding_pattern(spec: ModelSpec) -> int | list[bool]:
    """`attention.sliding_window_pattern` as llama.cpp's set_swa_pattern reads it: n when layer i
    slides iff i % n < n - 1 (Gemma 3: 6), else one flag per layer."""
    sliding = [t == "sliding" for t in spec.layer_types]
    period = sliding.index(False) + 1 if False in sliding else spec.num_layers + 1
    if sliding == [i % period < period - 1 for i in range(spec.num_layers)]:
        return period
    return sliding


# ---- tokenizer -----------------------------------------------------------------------------

# llama.cpp's converter names a byte-level BPE's pre-tokenizer by the sha256 of the ids its HF
# tokenizer gives this text (get_vocab_base_pre's "chkhsh"). The hashes below are those of the
# names Alloy's reader splits text for (alloy.checkpoint.gguf_vocab.PRE_SPLITS).
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
KNOWN_CHKHSH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3(.1, .2)
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5 / 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # ruGPT3XL
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
}
# Names tried, in order, for a vocabulary llama.cpp has not hashed (a new or retrained one).
PRE_BY_SPLIT = ("gpt-2", "llama-bpe", "smaug-bpe", "qwen2")
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPIECE_SPACE = "\u2581"


def chkhsh(tokenizer_json: dict) -> str:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(json.dumps(tokenizer_json)).encode(CHKTXT).ids  # with its BOS, as AutoTokenizer
    return hashlib.sha256(str(ids).encode()).hexdigest()


def pre_tokenizer_name(data: dict, path: Path) -> str:
    """`tokenizer.ggml.pre` for a byte-level BPE tokenizer.json: llama.cpp's name for its hash, or
    else the name whose split regex (and merge rule) is the tokenizer's own."""
    from alloy.checkpoint.gguf_vocab import LLAMA3_PRES, PRE_SPLITS

    digest = chkhsh(data)
    if digest in KNOWN_CHKHSH:
        return KNOWN_CHKHSH[digest]
    pre, split = data.get("pre_tokenizer") or {}, False  # False: no split llama.cpp names
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = steps[-1] if steps and steps[-1].get("type") == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        if len(steps) == 1 and byte_level.get("use_regex", True):
            split = None  # GPT-2's regex, inside ByteLevel
        elif len(steps) == 2 and not byte_level.get("use_regex", True) and steps[0].get("type") == "Split" and \
                steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            split = steps[0].get("pattern", {}).get("Regex", False)
    ignore_merges = bool(data["model"].get("ignore_merges"))
    normalizer = data.get("normalizer")
    if normalizer is None or normalizer == {"type": "NFC"}:  # llama.cpp applies none; NFC text is unchanged by it
        for name in PRE_BY_SPLIT:
            if split is not False and PRE_SPLITS[name] == split and (name in LLAMA3_PRES) == ignore_merges:
                return name
    # As before llama.cpp's table existed here: "default". Alloy reads its own file back the same;
    # llama.cpp may split text differently, so say so (its converter refuses such a tokenizer).
    warnings.warn(
        f"{path}: llama.cpp does not know this tokenizer's pre-tokenizer (chkhsh {digest}, normalizer "
        f"{(normalizer or {}).get('type')}, pre_tokenizer {json.dumps(pre)[:120]}); written as \"default\", "
        f"so llama.cpp may tokenize text differently (it names {', '.join(PRE_BY_SPLIT)} by their split regex)",
        stacklevel=2)
    return "default"


def write_tokenizer(writer, spec: ModelSpec, directory: Path) -> None:
    """tokenizer.json (BPE) as llama.cpp's "gpt2" vocabulary (byte-level) or "llama" one (SentencePiece,
    byte fallback), with the special ids, whether BOS/EOS are added, and the chat template."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"{path}: GGUF export handles BPE tokenizers; this one is {model.get('type')!r}")
    sentencepiece = bool(model.get("byte_fallback"))
    table = _token_table(data, spec.vocab_size, path, sentencepiece)
    writer.add_token_list([text for text, _ in table])
    writer.add_token_types([int(kind) for _, kind in table])
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(_sentencepiece_scores(model, table))
        writer.add_add_space_prefix(_space_prefix(data, path))
        if model.get("unk_token") in model["vocab"]:
            writer.add_unk_token_id(model["vocab"][model["unk_token"]])
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(data, path))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    _write_special_tokens(writer, spec, data, table, path)
    from alloy.checkpoint.io import chat_template, read_side_files

    template = chat_template(SimpleNamespace(side_files=read_side_files(directory)))
    if template:
        writer.add_chat_template(template)


def _token_table(data: dict, vocab_size: int, path: Path, sentencepiece: bool) -> list[tuple[str, int]]:
    """(text, llama.cpp token type) by id, one per embedding row; rows without a token (a vocabulary
    padded for speed) become [PADn], unused, as the converter writes them."""
    from gguf import TokenType

    model = data["model"]
    tokens: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        if added.get("special"):
            tokens[added["id"]] = (added["content"], TokenType.CONTROL)
        else:  # llama.cpp matches user-defined tokens in raw text: "pre-normalize user-defined spaces"
            tokens[added["id"]] = (added["content"].replace(SPIECE_SPACE, " "), TokenType.USER_DEFINED)
    if sentencepiece:
        for text, i in model["vocab"].items():
            if BYTE_TOKEN.fullmatch(text):
                tokens[i] = (text, TokenType.BYTE)
        if model.get("unk_token") in model["vocab"]:
            tokens[model["vocab"][model["unk_token"]]] = (model["unk_token"], TokenType.UNKNOWN)
    if max(tokens) >= vocab_size:
        raise UnsupportedModelError(f"{path}: token id {max(tokens)} is beyond the model's {vocab_size} embeddings")
    return [tokens.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]


def _sentencepiece_scores(model: dict, table: list[tuple[str, int]]) -> list[float]:
    """A SentencePiece vocabulary merges the adjacent pair whose joined token scores highest, so a
    token scores minus the rank of the first merge that makes it; tokens no merge makes (characters,
    bytes, special and added tokens) score below every merge."""
    from gguf import TokenType

    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    floor = -float(len(rank) + 1)
    return [-float(rank[text]) if kind == TokenType.NORMAL and text in rank else floor for text, kind in table]


def _space_prefix(data: dict, path: Path) -> bool:
    """Whether a SentencePiece tokenizer.json puts "▁" before the text: the shapes transformers'
    converters write -- a normalizer replacing spaces with "▁", after prepending one (Llama 2,
    Phi-3) or not (Gemma), or a Metaspace pre-tokenizer. Anything else GGUF cannot say."""
    normalizer, pre = data.get("normalizer"), data.get("pre_tokenizer")
    steps = normalizer.get("normalizers", []) if (normalizer or {}).get("type") == "Sequence" else [normalizer]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_SPACE}
    prepend = {"type": "Prepend", "prepend": SPIECE_SPACE}
    if pre is None and steps in ([replace], [prepend, replace]):
        return steps[0] == prepend
    if steps in ([None], [], [replace]) and (pre or {}).get("type") == "Metaspace" and \
            pre.get("replacement") == SPIECE_SPACE:
        return pre.get("prepend_scheme", "always") != "never"
    raise UnsupportedModelError(
        f"{path}: GGUF's SentencePiece vocabulary cannot express normalizer {json.dumps(normalizer)[:80]} with "
        f"pre_tokenizer {json.dumps(pre)[:80]}")


def _write_special_tokens(writer, spec: ModelSpec, data: dict, table: list[tuple[str, int]], path: Path) -> None:
    """bos/eos/pad ids from config.json, and add_bos/add_eos from the post-processor's template."""
    if spec.bos_token_id is not None:
        writer.add_bos_token_id(spec.bos_token_id)
    if spec.eos_token_id:
        writer.add_eos_token_id(spec.eos_token_id[0])
    if spec.pad_token_id is not None:
        writer.add_pad_token_id(spec.pad_token_id)
    first, last = _added_around(data)
    for added, token_id, what, add in ((first, spec.bos_token_id, "bos", writer.add_add_bos_token),
                                       (last, spec.eos_token_id[0] if spec.eos_token_id else None, "eos",
                                        writer.add_add_eos_token)):
        if added is not None and (token_id is None or table[token_id][0] != added):
            raise UnsupportedModelError(f"{path}: the post-processor adds {added!r}, which is not the model's "
                                        f"{what} token; GGUF can only say whether {what} is added")
        add(added is not None)


def _added_around(data: dict) -> tuple[str | None, str | None]:
    """The special tokens tokenizer.json's post-processor puts before and after a single text."""
    processor = data.get("post_processor") or {}
    for step in processor.get("processors", [processor]):
        if step.get("type") == "TemplateProcessing":
            single = step.get("single", [])
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            return first, last
    return None, None
