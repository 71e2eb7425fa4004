"""`alloy export --format gguf --dtype q8_0|q4_0|q4_1|q4_k`: Alloy's block formats written to GGUF.

The file's tensors must be exactly the bytes Alloy decodes with (alloy.quant.quantize of the same
weights: the bytes gguf's own reference quantizer writes for Q8_0 / Q4_0 / Q4_1, tested in
test_quant_formats), typed as llama.cpp expects (token table and output matrix Q8_0, 1-d tensors
F32), and read back by the gguf package and by Alloy to the logits of those decoded weights.
(llama.cpp reading these files was checked by hand with its own tools — docs/INFERENCE.md; the
llama_cpp wheel's native build crashes on any quantized file on some VMs, and in a test that
crash would take the whole session with it.)
"""

from __future__ import annotations

import pytest
import torch

import alloy
from alloy import quant
from alloy.cli import main
from hf_cases import hf_model

gguf = pytest.importorskip("gguf")

CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
K_CONFIG = CONFIG | dict(hidden_size=256, intermediate_size=512)  # Q4_K's 256-weight super-blocks


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from bench.serve import byte_bpe

    def get(config):
        directory = tmp_path_factory.mktemp("hf")
        hf_model("llama", config | dict(bos_token_id=0, eos_token_id=1), seed=1).save_pretrained(directory)
        byte_bpe(config["vocab_size"])[0].save(str(directory / "tokenizer.json"))  # llama.cpp needs a vocabulary
        return directory
    return {"small": get(CONFIG), "wide": get(K_CONFIG)}


def _tensors(path):
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "q4_k"])
def test_quantized_export_writes_alloys_blocks(fmt, saved, tmp_path):
    directory = saved["wide" if fmt == "q4_k" else "small"]
    out = tmp_path / f"model-{fmt}.gguf"
    assert main(["export", str(directory), "--format", "gguf", "--dtype", fmt, "--out", str(out)]) == 0
    tensors = _tensors(out)
    model = alloy.load(directory)  # the same weights, Alloy's names
    want = {"token_embd.weight": (model.embed.tok.weight, "q8_0"), "output.weight": (model.head.weight, "q8_0"),
            "blk.1.ffn_down.weight": (model.layers["1"].mlp.down.weight, fmt),
            "blk.0.attn_v.weight": (model.layers["0"].attn.wv.weight, fmt)}  # (q and k rows are permuted for llama.cpp's RoPE)
    for name, (weight, expected) in want.items():
        t = tensors[name]
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, expected.upper()), name
        assert torch.equal(torch.from_numpy(t.data.copy()).view(torch.uint8).reshape(weight.shape[0], -1),
                           quant.quantize(weight, expected)), name
        # gguf's dequantizer reads the same floats Alloy decodes
        decoded = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(decoded.view(weight.shape), quant.dequantize(quant.quantize(weight, expected), expected))
    norms = [t for name, t in tensors.items() if name.endswith("_norm.weight")]
    assert norms and all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in norms)
    # Alloy reads the file back to the decoded weights' logits
    decoded_model = alloy.load(directory)
    with torch.no_grad():
        for name, module in decoded_model.named_modules():
            if isinstance(module, torch.nn.Linear):
                fmt_here = "q8_0" if name == "head" else fmt
                module.weight.copy_(quant.dequantize(quant.quantize(module.weight, fmt_here), fmt_here))
        table = decoded_model.embed.tok.weight
        table.copy_(quant.dequantize(quant.quantize(table, "q8_0"), "q8_0"))
        ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
        want_logits = decoded_model(ids)
        got = alloy.load(out)(ids)
    assert torch.allclose(got, want_logits, rtol=1e-5, atol=1e-5 * float(want_logits.abs().max()))


def test_bad_quantized_exports_are_one_line_and_write_nothing(saved, tmp_path, capsys):
    # Q4_K needs inputs in multiples of 256: the small model's 64 are refused before anything is written
    out = tmp_path / "bad.gguf"
    assert main(["export", str(saved["small"]), "--format", "gguf", "--dtype", "q4_k", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "256" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # block formats are GGUF's: ONNX refuses them by name
    assert main(["export", str(saved["small"]), "--format", "onnx", "--dtype", "q8_0", "--out",
                 str(tmp_path / "m.onnx")]) != 0
    assert "gguf" in capsys.readouterr().err
