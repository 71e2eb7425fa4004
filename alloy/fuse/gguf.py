"""An HF directory -> one GGUF file (llama.cpp's format), via the `gguf` package's writer.

It writes llama.cpp's "llama" architecture, so it takes any model whose knobs that
architecture expresses (Llama, Mistral without a window, ...), judged by knobs, never by name.
Streaming: the header and tensor table are written from the shapes alone, then the tensors
one layer at a time (each read with `alloy.load(..., layers=(i, i + 1))`).

Layout facts, from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute): llama.cpp rotates
adjacent pairs (GPT-J style) while HF checkpoints rotate the two halves of each head, so the
rows of q_proj (per query head) and k_proj (per key/value head) are permuted:
    w.reshape(heads, 2, head_dim // 2, in).swapaxes(1, 2).reshape(w.shape)
and `unpermute` below undoes it. A tied head is written as no `output` tensor: llama.cpp then
reuses `token_embd`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from alloy.errors import UnsupportedModelError
from alloy.fuse.export import publish, temp_beside
from alloy.model import Transformer
from alloy.spec import ModelSpec, read_config

ARCH = "llama"
# knob -> the value llama.cpp's llama architecture implies
LLAMA_KNOBS = dict(causal=True, norm="rmsnorm", norm_offset=0.0, norm_placement="pre", parallel_residual=False,
                   final_norm=True, embedding_norm=False, embedding_scaled=False, positions="rope",
                   rope_scaling="none", type_vocab_size=0, qkv_bias=False, o_bias=False, qk_norm=False,
                   attn_softcap=0.0, layer_types=(), mlp="gated", activation="silu", mlp_bias=False,
                   final_softcap=0.0, num_experts=0)
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint8}


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF (rotate-half) rows -> llama.cpp (interleaved pairs) rows, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_llama_layout(spec: ModelSpec) -> None:
    for knob, value in LLAMA_KNOBS.items():
        if getattr(spec, knob) != value:
            raise UnsupportedModelError(
                f"GGUF export writes llama.cpp's '{ARCH}' architecture, which cannot express "
                f"{knob}={getattr(spec, knob)!r} (it needs {value!r})")
    if spec.rotary_dim not in (0, spec.head_dim):
        raise UnsupportedModelError(f"GGUF export: partial rotary (rotary_dim={spec.rotary_dim}) is not "
                                    f"expressible in the '{ARCH}' architecture")
    if spec.attn_scale and abs(spec.attn_scale - spec.head_dim ** -0.5) > 1e-12:
        raise UnsupportedModelError(f"GGUF export: attn_scale={spec.attn_scale} differs from head_dim**-0.5")


def tensor_names(spec: ModelSpec) -> dict[str, str]:
    """Alloy parameter name -> GGUF tensor name, in the order they are written."""
    import gguf

    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    out = {"embed.tok.weight": names[T.TOKEN_EMBD] + ".weight"}
    per_layer = [("attn_norm", T.ATTN_NORM), ("attn.wq", T.ATTN_Q), ("attn.wk", T.ATTN_K), ("attn.wv", T.ATTN_V),
                 ("attn.wo", T.ATTN_OUT), ("mlp_norm", T.FFN_NORM), ("mlp.gate", T.FFN_GATE),
                 ("mlp.up", T.FFN_UP), ("mlp.down", T.FFN_DOWN)]
    for i in range(spec.num_layers):
        for ours, theirs in per_layer:
            out[f"layers.{i}.{ours}.weight"] = names[theirs].format(bid=i) + ".weight"
    out["norm.weight"] = names[T.OUTPUT_NORM] + ".weight"
    if not spec.tie_embeddings:
        out["head.weight"] = names[T.OUTPUT] + ".weight"
    return out


def _to_gguf(name: str, tensor: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if name.endswith("attn.wq.weight"):
        tensor = permute(tensor, spec.num_heads)
    elif name.endswith("attn.wk.weight"):
        tensor = permute(tensor, spec.num_kv_heads)
    if tensor.ndim == 1:  # llama.cpp keeps norms (1-D) in fp32 whatever the file type
        tensor = tensor.float()
    return tensor.contiguous()


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: raw bytes, typed BF16 in the table
        return tensor.view(torch.uint8).numpy()
    return tensor.numpy()


def export_gguf(model_dir: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    """Write the HF directory `model_dir` as one GGUF file at `out` (fp32, fp16 or bf16)."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedModelError("GGUF export needs the gguf package: pip install 'alloy-lm[export]'") from None
    from alloy.checkpoint.io import load, torch_dtype

    directory = Path(model_dir)
    spec = ModelSpec.from_hf_config(read_config(directory / "config.json"))
    check_llama_layout(spec)
    target = Path(out)
    names = tensor_names(spec)
    out_dtype = torch_dtype(dtype) or torch.float32
    with torch.device("meta"):
        shapes = {k: tuple(p.shape) for k, p in Transformer(spec).named_parameters()}
    shapes.setdefault("head.weight", (spec.vocab_size, spec.hidden_size))

    tmp = temp_beside(target)
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        _write_metadata(writer, spec, directory, out_dtype)
        for ours, theirs in names.items():  # the tensor table, from shapes alone
            meta = _to_gguf(ours, torch.empty(shapes[ours], dtype=out_dtype, device="meta"), spec)
            raw = gguf.GGMLQuantizationType.BF16 if meta.dtype == torch.bfloat16 else None
            shape = tuple(meta.shape) if raw is None else (*meta.shape[:-1], meta.shape[-1] * 2)  # in bytes
            writer.add_tensor_info(theirs, shape, np.dtype(NUMPY_DTYPES[meta.dtype]),
                                   meta.numel() * meta.element_size(), raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        slices = [dict(layers=(0, 0), embed=True, head=False)]
        slices += [dict(layers=(i, i + 1), embed=False, head=False) for i in range(spec.num_layers)]
        slices += [dict(layers=(spec.num_layers,) * 2, embed=False, head=True)]
        for piece in slices:  # one layer in memory at a time, written in table order
            state = load(directory, dtype=out_dtype, **piece).state_dict()
            for ours in [k for k in names if k in state]:
                writer.write_tensor_data(_as_numpy(_to_gguf(ours, state[ours], spec)))
            del state
        writer.close()
        return publish(tmp, target)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _write_metadata(writer, spec: ModelSpec, directory: Path, dtype: torch.dtype) -> None:
    import gguf

    writer.add_name(directory.name)
    writer.add_file_type({torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                          torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    writer.add_vocab_size(spec.vocab_size)
    writer.add_context_length(spec.max_seq_len)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    if spec.head_dim * spec.num_heads != spec.hidden_size:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    if (directory / "tokenizer.json").is_file():
        _write_tokenizer(writer, spec, directory / "tokenizer.json")


def _write_tokenizer(writer, spec: ModelSpec, path: Path) -> None:
    """A BPE tokenizer.json as llama.cpp's "gpt2" tokenizer: tokens by id, types, merges."""
    import gguf

    data = json.loads(path.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"{path}: GGUF export handles BPE tokenizers; this one is {model.get('type')!r}")
    tokens: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[added["id"]] = (added["content"], kind)
    if max(tokens) >= spec.vocab_size:
        raise UnsupportedModelError(f"{path}: token id {max(tokens)} is beyond the model's {spec.vocab_size} embeddings")
    # Embedding rows without a token (a vocabulary padded for speed) get placeholder names.
    table = [tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(spec.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in table])
    writer.add_token_types([int(k) for _, k in table])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    if spec.bos_token_id is not None:
        writer.add_bos_token_id(spec.bos_token_id)
    if spec.eos_token_id:
        writer.add_eos_token_id(spec.eos_token_id[0])
    if spec.pad_token_id is not None:
        writer.add_pad_token_id(spec.pad_token_id)
