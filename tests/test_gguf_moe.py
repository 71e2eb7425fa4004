"""GGUF for the mixtures of experts -- Mixtral (llama.cpp's "llama" with experts), Qwen3-MoE
("qwen3moe"), OLMoE ("olmoe") -- and GPT-NeoX ("gptneox").

tests/test_gguf_roundtrip.py takes each family HF -> `alloy export --format gguf` -> `alloy.load`
(the HF logits and tokens) and through llama.cpp itself. Here: the file holds what llama.cpp's
converter would write from the same checkpoint (names from the `gguf` package's own HF -> GGUF
map, experts stacked per layer, Mixtral's q/k permuted, GPT-NeoX's q|k|v un-interleaved), every
spec knob reads back as config.json says, a layer range or an expert rank reads only its own
tensors, and what llama.cpp cannot express is refused in one line, on the way out and in.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
import torch

import alloy
from alloy.cli import main
from alloy.errors import CheckpointError, UnsupportedModelError
from alloy.fuse.gguf import export_gguf
from hf_cases import SMALL, hf_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

VOCAB = 300  # room for a byte-level BPE
SMALL = SMALL | dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
# family -> (config, llama.cpp architecture): the shapes of the published checkpoints
CASES = {
    "mixtral": (SMALL | dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), "llama"),
    "qwen3_moe": (SMALL | dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                               norm_topk_prob=True, moe_intermediate_size=24), "qwen3moe"),
    "olmoe": (SMALL | dict(num_key_value_heads=4, num_experts=4, num_experts_per_tok=3, norm_topk_prob=False),
              "olmoe"),
    "gpt_neox": (SMALL | dict(rotary_pct=0.25, use_parallel_residual=True), "gptneox"),
}
TEXT = "the quick brown fox jumps over the lazy dog 1234, café"


def build(family: str, **changes):
    return hf_model(family, CASES[family][0] | changes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (HF model, its folder with a byte-level tokenizer, the exported .gguf)."""
    from alloy.train.data import train_tokenizer

    cache = {}

    def get(family: str):
        if family not in cache:
            directory = tmp_path_factory.mktemp(family)
            hf = build(family)
            hf.save_pretrained(directory)
            train_tokenizer(iter([TEXT] * 20), VOCAB).save(str(directory / "tokenizer.json"))
            out = tmp_path_factory.mktemp("gguf") / f"{family}.gguf"
            assert main(["export", str(directory), "--format", "gguf", "--out", str(out)]) == 0
            cache[family] = hf, directory, out
        return cache[family]

    return get


def converter_tensors(directory, family: str) -> dict[str, torch.Tensor]:
    """The tensors llama.cpp's convert_hf_to_gguf.py writes from the saved checkpoint: names by
    the gguf package's TensorNameMap (its map_tensor_name), each layer's experts stacked under the
    merged name it maps (LlamaModel / Qwen2MoeModel / OlmoeModel.modify_tensors), Llama's q/k rows
    permuted (LlamaModel.permute) and GPT-NeoX's per-head q|k|v regrouped (GPTNeoXModel)."""
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE, "olmoe": gguf.MODEL_ARCH.OLMOE,
            "gptneox": gguf.MODEL_ARCH.GPTNEOX}[CASES[family][1]]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    out, experts = {}, defaultdict(dict)
    for name, t in load_file(directory / "model.safetensors").items():
        expert = re.fullmatch(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight", name)
        if expert:
            experts[int(expert[1]), expert[3]][int(expert[2])] = t
            continue
        if family == "mixtral" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if name.endswith("q_proj.weight") else kv_heads
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        if family == "gpt_neox" and "query_key_value" in name:
            t = t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = t
    for (layer, which), by_expert in experts.items():
        merged = (f"layers.{layer}.feed_forward.experts.{which}.weight" if family == "mixtral"
                  else f"model.layers.{layer}.mlp.experts.{which}.weight")
        out[names.get_name(merged, try_suffixes=(".weight",))] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def field(reader, key):
    value = reader.get_field(key)
    return None if value is None else value.contents()


@pytest.mark.parametrize("family", CASES)
def test_the_file_holds_what_llama_cpps_converter_writes(family, exported):
    _, directory, path = exported(family)
    reader = gguf.GGUFReader(path)
    arch = CASES[family][1]
    assert field(reader, "general.architecture") == arch
    want = converter_tensors(directory, family)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert list(got[name].shape) == list(reversed(tensor.shape)), name  # GGUF lists dims fastest first
        torch.testing.assert_close(torch.from_numpy(got[name].data.copy()), tensor, rtol=0, atol=0, msg=name)
    config = json.loads((directory / "config.json").read_text())
    key = lambda k: field(reader, k.format(arch=arch))  # noqa: E731
    if family == "gpt_neox":
        assert key(gguf.Keys.LLM.USE_PARALLEL_RESIDUAL) is True
        assert key(gguf.Keys.Rope.DIMENSION_COUNT) == 2  # a quarter of head_dim 8
        assert key(gguf.Keys.Attention.LAYERNORM_EPS) == pytest.approx(config["layer_norm_eps"])
        assert key(gguf.Keys.Attention.LAYERNORM_RMS_EPS) is None
        return
    assert key(gguf.Keys.LLM.EXPERT_COUNT) == 4
    assert key(gguf.Keys.LLM.EXPERT_USED_COUNT) == config["num_experts_per_tok"]
    assert key(gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH) == (24 if family == "qwen3_moe" else None)
    assert key(gguf.Keys.LLM.FEED_FORWARD_LENGTH) == 48


@pytest.mark.parametrize("family", CASES)
def test_every_knob_reads_back_as_config_json_says(family, exported):
    hf, _, path = exported(family)
    ours = alloy.load(path)
    theirs = alloy.ModelSpec.from_hf_config(hf.config.to_dict())
    got, want = ours.spec.to_dict(), theirs.to_dict()
    for knob, value in want.items():
        assert got[knob] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), knob
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)


def _reads(monkeypatch) -> list[str]:
    """The names of the GGUF tensors read from here on."""
    from alloy.checkpoint.gguf_in import GGUFSource

    names, get = [], GGUFSource.get
    monkeypatch.setattr(GGUFSource, "get", lambda self, name: names.append(name) or get(self, name))
    return names


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_a_layer_range_reads_only_its_own_experts(family, exported, monkeypatch):
    from alloy.infer.load import load_experts, load_for_decoding

    hf, _, path = exported(family)
    whole = alloy.load(path)
    reads = _reads(monkeypatch)
    stage = alloy.load(path, layers=(1, 2), embed=False, head=False)
    assert set(stage.state_dict()) == {k for k in whole.state_dict() if k.startswith("layers.1.")}
    assert reads and all(name.startswith("blk.1.") for name in reads)
    for name, tensor in stage.state_dict().items():
        assert torch.equal(tensor, whole.state_dict()[name]), name
    # an expert rank reads the router and experts of its layers, nothing else ...
    reads.clear()
    experts = load_experts(path, (1, 3))
    assert sorted(experts) == ["1", "2"]
    assert sorted(reads) == sorted(f"blk.{i}.ffn_{t}.weight" for i in (1, 2)
                                   for t in ("gate_inp", "gate_exps", "up_exps", "down_exps"))
    # ... and the stage beside it never reads them
    reads.clear()
    load_for_decoding(path, layers=(0, 3), stand_ins={f"layers.{i}.mlp": torch.nn.Identity() for i in (1, 2)})
    assert reads and not any(re.match(r"blk\.[12]\.ffn_(gate_inp|\w+_exps)", name) for name in reads)


@pytest.mark.parametrize("family", ["mixtral", "gpt_neox"])
def test_the_cli_generates_from_the_file_as_from_the_folder(family, exported, capsys):
    _, directory, path = exported(family)
    capsys.readouterr()
    outputs = []
    for model in (directory, path):
        assert main(["generate", "--model", str(model), "--prompt", "the quick", "--max-new-tokens", "4",
                     "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert outputs[0] == outputs[1]



def requantized(path, out, qtype):
    """The GGUF file `path` copied to `out` with each weight whose rows split into whole blocks
    stored as `qtype` (3-D stacked experts included), as llama.cpp's llama-quantize would."""
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(out), field(reader, "general.architecture"))
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = f.types[1] if len(f.types) > 1 else None
        writer.add_key_value(name, f.contents(), f.types[0], sub)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for t in reader.tensors:
        data = t.data.copy()
        if data.ndim >= 2 and data.shape[-1] % block == 0:
            writer.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_neox"])
def test_a_q8_0_file_loads_as_its_dequantized_values(family, exported, tmp_path):
    hf, _, path = exported(family)
    qtype = gguf.GGMLQuantizationType.Q8_0
    quantized = requantized(path, tmp_path / "q8_0.gguf", qtype)
    stacked = [t for t in gguf.GGUFReader(quantized).tensors if t.tensor_type == qtype and len(t.shape) == 3]
    assert bool(stacked) == (family != "gpt_neox")  # the experts, blocks along each expert's rows
    model, exact = alloy.load(quantized), alloy.load(path)
    for name, tensor in exact.state_dict().items():
        want = tensor
        if tensor.ndim == 2 and tensor.shape[1] % 32 == 0:
            want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype))
        torch.testing.assert_close(model.state_dict()[name], want, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(model.state_dict()[n], t) for n, t in exact.state_dict().items())

# ---- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family, changes, message", [
    # models/qwen3moe.cpp always renormalises the chosen experts' weights, and has experts on every layer
    ("qwen3_moe", dict(norm_topk_prob=False), "cannot express router_renormalize=False, norm_topk_prob in config"),
    ("qwen3_moe", dict(mlp_only_layers=[1]), r"cannot express dense_layers=\(1,\), mlp_only_layers"),
    # models/olmoe.cpp never renormalises, and sizes k_norm as n_embd
    ("olmoe", dict(norm_topk_prob=True), "cannot express router_renormalize=True, norm_topk_prob in config"),
    ("olmoe", dict(num_key_value_heads=2), "cannot express num_key_value_heads=2 with 4 query heads"),
    # llama.cpp's "llama" has no sliding window
    ("mixtral", dict(sliding_window=5), "'llama' architecture, which cannot express layer_types="),
    # models/gptneox.cpp: biases required, an `output` tensor, GELU
    ("gpt_neox", dict(attention_bias=False), "cannot express qkv_bias=False, attention_bias in config"),
    ("gpt_neox", dict(tie_word_embeddings=True), "cannot express tie_embeddings=True"),
    ("gpt_neox", dict(hidden_act="relu"), "cannot express activation='relu'"),
])
def test_what_llama_cpp_cannot_express_is_refused_in_one_line(family, changes, message, tmp_path, capsys):
    directory = tmp_path / "model"
    build(family, **changes).save_pretrained(directory)
    with pytest.raises(UnsupportedModelError, match=message):
        export_gguf(directory, tmp_path / "m.gguf")
    capsys.readouterr()
    assert main(["export", str(directory), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and re.search(message, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _export_with(family, tmp_path, monkeypatch, **writer_methods):
    """`family` exported with some of GGUFWriter's methods replaced: a file llama.cpp's converter
    would not write."""
    directory = tmp_path / "model"
    build(family).save_pretrained(directory)
    with monkeypatch.context() as patched:
        for name, method in writer_methods.items():
            patched.setattr(gguf.GGUFWriter, name, method)
        return export_gguf(directory, tmp_path / "m.gguf")


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_file_llama_cpp_would_read_otherwise_is_refused_in_one_line(tmp_path, monkeypatch):
    count = gguf.GGUFWriter.add_expert_count
    # metadata that says 3 experts over tensors that stack 4
    path = _export_with("mixtral", tmp_path / "a", monkeypatch, add_expert_count=lambda self, n: count(self, n - 1))
    with pytest.raises(CheckpointError) as err:
        alloy.load(path)
    assert "blk.0.ffn_gate_inp.weight' has shape [4, 32]; the config implies [3, 32]" in _one_line(err)
    # a qwen3moe file without its expert count: llama.cpp refuses it too
    path = _export_with("qwen3_moe", tmp_path / "b", monkeypatch, add_expert_count=lambda self, n: None)
    with pytest.raises(CheckpointError) as err:
        alloy.load(path)
    assert "GGUF metadata lacks 'qwen3moe.expert_count'" in _one_line(err)
    # routing llama.cpp would run differently from Alloy's softmax
    used = gguf.GGUFWriter.add_expert_used_count

    def sigmoid(self, n):
        used(self, n)
        self.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)

    path = _export_with("olmoe", tmp_path / "c", monkeypatch, add_expert_used_count=sigmoid)
    with pytest.raises(UnsupportedModelError) as err:
        alloy.load(path)
    assert "'olmoe.expert_gating_func' is 2; supported: 1 (softmax)" in _one_line(err)


def test_the_reader_does_not_import_the_exporter():
    """alloy.checkpoint reads checkpoints and alloy.fuse writes them: fuse may import checkpoint (the
    GGUF names and layouts in alloy/checkpoint/gguf_names.py), never the other way round."""
    import ast
    from pathlib import Path

    for file in sorted((Path(alloy.__file__).parent / "checkpoint").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):  # `from alloy import fuse` too
                modules = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not [m for m in modules if m == "alloy.fuse" or m.startswith("alloy.fuse.")], \
                f"{file.name}:{node.lineno} imports {modules}"
