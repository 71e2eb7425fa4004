"""GGUF in: `alloy.load(file.gguf)` gives the logits and tokens of the HF model the file came from.

Llama files come from `alloy export --format gguf`. The exporter writes only llama.cpp's "llama"
architecture, so files of the other families are written here, in llama.cpp's layout; where
transformers can read a GGUF itself, its logits must equal the HF model's too, so that a file
written here wrongly cannot pass just because the loader reads it back the same wrong way.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import alloy
from alloy.checkpoint.gguf_in import gguf_rules
from alloy.cli import main
from alloy.errors import CheckpointError, UnsupportedModelError
from hf_cases import SMALL

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS  # noqa: E402

TEXT = "Grüße, José! 日本語のテキスト 😀🎉  tabs\tand   runs\n\nof  spaces 1234567 naïve café ¿qué?"

# GGUF architecture -> (model_type, config): knobs a GGUF file can express (no Qwen sliding window,
# Gemma 2's query scale is head_dim ** -0.5). 300 tokens: room for a byte-level BPE with merges.
SMALL = SMALL | dict(vocab_size=300)
CASES = {
    "llama": ("llama", SMALL | dict(num_key_value_heads=2, rope_theta=5000.0)),
    "qwen2": ("qwen2", SMALL | dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # head_dim 128: transformers' GGUF reader takes Qwen3's default, not the file's key_length
    "qwen3": ("qwen3", SMALL | dict(num_key_value_heads=2, head_dim=128)),
    "gemma": ("gemma", SMALL | dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": ("gemma2", SMALL | dict(num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
                                      attn_logit_softcapping=3.0, final_logit_softcapping=2.0)),
    "phi3": ("phi3", SMALL | dict(num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0)),
    "gpt2": ("gpt2", dict(vocab_size=300, n_embd=32, n_layer=3, n_head=4, n_positions=64)),
}
# Families whose GGUF files transformers 5.18 reads (its loader has no Gemma 1), and the knobs its
# reader ignores in a file (it takes Gemma 2's query scale 256 and softcaps 50/30 and Phi-3's full
# rotary from its config defaults), set to those defaults for the cross-check.
TRANSFORMERS_READS = {"llama", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"}
TRANSFORMERS_DEFAULTS = {
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "phi3": dict(partial_rotary_factor=1.0),
}
# Llama with q/k/v/o biases (permuted rows of q and k biases too) and linear RoPE scaling:
# transformers' GGUF reader takes neither, so the HF model (and llama.cpp) are the references.
LLAMA_BIAS = ("llama", SMALL | dict(num_key_value_heads=2, attention_bias=True,
                                    rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)))


def build(arch: str, seed: int = 0, case=None):
    kind, kwargs = case or CASES[arch]
    config = transformers.AutoConfig.for_model(kind, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
            if arch == "gemma2" and ("q_proj" in name or "k_proj" in name):
                p.mul_(6.0)  # attention logits past the softcap
    return model.eval()


def byte_level_tokenizer(vocab_size: int):
    from alloy.train.data import train_tokenizer

    corpus = [TEXT, "the quick brown fox jumps over the lazy dog", "Grüße aus 日本 1234 café"] * 10
    return train_tokenizer(iter(corpus), vocab_size)


def write_gguf(model, path, arch: str, *, tokenizer=None, pre="default", quant=None, skip=(), raw_type=None,
               arch_name=None):
    """`model` (HF) as a GGUF file in llama.cpp's layout for `arch`. `quant`: a GGML type for the
    2-D weights whose rows split into whole blocks; `skip`: tensor names left out; `raw_type`:
    (tensor name, type) written as raw bytes of that type."""
    spec = model_spec(model)
    state = alloy_state(model)
    path.parent.mkdir(exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch_name or arch)
    key = lambda k: f"{arch_name or arch}.{k}"  # noqa: E731
    writer.add_uint32(key("context_length"), spec.max_seq_len)
    writer.add_uint32(key("embedding_length"), spec.hidden_size)
    writer.add_uint32(key("block_count"), spec.num_layers)
    writer.add_uint32(key("feed_forward_length"), spec.intermediate_size)
    writer.add_uint32(key("attention.head_count"), spec.num_heads)
    writer.add_uint32(key("vocab_size"), spec.vocab_size)
    if arch == "gpt2":
        writer.add_float32(key("attention.layer_norm_epsilon"), spec.norm_eps)
    else:
        writer.add_uint32(key("attention.head_count_kv"), spec.num_kv_heads)
        writer.add_uint32(key("attention.key_length"), spec.head_dim)
        writer.add_uint32(key("attention.value_length"), spec.head_dim)
        writer.add_float32(key("attention.layer_norm_rms_epsilon"), spec.norm_eps)
        writer.add_float32(key("rope.freq_base"), spec.rope_theta)
        writer.add_uint32(key("rope.dimension_count"), spec.rope_dim)
    if spec.rope_scaling == "linear":
        writer.add_string(key("rope.scaling.type"), "linear")
        writer.add_float32(key("rope.scaling.factor"), spec.rope_factor)
    if arch == "gemma2":
        writer.add_uint32(key("attention.sliding_window"), spec.sliding_window)
        writer.add_float32(key("attn_logit_softcapping"), spec.attn_softcap)
        writer.add_float32(key("final_logit_softcapping"), spec.final_softcap)
    tokenizer = tokenizer or byte_level_tokenizer(spec.vocab_size)
    write_byte_level_vocab(writer, tokenizer, spec.vocab_size, pre, spec.pad_token_id)
    for rule in gguf_rules(spec, arch):
        (name,) = rule.hf
        if name in skip:
            continue
        (tensor,) = rule.transform.save([state[o] for o in rule.ours], spec)
        data = tensor.detach().float().contiguous().numpy()
        if raw_type and name == raw_type[0]:
            block_bytes = gguf.GGML_QUANT_SIZES[raw_type[1]][1]
            writer.add_tensor(name, np.zeros(2 * block_bytes, np.uint8), raw_dtype=raw_type[1])
        elif quant is not None and data.ndim == 2 and data.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_byte_level_vocab(writer, tokenizer, vocab_size: int, pre: str, pad_token_id=None) -> None:
    data = json.loads(tokenizer.to_str())
    tokens = {i: t for t, i in data["model"]["vocab"].items()}
    special = {a["id"] for a in data["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([3 if i in special else 1 if i in tokens else 5 for i in range(vocab_size)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    if pad_token_id is not None:
        writer.add_pad_token_id(pad_token_id)


def model_spec(model):
    return alloy.ModelSpec.from_hf_config(model.config.to_dict())


def assert_same_knobs(from_gguf, from_hf) -> None:
    """Every ModelSpec knob read from the metadata equals the one read from config.json (floats
    to fp32 precision, as GGUF stores them; token ids aside: these files carry a test vocabulary)."""
    ours, theirs = from_gguf.to_dict(), from_hf.to_dict()
    for knob in ("bos_token_id", "eos_token_id", "pad_token_id", "attn_scale"):  # the scale via softmax_scale
        ours.pop(knob), theirs.pop(knob)
    assert ours.keys() == theirs.keys()
    for knob, value in theirs.items():
        assert ours[knob] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), knob
    assert from_gguf.softmax_scale == pytest.approx(from_hf.softmax_scale, rel=1e-6)


def alloy_state(model) -> dict[str, torch.Tensor]:
    """The HF model's weights under Alloy's names (through a saved folder, as users have them)."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return alloy.load(directory).state_dict()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
        return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module")
def exported_llama(tmp_path_factory):
    """An HF Llama folder with a byte-level tokenizer, and its `alloy export --format gguf` file."""
    directory = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    byte_level_tokenizer(300).save(str(directory / "tokenizer.json"))
    out = directory.parent / "llama.gguf"
    assert main(["export", str(directory), "--format", "gguf", "--out", str(out)]) == 0
    return model, directory, out


def test_exported_llama_round_trip_logits_tokens_and_transformers(exported_llama):
    hf, directory, path = exported_llama
    model = alloy.load(path)
    ids = torch.randint(0, 320, (2, 11))
    torch.testing.assert_close(logits(model, ids), logits(hf, ids), rtol=0, atol=1e-5)
    reference = alloy.load(directory).tokenizer
    assert model.tokenizer.encode(TEXT).ids == reference.encode(TEXT).ids
    assert model.tokenizer.decode(model.tokenizer.encode(TEXT).ids) == TEXT
    # transformers reads the same file to the same logits
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              attn_implementation="eager").eval()
    torch.testing.assert_close(logits(model, ids), logits(theirs, ids), rtol=0, atol=1e-5)


def test_a_stage_reads_only_its_layers_and_the_cli_takes_the_file(exported_llama, capsys):
    _, _, path = exported_llama
    whole = alloy.load(path)
    stage = alloy.load(path, layers=(1, 2), embed=False, head=True)
    assert set(stage.state_dict()) == {k for k in whole.state_dict() if k.startswith(("layers.1.", "norm", "head"))}
    assert main(["inspect", str(path), "--check"]) == 0
    assert "every tensor accounted for" in capsys.readouterr().out
    assert main(["generate", "--model", str(path), "--prompt", "the quick", "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize("arch", [*CASES, "llama-bias"])
def test_family_logits_equal_hf_and_transformers_gguf_reader(arch, tmp_path):
    hf = build("llama", case=LLAMA_BIAS) if arch == "llama-bias" else build(arch)
    cross_check = arch in TRANSFORMERS_READS
    arch = arch.removesuffix("-bias")
    path = write_gguf(hf, tmp_path / f"{arch}.gguf", arch)
    model = alloy.load(path)
    assert_same_knobs(model.spec, model_spec(hf))
    ids = torch.randint(0, 300, (2, 12))  # 12 > Gemma 2's window of 5
    want = logits(hf, ids)
    torch.testing.assert_close(logits(model, ids), want, rtol=0, atol=1e-5)
    if cross_check:
        if arch in TRANSFORMERS_DEFAULTS:
            kind, kwargs = CASES[arch]
            hf = build(arch, case=(kind, kwargs | TRANSFORMERS_DEFAULTS[arch]))
            path = write_gguf(hf, tmp_path / "defaults" / f"{arch}.gguf", arch)
            want = logits(hf, ids)
            torch.testing.assert_close(logits(alloy.load(path), ids), want, rtol=0, atol=1e-5)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              attn_implementation="eager").eval()
        torch.testing.assert_close(logits(theirs, ids), want, rtol=0, atol=1e-5)


def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's own logits for `ids` from the file (fp32 weights; it keeps some of its
    arithmetic in fp16, hence the looser tolerance where it is compared)."""
    llama_cpp = pytest.importorskip("llama_cpp")  # the `bench` extra builds it
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=64, n_threads=1)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]))


@pytest.mark.parametrize("arch", [*CASES, "llama-bias"])
def test_llama_cpp_reads_the_files_written_here_as_alloy_does(arch, tmp_path):
    """The reference implementation of the format agrees: these files are llama.cpp's layout."""
    hf = build("llama", case=LLAMA_BIAS) if arch == "llama-bias" else build(arch)
    path = write_gguf(hf, tmp_path / "model.gguf", arch.removesuffix("-bias"))
    ids = torch.randint(0, 300, (12,))
    theirs = llama_cpp_logits(path, ids.tolist())
    torch.testing.assert_close(theirs, logits(hf, ids[None])[0], rtol=0, atol=5e-3)
    torch.testing.assert_close(theirs, logits(alloy.load(path), ids[None])[0], rtol=0, atol=5e-3)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_quantized_tensors_load_as_their_dequantized_values(quant, tmp_path):
    qtype = gguf.GGMLQuantizationType[quant]
    hf = build("llama")
    path = write_gguf(hf, tmp_path / "q.gguf", "llama", quant=qtype)
    assert any(t.tensor_type == qtype for t in gguf.GGUFReader(path).tensors)
    model = alloy.load(path)
    reference = build("llama")
    with torch.no_grad():  # what the file holds: each whole-block 2-D weight rounded through the type
        for p in reference.parameters():  # blocks run along rows, so q/k's row permutation is moot
            if p.ndim == 2 and p.shape[1] % 32 == 0:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
    ids = torch.randint(0, 300, (2, 10))
    got = logits(model, ids)
    torch.testing.assert_close(got, logits(reference, ids), rtol=0, atol=1e-4)
    assert (got - logits(hf, ids)).abs().max() > 1e-4  # the rounding is real, so the check above is not vacuous


def _one_line_error(err) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_bad_files_are_refused_with_one_typed_line(exported_llama, tmp_path, capsys):
    _, _, good = exported_llama
    with pytest.raises(CheckpointError) as err:
        alloy.load(tmp_path / "absent.gguf")
    assert "no such GGUF file" in _one_line_error(err)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(CheckpointError) as err:
        alloy.load(truncated)
    assert "not a readable GGUF file" in _one_line_error(err)
    assert main(["inspect", str(truncated), "--check"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

    hf = build("llama")
    with pytest.raises(UnsupportedModelError) as err:
        alloy.load(write_gguf(hf, tmp_path / "mamba.gguf", "llama", arch_name="mamba"))
    assert "architecture 'mamba' is not supported" in _one_line_error(err)

    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *gguf.quants._type_traits}
    unreadable = next(t for t in gguf.GGMLQuantizationType if t not in readable)
    with pytest.raises(UnsupportedModelError) as err:
        alloy.load(write_gguf(hf, tmp_path / "type.gguf", "llama",
                              raw_type=("blk.0.ffn_down.weight", unreadable)))
    assert f"'blk.0.ffn_down.weight' has type {unreadable.name}" in _one_line_error(err)

    with pytest.raises(CheckpointError) as err:
        alloy.load(write_gguf(hf, tmp_path / "missing.gguf", "llama", skip={"blk.1.attn_v.weight"}))
    assert "missing blk.1.attn_v.weight" in _one_line_error(err)


def split_tokenizer(regex: str, vocab_size: int):
    """A byte-level BPE whose text is split by `regex` first, as Llama 3's and Qwen2's are."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT, "the quick brown fox 123 4567", "日本 café  x"] * 10, trainer=trainer)
    return tokenizer


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_pre_tokenizer_named_in_the_file_splits_as_the_original(pre, tmp_path):
    original = split_tokenizer(GGUF_PRE_TOKENIZER_SPLITS[pre], 300)  # transformers' copy of llama.cpp's regex
    hf = build("llama")
    named = alloy.load(write_gguf(hf, tmp_path / "named.gguf", "llama", tokenizer=original, pre=pre))
    ids = named.tokenizer.encode(TEXT, add_special_tokens=False).ids
    assert ids == original.encode(TEXT).ids and named.tokenizer.decode(ids) == TEXT
    # the pieces before BPE are the original's, and GPT-2's split (pre "default") would differ
    pieces = lambda tok: [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(TEXT)]  # noqa: E731
    assert pieces(named.tokenizer) == pieces(original)
    default = alloy.load(write_gguf(hf, tmp_path / "default.gguf", "llama", tokenizer=original))
    assert pieces(default.tokenizer) != pieces(original)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_tokens_equal_llama_cpps_for_the_pre_tokenizer_named(pre, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    original = byte_level_tokenizer(300) if pre == "gpt-2" else split_tokenizer(GGUF_PRE_TOKENIZER_SPLITS[pre], 300)
    path = write_gguf(build("llama"), tmp_path / "model.gguf", "llama", tokenizer=original, pre=pre)
    llm = llama_cpp.Llama(model_path=str(path), verbose=False, n_ctx=64)
    theirs = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    tokenizer = alloy.load(path).tokenizer
    assert tokenizer.encode(TEXT, add_special_tokens=False).ids == theirs == original.encode(TEXT).ids
    # BOS as llama.cpp adds it when the file does not say: for Llama 3's pre-tokenizer only
    assert tokenizer.encode(TEXT).ids == llm.tokenize(TEXT.encode(), add_bos=True, special=False)
    assert (tokenizer.encode(TEXT).ids[0] == 0) == (pre == "llama-bpe")


def sentencepiece_vocab():
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces with scores."""
    pieces = ["\u2581t", "he", "\u2581the", "\u2581a", "\u2581q", "ui", "ck", "\u2581qu", "\u2581quick", "\u2581c", "af",
              "\u2581caf", "\u2581caf\u00e9", "\u65e5\u672c"]
    # every character of a piece is a piece too, as SentencePiece's trainer guarantees
    pieces += sorted({c for piece in pieces for c in piece} | set("1234567890spr"))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def write_sentencepiece_gguf(tmp_path):
    """A Llama GGUF with a SentencePiece vocabulary ("llama" tokenizer model) and a chat template."""
    tokens, types, scores = sentencepiece_vocab()
    hf = build("llama")
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    spec = model_spec(hf)
    writer.add_context_length(spec.max_seq_len)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    # embeddings sized for the vocabulary; the rest of the tensors as the llama case writes them
    state = alloy_state(hf)
    for rule in gguf_rules(spec.replace(vocab_size=len(tokens)), "llama"):
        (name,) = rule.hf
        (tensor,) = rule.transform.save([state[o] for o in rule.ours], spec)
        if name in ("token_embd.weight", "output.weight"):
            tensor = torch.randn(len(tokens), spec.hidden_size)
        writer.add_tensor(name, tensor.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_vocab_matches_transformers_gguf_tokenizer(tmp_path):
    path = write_sentencepiece_gguf(tmp_path)
    model = alloy.load(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in [TEXT, "the quick café", " leading space", "日本 12"]:
        ours = model.tokenizer.encode(text, add_special_tokens=False).ids
        assert ours == theirs(text, add_special_tokens=False)["input_ids"], text
        assert model.tokenizer.decode(ours) == theirs.decode(ours)
    # llama.cpp adds BOS to a SentencePiece vocabulary unless tokenizer.ggml.add_bos_token says not
    assert model.tokenizer.encode("the").ids[0] == 1
    from alloy.infer.tokenize import apply_chat_template, eos_ids

    assert apply_chat_template(model, [{"role": "user", "content": "hi"}]) == "<s>hi</s>"
    assert eos_ids(model) == {2}


def test_sentencepiece_tokens_equal_llama_cpps(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = write_sentencepiece_gguf(tmp_path)
    llm = llama_cpp.Llama(model_path=str(path), verbose=False, n_ctx=64)
    tokenizer = alloy.load(path).tokenizer
    for text in [TEXT, "the quick café", "日本 12"]:
        assert tokenizer.encode(text).ids == llm.tokenize(text.encode(), add_bos=True, special=False), text


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_files_load_in_their_precision(exported_llama, dtype, tmp_path):
    hf, directory, _ = exported_llama
    path = tmp_path / f"{dtype}.gguf"
    assert main(["export", str(directory), "--format", "gguf", "--dtype", dtype, "--out", str(path)]) == 0
    model = alloy.load(path)
    want_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert {p.dtype for p in model.parameters()} == {want_dtype}
    reference = alloy.load(directory, dtype=dtype)  # the same weights rounded the same way
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


# ---- Gemma 3 ----------------------------------------------------------------------------------
# What a Gemma 3 GGUF can say, as llama.cpp's converter writes it: the sliding window and the full
# layers' RoPE (base, linear scaling) and final softcap. Fixed by llama.cpp, so set here to match:
# 5 sliding : 1 full (7 layers: one full), sliding base 10k, query scale head_dim ** -0.5.
GEMMA3 = ("gemma3_text", SMALL | dict(num_key_value_heads=2, head_dim=16, num_hidden_layers=7, sliding_window=5,
                                      query_pre_attn_scalar=16, final_logit_softcapping=2.0, rope_parameters=dict(
    full_attention=dict(rope_type="linear", factor=2.0, rope_theta=5000.0),
    sliding_attention=dict(rope_type="default", rope_theta=10000.0))))


def write_gemma3_gguf(model, path, pattern=None):
    """`model` (HF Gemma 3) in llama.cpp's layout: every "*norm.weight" stored as 1 + w, QK-norm too.
    `pattern`: an `attention.sliding_window_pattern` to write (llama.cpp's converter writes none)."""
    spec = model_spec(model)
    state = alloy_state(model)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(spec.max_seq_len)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(spec.rope_factor)
    writer.add_final_logit_softcapping(spec.final_softcap)
    writer.add_sliding_window(spec.sliding_window)
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern)
    write_byte_level_vocab(writer, byte_level_tokenizer(spec.vocab_size), spec.vocab_size, "default")
    for rule in gguf_rules(spec, "gemma3"):
        (name,) = rule.hf
        (tensor,) = rule.transform.save([state[o] for o in rule.ours], spec)
        writer.add_tensor(name, tensor.detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gemma3_logits_equal_hf_and_llama_cpps(tmp_path):
    hf = build("gemma3", case=GEMMA3)
    path = write_gemma3_gguf(hf, tmp_path / "gemma3.gguf")
    model = alloy.load(path)
    assert_same_knobs(model.spec, model_spec(hf))
    assert model.spec.layer_types == ("sliding",) * 5 + ("full", "sliding") and model.spec.rope_local_theta == 10000.0
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
    ids = torch.randint(0, 300, (2, 12))  # 12 > the window of 5
    want = logits(hf, ids)
    torch.testing.assert_close(logits(model, ids), want, rtol=0, atol=1e-5)
    # QK-norm's + 1 matters: read back without it, the logits move
    plain = alloy.Transformer(model.spec).eval()
    state = model.state_dict()
    qk_norms = {k: v + 1 for k, v in state.items() if k.endswith(("q_norm.weight", "k_norm.weight"))}
    plain.load_state_dict(state | qk_norms)
    assert (logits(plain, ids) - want).abs().max() > 1e-3
    # llama.cpp reads the file to the same logits
    theirs = llama_cpp_logits(path, ids[0].tolist())
    torch.testing.assert_close(theirs, want[0], rtol=0, atol=5e-3)


def test_gemma3_sliding_pattern_in_the_file_is_read_and_a_bad_one_refused(tmp_path):
    hf = build("gemma3", case=GEMMA3)
    flags = [False, True, True, False, True, True, True]
    spec = alloy.load(write_gemma3_gguf(hf, tmp_path / "flags.gguf", pattern=flags)).spec
    assert spec.layer_types == tuple("sliding" if f else "full" for f in flags)
    spec = alloy.load(write_gemma3_gguf(hf, tmp_path / "period.gguf", pattern=3)).spec
    assert spec.layer_types == ("sliding", "sliding", "full") * 2 + ("sliding",)
    with pytest.raises(CheckpointError) as err:
        alloy.load(write_gemma3_gguf(hf, tmp_path / "bad.gguf", pattern=0))
    assert "sliding_window_pattern' must be a period >= 1 or 7 per-layer flags, got 0" in _one_line_error(err)
