"""Export to ONNX (onnxruntime logits = PyTorch's) and GGUF (read back with gguf's reader)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import alloy
from alloy.cli import main
from alloy.errors import UnsupportedModelError
from alloy.checkpoint.gguf_names import permute, unpermute
from hf_cases import build_hf


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """An untied GQA Llama with a byte-level BPE tokenizer smaller than its embedding table."""
    import transformers

    from alloy.train.data import train_tokenizer

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=5000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    text = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 20
    train_tokenizer(iter(text), 280).save(str(directory / "tokenizer.json"))
    return directory


def test_onnx_logits_equal_pytorch_at_two_shapes(llama_dir, tmp_path):
    import onnxruntime

    out = tmp_path / "model.onnx"
    assert main(["export", str(llama_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = alloy.load(llama_dir)
    for shape in [(1, 7), (3, 19)]:  # neither is the (2, 8) example it was traced with
        ids = torch.randint(0, 300, shape)
        got = session.run(["logits"], {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            want = model(ids).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_gguf_round_trip_metadata_tokenizer_and_tensors(llama_dir, tmp_path):
    from gguf import GGUFReader, TokenType

    out = tmp_path / "model.gguf"
    assert main(["export", str(llama_dir), "--format", "gguf", "--out", str(out)]) == 0
    reader = GGUFReader(out)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    expected = {"llama.block_count": 2, "llama.context_length": 64, "llama.embedding_length": 32,
                "llama.feed_forward_length": 48, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 8}
    assert {k: field(k) for k in expected} == expected
    assert field("llama.rope.freq_base") == pytest.approx(5000.0)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    # tokenizer: 280 real tokens by id, then placeholders for the 20 padded embedding rows
    tokenizer = alloy.load(llama_dir).tokenizer
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert field("tokenizer.ggml.model") == "gpt2" and len(tokens) == 300
    assert tokens[:280] == [tokenizer.id_to_token(i) for i in range(280)]
    assert types[0] == TokenType.CONTROL and types[5] == TokenType.NORMAL and types[299] == TokenType.UNUSED
    assert len(field("tokenizer.ggml.merges")) > 0 and field("tokenizer.ggml.eos_token_id") == 0

    state = alloy.load(llama_dir).state_dict()
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    assert len(tensors) == 2 + 2 * 9 + 1
    torch.testing.assert_close(tensors["token_embd.weight"], state["embed.tok.weight"], rtol=0, atol=0)
    torch.testing.assert_close(tensors["output.weight"], state["head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(tensors["output_norm.weight"], state["norm.weight"], rtol=0, atol=0)
    for i in range(2):
        L = f"layers.{i}."
        torch.testing.assert_close(unpermute(tensors[f"blk.{i}.attn_q.weight"], 4), state[L + "attn.wq.weight"],
                                   rtol=0, atol=0)
        torch.testing.assert_close(unpermute(tensors[f"blk.{i}.attn_k.weight"], 2), state[L + "attn.wk.weight"],
                                   rtol=0, atol=0)
        assert not torch.equal(tensors[f"blk.{i}.attn_q.weight"], state[L + "attn.wq.weight"])  # really permuted
        for ours, theirs in [("attn.wv", "attn_v"), ("attn.wo", "attn_output"), ("mlp.gate", "ffn_gate"),
                             ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down"), ("attn_norm", "attn_norm"),
                             ("mlp_norm", "ffn_norm")]:
            torch.testing.assert_close(tensors[f"blk.{i}.{theirs}.weight"], state[f"{L}{ours}.weight"], rtol=0, atol=0)


def _rope_half(x, pos, base=10000.0):
    """HF rotary: dims i and i + d/2 form a pair."""
    d = x.shape[-1]
    freq = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cos(freq).repeat(2), torch.sin(freq).repeat(2)
    return x * cos + torch.cat([-x[d // 2:], x[: d // 2]]) * sin


def _rope_interleaved(x, pos, base=10000.0):
    """llama.cpp's (GPT-J style) rotary: dims 2i and 2i + 1 form a pair."""
    d = x.shape[-1]
    freq = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2], out[1::2] = a * torch.cos(freq) - b * torch.sin(freq), a * torch.sin(freq) + b * torch.cos(freq)
    return out


def test_permuted_rows_under_interleaved_rope_give_the_same_attention_scores():
    """Why the permutation: llama.cpp's rotary on the permuted q/k rows must score exactly as HF's
    rotary on the original rows, for every head and pair of positions."""
    heads, d, hidden = 3, 8, 16
    wq, wk, x, y = (torch.randn(heads * d, hidden, dtype=torch.float64), torch.randn(heads * d, hidden, dtype=torch.float64),
                    torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64))
    q_hf, k_hf = (wq @ x).view(heads, d), (wk @ y).view(heads, d)
    q_cpp, k_cpp = (permute(wq, heads) @ x).view(heads, d), (permute(wk, heads) @ y).view(heads, d)
    for h in range(heads):
        for m, n in [(0, 0), (3, 1), (17, 5)]:
            hf = _rope_half(q_hf[h], m) @ _rope_half(k_hf[h], n)
            cpp = _rope_interleaved(q_cpp[h], m) @ _rope_interleaved(k_cpp[h], n)
            assert math.isclose(hf.item(), cpp.item(), rel_tol=1e-9, abs_tol=1e-9)
    assert torch.equal(unpermute(permute(wq, heads), heads), wq)


def test_gguf_refuses_knobs_the_llama_architecture_cannot_express(tmp_path, capsys):
    """Mistral is written as llama.cpp's "llama", which has no sliding window."""
    directory = tmp_path / "mistral"
    build_hf("mistral-sliding").save_pretrained(directory)
    with pytest.raises(UnsupportedModelError, match="'llama' architecture, which cannot express layer_types="):
        alloy.fuse.export_model(directory, tmp_path / "m.gguf", format="gguf")
    assert main(["export", str(directory), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "layer_types" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mistral"]
