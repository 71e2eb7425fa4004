"""One GGUF file (llama.cpp's format) -> a Transformer, with its tokenizer and chat template.

Read with the `gguf` package's memory-mapped reader: only the requested stage's tensors are
touched, one at a time. Quantized tensors are dequantized as they are read, one at a time, then
cast to the requested dtype: never the whole file in fp32 at once. The architecture's metadata
becomes a ModelSpec, knob by knob; an architecture or tensor type Alloy cannot express is
refused by name.

The tensors map to Alloy's parameters through alloy.checkpoint.gguf_names.gguf_rules, the
table the exporter writes with, in llama.cpp's layout (convert_hf_to_gguf.py; transformers' GGUF
loader undoes it the same way): "llama"'s permuted q/k rows, Gemma's 1 + w norm scales, Phi-3's,
GPT-NeoX's and GPT-2's fused q|k|v (and Phi-3's gate|up), a tied head as no `output` tensor, and
the experts of a mixture-of-experts layer stacked in one tensor per projection -- un-stacked here
into Alloy's per-expert MLPs, one layer at a time, so a layer range reads only its own experts.
RoPE scaling as tensors: "llama"'s rope_freqs (Llama 3.1's, as divisors) and "phi3"'s
rope_factors_short/long (LongRoPE) become the spec's LongRoPE knobs (_rope_factors).

Routing, as llama.cpp's graphs hard-code it (models/llama.cpp, qwen3moe.cpp, olmoe.cpp): softmax
over all experts, top `expert_used_count`, renormalised for "llama" with experts (Mixtral) and
"qwen3moe", not for "olmoe". Every layer of these is a mixture-of-experts layer.
"""

from __future__ import annotations

import functools
import math
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alloy.checkpoint.gguf_names import ROPE_FACTOR_TENSORS, gguf_rules
from alloy.checkpoint.gguf_vocab import end_of_generation
from alloy.errors import CheckpointError, ConfigError, UnsupportedModelError
from alloy.spec import ModelSpec

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "olmoe", "gemma", "gemma2", "gemma3", "phi3", "gpt2",
                 "gptneox")
# GGUF architecture -> ModelSpec.family (the HF model_type) where the two names differ ("llama"
# with experts is Mixtral's)
FAMILY_OF_ARCH = {"gemma3": "gemma3_text", "qwen3moe": "qwen3_moe", "gptneox": "gpt_neox"}
# Architectures whose every layer is a mixture of experts (llama.cpp refuses them without)
MOE_ARCHITECTURES = ("qwen3moe", "olmoe")
# Block types decoded by alloy.quant in torch: the floats ggml decodes (tests/test_quant_formats.py),
# and for a large tensor several times as fast as gguf.quants (a Q8_0 262k-row embedding: 0.4 s,
# not 2.6 s). Every other type goes through gguf.quants, Q4_K included (its numpy is the faster).
TORCH_DEQUANTIZED = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
_MISSING = object()
_LIST_AT_MOST = 5


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the only one in a folder without a config.json."""
    if path.suffix == ".gguf" and not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise CheckpointError(f"{path}: holds {len(files)} GGUF files ({', '.join(f.name for f in files[:5])}); "
                              "name the one to load")
    return files[0] if files else None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


def open_gguf(path: str | Path):
    """A gguf.GGUFReader over `path` (memory-mapped), or one CheckpointError."""
    try:
        import gguf  # noqa: F401  (only to say clearly when it is missing)
    except ImportError:
        raise UnsupportedModelError("reading GGUF needs the gguf package: pip install 'alloy-lm[gguf]'") from None
    try:
        return _reader_class()(str(path))
    except Exception as err:  # the reader raises ValueError, IndexError, struct errors on bad bytes
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(err).__name__}: {_one_line(err)})") from None


def _drop_mapped_pages(reader) -> None:
    """Let the kernel drop the memory-mapped file's pages from this process (they stay in the page
    cache): a reader held across a piece-by-piece load would otherwise keep every tensor read so
    far resident. Nothing where the map or madvise is unavailable."""
    import mmap

    mapped = getattr(getattr(reader, "data", None), "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapped.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


@functools.cache
def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf's reader, parsing from a plain ndarray view of its memory map. The stock reader
        slices the np.memmap once per array element, and every memmap slice pays for
        __array_finalize__: 9 s of 11 to open a file with a 262k-token vocabulary (Gemma 3).
        Same bytes, same arrays, still views of the one map."""

        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:  # first called in __init__, right after the file is mapped
                plain = self._plain = self.data.view(np.ndarray)
            dtype, count = np.dtype(dtype), int(count)
            arr = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


class Metadata:
    """Typed access to a reader's key/value fields, with one-line errors naming the key."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: GGUF metadata lacks {key!r}")
            return default
        try:
            return field.contents()
        except Exception as err:
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} is unreadable ({_one_line(err)})") from None


# ---- metadata -> ModelSpec -------------------------------------------------------------------

def read_spec(path: str | Path) -> ModelSpec:
    path = Path(path)
    return spec_from_gguf(open_gguf(path), path)


def spec_from_gguf(reader, path: Path) -> ModelSpec:
    meta = Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; "
                                    f"supported: {', '.join(ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    for tensor in sorted(ROPE_FACTOR_TENSORS.keys() & names):
        if ROPE_FACTOR_TENSORS[tensor] != arch:  # llama.cpp would not load it either
            raise UnsupportedModelError(f"{path}: tensor {tensor!r} belongs to llama.cpp's "
                                        f"'{ROPE_FACTOR_TENSORS[tensor]}' architecture, not {arch!r}")
    a = lambda key, default=_MISSING: meta.get(f"{arch}.{key}", default)  # noqa: E731
    hidden, heads = a("embedding_length"), a("attention.head_count")
    kv_heads = a("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts (OpenELM-style): one value only here
        if len(set(kv_heads)) != 1:
            raise UnsupportedModelError(f"{path}: per-layer key/value head counts {kv_heads} are not supported")
        kv_heads = kv_heads[0]
    head_dim = a("attention.key_length", hidden // heads if heads else 0)
    embed_rows = next((int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), None)
    fields: dict[str, Any] = dict(
        family=FAMILY_OF_ARCH.get(arch, arch),
        vocab_size=a("vocab_size", embed_rows),
        hidden_size=hidden,
        num_layers=a("block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=a("feed_forward_length"),
        max_seq_len=a("context_length"),
        tie_embeddings="output.weight" not in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=end_of_generation(meta),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", None),
    )
    if arch == "gpt2":
        fields |= dict(norm="layernorm", norm_eps=a("attention.layer_norm_epsilon"), positions="learned",
                       qkv_bias=True, o_bias=True, mlp="plain", activation="gelu_tanh", mlp_bias=True)
        return ModelSpec(**fields)

    if arch == "gptneox":  # llama.cpp's GELU is the tanh form; HF GPT-NeoX's the exact one, as here
        import gguf

        key = lambda template: meta.get(template.format(arch=arch))  # noqa: E731
        fields |= dict(norm="layernorm", norm_eps=key(gguf.Keys.Attention.LAYERNORM_EPS), mlp="plain",
                       activation="gelu", parallel_residual=bool(key(gguf.Keys.LLM.USE_PARALLEL_RESIDUAL)))
    else:
        fields["norm_eps"] = a("attention.layer_norm_rms_epsilon")
    fields |= _rope(a, head_dim, path)
    fields |= _rope_factors(reader, a, names, fields, path)
    # Optional biases and QK-norm are told by the tensors the file holds (llama.cpp does the same).
    fields |= dict(qkv_bias="blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names,
                   o_bias="blk.0.attn_output.bias" in names,
                   mlp_bias="blk.0.ffn_up.bias" in names or "blk.0.ffn_up_exps.bias" in names,
                   qk_norm="blk.0.attn_q_norm.weight" in names)
    fields |= _experts(meta, arch, fields, path)
    if arch == "olmoe":  # its q and k norms span all heads at once (llama.cpp: [n_embd])
        fields["qk_norm_per_head"] = False
    if arch in ("gemma", "gemma2", "gemma3"):
        fields |= dict(norm_offset=1.0, embedding_scaled=True, activation="gelu_tanh")
    if arch == "gemma2":
        window = a("attention.sliding_window", 0)
        # llama.cpp: every other layer slides, starting with the first. GGUF has no
        # query_pre_attn_scalar: llama.cpp scales queries by head_dim ** -0.5, except for the one
        # size it knows differs, Gemma 2 27B (46 layers), scaled by (hidden / heads) ** -0.5.
        if fields["num_layers"] == 46:
            fields["attn_scale"] = (hidden / heads) ** -0.5
        fields |= dict(norm_placement="sandwich", attn_softcap=float(a("attn_logit_softcapping", 0.0)),
                       final_softcap=float(a("final_logit_softcapping", 0.0)), sliding_window=window,
                       layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(fields["num_layers"]))
                       if window else ())
    if arch == "gemma3":
        fields |= _gemma3(a, fields, hidden, heads, path)
    if arch == "phi3":
        window = a("attention.sliding_window", 0)
        fields |= dict(sliding_window=window, layer_types=("sliding",) * fields["num_layers"] if window else ())
    return ModelSpec(**fields)


def _experts(meta: Metadata, arch: str, fields: dict[str, Any], path: Path) -> dict[str, Any]:
    """The mixture-of-experts knobs: `expert_count` experts per layer, `expert_used_count` of them
    per token, each as wide as `expert_feed_forward_length` (qwen3moe; llama.cpp's default
    feed_forward_length / expert_used_count) or feed_forward_length (llama, olmoe). Routing is
    what llama.cpp's graph for the architecture hard-codes: softmax, renormalised top-k except
    OLMoE's. A gating function or weight scale in the file that llama.cpp would apply differently
    is refused by name."""
    import gguf

    key = lambda template, default=_MISSING: meta.get(template.format(arch=arch), default)  # noqa: E731
    count = key(gguf.Keys.LLM.EXPERT_COUNT, _MISSING if arch in MOE_ARCHITECTURES else 0)
    if not count:
        return {}
    if arch not in (*MOE_ARCHITECTURES, "llama"):
        raise UnsupportedModelError(f"{path}: experts in GGUF architecture {arch!r} are not supported; "
                                    f"supported: llama (Mixtral), {', '.join(MOE_ARCHITECTURES)}")
    used = key(gguf.Keys.LLM.EXPERT_USED_COUNT)
    gating = key(gguf.Keys.LLM.EXPERT_GATING_FUNC, int(gguf.ExpertGatingFuncType.SOFTMAX))
    if gating != gguf.ExpertGatingFuncType.SOFTMAX:
        raise UnsupportedModelError(f"{path}: GGUF metadata {gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch=arch)!r} "
                                    f"is {gating}; supported: {int(gguf.ExpertGatingFuncType.SOFTMAX)} (softmax)")
    scale = key(gguf.Keys.LLM.EXPERT_WEIGHTS_SCALE, 0.0)
    if scale not in (0.0, 1.0):
        raise UnsupportedModelError(f"{path}: GGUF metadata {gguf.Keys.LLM.EXPERT_WEIGHTS_SCALE.format(arch=arch)!r} "
                                    f"is {scale}; supported: none or 1")
    out: dict[str, Any] = dict(num_experts=count, experts_per_token=used, router_renormalize=arch != "olmoe")
    if arch == "qwen3moe":
        width = key(gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0) or fields["intermediate_size"] // max(used, 1)
        out["expert_intermediate_size"] = width
    if arch == "llama":
        out["family"] = "mixtral"
    return out


def _gemma3(a, fields: dict[str, Any], hidden: int, heads: int, path: Path) -> dict[str, Any]:
    """Gemma 3 as llama.cpp's llama-model.cpp reads it. The converter writes the sliding window
    (absent: every layer full), the full layers' RoPE base and scaling, and a final softcap only
    when the config has one. The rest is llama.cpp's unless the file says otherwise: five sliding
    layers then one full (`attention.sliding_window_pattern`: a period or a flag per layer),
    sliding layers on an unscaled base of 10k (`rope.freq_base_swa`), no attention softcap, and
    queries scaled by head_dim ** -0.5 except in the 27B (62 layers), scaled by (hidden / heads)
    ** -0.5 -- what query_pre_attn_scalar says in each published HF config."""
    layers, window = fields["num_layers"], a("attention.sliding_window", 0)
    out: dict[str, Any] = dict(norm_placement="sandwich", final_softcap=float(a("final_logit_softcapping", 0.0)))
    if layers == 62:
        out["attn_scale"] = (hidden / heads) ** -0.5
    if not window:
        return out
    pattern = a("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list) and len(pattern) == layers:
        sliding = [bool(flag) for flag in pattern]
    elif isinstance(pattern, int) and pattern >= 1:  # llama.cpp's set_swa_pattern
        sliding = [i % pattern < pattern - 1 for i in range(layers)]
    else:
        raise CheckpointError(f"{path}: GGUF metadata 'gemma3.attention.sliding_window_pattern' must be a period "
                              f">= 1 or {layers} per-layer flags, got {reprlib.repr(pattern)}")
    return out | dict(sliding_window=window, rope_local_theta=float(a("rope.freq_base_swa", 10000.0)),
                      layer_types=tuple("sliding" if s else "full" for s in sliding))


def _rope(a, head_dim: int, path: Path) -> dict[str, Any]:
    rotary = a("rope.dimension_count", head_dim)
    out: dict[str, Any] = dict(rope_theta=float(a("rope.freq_base", 10000.0)),
                               rotary_dim=0 if rotary == head_dim else rotary)
    kind = a("rope.scaling.type", "none")
    if kind == "longrope":  # the factor tensors say it (_rope_factors)
        return out
    if kind == "linear":
        return out | dict(rope_scaling="linear", rope_factor=float(a("rope.scaling.factor")))
    if kind != "none":
        raise UnsupportedModelError(f"{path}: rope scaling {kind!r} is not supported; "
                                    "supported: none, linear, longrope")
    return out


def _rope_factors(reader, a, names: set[str], fields: dict[str, Any], path: Path) -> dict[str, Any]:
    """The RoPE factor tensors as the spec's LongRoPE knobs (the llama.cpp converter's encodings,
    the exporter's rope_factor_tensors). Each is a divisor of its inverse frequency; a linear
    scaling type in the same file divides them all again (llama.cpp applies both), so it is
    folded into the factors.

    - rope_freqs (llama: Llama 3.1's scaling, computed from its params, which are not stored):
      llama.cpp divides by it at every position, with unscaled cos and sin. Exactly LongRoPE with
      equal short and long factors, attention factor 1 and the original length the context length.
    - rope_factors_short / rope_factors_long (phi3): LongRoPE itself, with
      `rope.scaling.original_context_length` and `rope.scaling.attn_factor` (absent: as
      transformers and llama.cpp infer it, sqrt(1 + ln(factor) / ln(original)))."""
    present = sorted(ROPE_FACTOR_TENSORS.keys() & names)
    if not present:
        if a("rope.scaling.type", "none") == "longrope":
            raise CheckpointError(f"{path}: rope scaling 'longrope' without its factor tensors "
                                  "('rope_factors_short.weight', 'rope_factors_long.weight')")
        return {}
    linear = fields.pop("rope_factor", 1.0) if fields.pop("rope_scaling", "none") == "linear" else 1.0
    read = lambda name: tuple(float(x) * linear for x in _factor_tensor(reader, name, fields, path))  # noqa: E731
    context = fields["max_seq_len"]
    if present == ["rope_freqs.weight"]:
        factors = read("rope_freqs.weight")
        return dict(rope_scaling="longrope", rope_short_factor=factors, rope_long_factor=factors,
                    rope_original_max_seq_len=context, rope_attention_factor=1.0)
    if len(present) != 2:
        raise CheckpointError(f"{path}: LongRoPE needs both 'rope_factors_short.weight' and "
                              f"'rope_factors_long.weight'; the file holds only {present[0]!r}")
    original = int(a("rope.scaling.original_context_length", context))
    if original <= 0:
        raise CheckpointError(f"{path}: GGUF metadata 'rope.scaling.original_context_length' must be > 0, "
                              f"got {original}")
    factor = context / original
    attention = a("rope.scaling.attn_factor", None)
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dict(rope_scaling="longrope", rope_short_factor=read("rope_factors_short.weight"),
                rope_long_factor=read("rope_factors_long.weight"), rope_original_max_seq_len=original,
                rope_factor=factor, rope_attention_factor=float(attention))


def _factor_tensor(reader, name: str, fields: dict[str, Any], path: Path) -> np.ndarray:
    """A RoPE factor tensor's values in fp32: one per frequency, rope_dim / 2 of them, all > 0."""
    import gguf

    (t,) = [t for t in reader.tensors if t.name == name]
    rope_dim = fields.get("rotary_dim") or fields["head_dim"]
    shape = tuple(int(n) for n in t.shape)
    if shape != (rope_dim // 2,):
        raise CheckpointError(f"{path}: tensor {name!r} must hold {rope_dim // 2} values (rope_dim / 2), "
                              f"has shape {list(reversed(shape))}")
    try:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            values = np.array(t.data, dtype=np.float32).reshape(-1)
        else:
            values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read tensor {name!r} ({type(err).__name__}: "
                              f"{_one_line(err)})") from None
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise CheckpointError(f"{path}: tensor {name!r} must hold finite factors > 0")
    return values


# ---- tensors ---------------------------------------------------------------------------------

class GGUFSource:
    """The file's tensors by GGUF name, each dequantized to a torch tensor when read."""

    def __init__(self, reader, path: Path):
        import gguf

        self.path = path
        self.tensors = {t.name: t for t in reader.tensors}
        readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *gguf.quants._type_traits}
        for t in self.tensors.values():
            if t.tensor_type not in readable:
                raise UnsupportedModelError(
                    f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which Alloy cannot dequantize; "
                    "re-quantize it as Q8_0, Q4_0, Q4_K, Q6_K, F16 or F32")
        self.where = self.tensors  # the names a Source holds, as io's checks expect

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name].shape))  # GGUF lists dims fastest first

    def get(self, name: str) -> torch.Tensor:
        import gguf

        t = self.tensors[name]
        try:
            if t.tensor_type == gguf.GGMLQuantizationType.F32:
                array = np.array(t.data, dtype=np.float32)
            elif t.tensor_type == gguf.GGMLQuantizationType.F16:
                return torch.from_numpy(np.array(t.data, dtype=np.float16)).reshape(self.shape(name))
            elif t.tensor_type.name in TORCH_DEQUANTIZED:
                from alloy.quant import dequantize

                raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))  # the blocks, copied off the map
                return dequantize(raw.reshape(-1, raw.shape[-1]), TORCH_DEQUANTIZED[t.tensor_type.name]
                                  ).reshape(self.shape(name))
            else:
                array = gguf.quants.dequantize(t.data, t.tensor_type)
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(self.shape(name))
        except (ValueError, IndexError, NotImplementedError, RuntimeError, ConfigError) as err:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({type(err).__name__}: "
                                  f"{_one_line(err)})") from None


def _names(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LIST_AT_MOST])
    return shown + (f" ... and {len(keys) - _LIST_AT_MOST} more" if len(keys) > _LIST_AT_MOST else "")


def load_gguf(path: str | Path, device=None, dtype=None, *, layers=None, embed=None, head=None):
    """A Transformer (or a stage of one) from a GGUF file, with `tokenizer` and `side_files`
    (tokenizer.json, tokenizer_config.json with the chat template, generation_config.json) rebuilt
    from the metadata. Default dtype: fp16/bf16 when the embeddings are stored so, else fp32."""
    return open_gguf_model(path)(device, dtype, layers=layers, embed=embed, head=head)


def open_gguf_model(path: str | Path):
    """`load_gguf` bound to one file (alloy.checkpoint.io.open_model): the metadata parsed, the
    tensors checked and the tokenizer rebuilt once; each call reads its stage's tensors."""
    import gguf

    from alloy.checkpoint.gguf_vocab import side_files_from_gguf
    from alloy.checkpoint.io import fill

    path = Path(path)
    reader = open_gguf(path)
    spec = spec_from_gguf(reader, path)
    source = GGUFSource(reader, path)
    arch = Metadata(reader, path).get("general.architecture")
    rules = gguf_rules(spec, arch)
    needed = {n for rule in rules for n in rule.hf}
    # the RoPE factor tensors are in the spec (spec_from_gguf read them), not parameters
    missing, extra = needed - set(source.tensors), set(source.tensors) - needed - ROPE_FACTOR_TENSORS.keys()
    if missing or extra:
        parts = ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(extra)}"] if extra else [])
        raise CheckpointError(f"{path}: tensors do not match the {arch} metadata: {'; '.join(parts)}")
    stored = source.tensors["token_embd.weight"].tensor_type
    default_dtype = {gguf.GGMLQuantizationType.F16: torch.float16,
                     gguf.GGMLQuantizationType.BF16: torch.bfloat16}.get(stored, torch.float32)
    tokenizer, side_files = side_files_from_gguf(Metadata(reader, path), spec)

    def read(device=None, dtype=None, *, layers=None, embed=None, head=None, stand_ins=None):
        model = fill(spec, rules, source, path, device, default_dtype if dtype is None else dtype,
                     layers=layers, embed=embed, head=head, stand_ins=stand_ins)
        _drop_mapped_pages(reader)  # what was read is copied; the file's pages need not stay resident
        model.tokenizer, model.side_files = tokenizer, side_files
        return model.eval()

    read.spec = spec
    return read
