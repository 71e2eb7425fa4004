"""HF -> `alloy export --format gguf` -> `alloy.load(gguf)`: the same logits as transformers (fp32,
1e-5) and the same ids as the HF tokenizer for a multilingual text, family by family; llama.cpp
itself reads every file to the same logits and ids (the reference for the layout: a file written
wrongly cannot pass by being read back the same wrong way).

Each family gets the kind of tokenizer it ships: Llama 3's byte-level BPE (llama-bpe), Qwen's
(qwen2, NFC; Qwen3-MoE too), GPT-2's (OLMoE's and GPT-NeoX's are GPT-2-style), and
SentencePiece-style BPE with byte fallback (Gemma without a prefix space, Phi-3 and Mixtral with
one). The mixtures of experts (Mixtral as llama.cpp's "llama", Qwen3-MoE, OLMoE) and GPT-NeoX have
more checks of their own in tests/test_gguf_moe.py. Families whose file Alloy's reader cannot read
yet are strict xfails that name what the reader lacks; llama.cpp still checks their files.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

import alloy
from alloy.cli import main
from alloy.errors import UnsupportedModelError
from alloy.fuse.gguf import CHKTXT, chkhsh, pre_tokenizer_name
from hf_cases import build_hf, hf_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 Съешь же ещё этих мягких "
        "французских булок! 🦊🚀✨ def area(r):\n    return 3.14159 * r ** 2  # café, naïve\n\n\tdone")
# Trained on text without the emoji and some of the Chinese: those go through bytes.
CORPUS = ["The quick brown fox jumps over the lazy dog.", "敏捷的棕色狐狸", "Съешь же ещё этих мягких французских булок",
          "def area(r):\n    return 3.14159 * r ** 2  # café, naïve",
          "the dog and the fox, the end.\n\n\tdone"] * 8
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Привет, 世界!"}]
VOCAB = 512
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
GEMMA_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)  # <pad> <eos> <bos> <unk>, as Gemma orders them
LLAMA2_IDS = dict(pad_token_id=None, bos_token_id=1, eos_token_id=2)  # <unk> <s> </s>, as Llama 2 and Phi-3

# name -> (model_type, config, tokenizer kind, chat template file or None)
FAMILIES = {
    "llama3": ("llama", BASE | dict(num_key_value_heads=2, bos_token_id=0, eos_token_id=1, rope_parameters=dict(
        # wavelengths 6.3, 63, 628, 6283 over an original 64: one kept, one on the ramp, two slowed
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)), "llama-bpe", "tokenizer_config.json"),
    "llama-bias-linear": ("llama", BASE | dict(num_key_value_heads=2, attention_bias=True, bos_token_id=0,
                                               eos_token_id=0, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0)), "gpt-2", None),
    "qwen2": ("qwen2", BASE | dict(num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2),
              "qwen2", "chat_template.jinja"),
    "qwen3": ("qwen3", BASE | dict(num_key_value_heads=2, head_dim=16, bos_token_id=0, eos_token_id=2), "qwen2",
              "tokenizer_config.json"),
    "gemma": ("gemma", BASE | dict(num_key_value_heads=1, head_dim=16, **GEMMA_IDS), "spm-gemma",
              "tokenizer_config.json"),
    "gemma2": ("gemma2", BASE | dict(num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
                                     attn_logit_softcapping=3.0, final_logit_softcapping=2.0, **GEMMA_IDS),
               "spm-gemma", None),
    # Gemma 3's own layout: five sliding layers then one full, sliding layers on base 10k, full ones
    # on 1M scaled linearly
    "gemma3": ("gemma3_text", BASE | dict(num_hidden_layers=6, num_key_value_heads=2, head_dim=16, sliding_window=5,
                                          query_pre_attn_scalar=16, final_logit_softcapping=2.0, rope_parameters=dict(
        full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1_000_000.0),
        sliding_attention=dict(rope_type="default", rope_theta=10000.0)), **GEMMA_IDS), "spm-gemma",
        "tokenizer_config.json"),
    # ... and another: layers full, sliding, sliding (no period: one flag per layer), sliding ones
    # on base 100 (the file says both)
    "gemma3-pattern": ("gemma3_text", BASE | dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                                                  sliding_window=5, query_pre_attn_scalar=16, layer_types=[
        "full_attention", "sliding_attention", "sliding_attention"], rope_parameters=dict(
        full_attention=dict(rope_type="default", rope_theta=1_000_000.0),
        sliding_attention=dict(rope_type="default", rope_theta=100.0)), **GEMMA_IDS), "spm-gemma", None),
    "phi3": ("phi3", BASE | dict(num_key_value_heads=2, partial_rotary_factor=0.5, **LLAMA2_IDS), "spm-llama",
             "tokenizer_config.json"),
    # 12 tokens and llama.cpp's context (padded to 256) stay within the original 256: the short factors
    "phi3-longrope": ("phi3", BASE | dict(num_key_value_heads=2, max_position_embeddings=512,
                                          original_max_position_embeddings=256, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.3, 1.6, 1.9], long_factor=[2.0, 3.5, 5.0, 6.5]),
        **LLAMA2_IDS), "spm-llama", None),
    # Mixtral: llama.cpp's "llama" with experts (the top 2 of 4, renormalised), Llama 2's vocabulary
    "mixtral": ("mixtral", BASE | dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **LLAMA2_IDS),
                "spm-llama", "tokenizer_config.json"),
    # experts narrower than the dense width (expert_feed_forward_length), top 2 of 4 renormalised
    "qwen3-moe": ("qwen3_moe", BASE | dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           norm_topk_prob=True, moe_intermediate_size=24, bos_token_id=0,
                                           eos_token_id=2), "qwen2", "chat_template.jinja"),
    # top 2 of 4 not renormalised, q and k normed over all heads at once
    "olmoe": ("olmoe", BASE | dict(num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                   rope_theta=5000.0, bos_token_id=0, eos_token_id=0, pad_token_id=0), "gpt-2", None),
    # Pythia's shape: parallel residual, a quarter of each head rotated; and the sequential form
    "gpt-neox": ("gpt_neox", BASE | dict(rotary_pct=0.25, use_parallel_residual=True, bos_token_id=0, eos_token_id=0),
                 "gpt-2", None),
    "gpt-neox-sequential": ("gpt_neox", BASE | dict(rotary_pct=0.5, rotary_emb_base=5000.0, use_parallel_residual=False,
                                                    layer_norm_eps=1e-6, bos_token_id=0, eos_token_id=0),
                            "gpt-2", None),
}
SOFTCAPPED = {"gemma2"}
# What alloy/checkpoint/gguf_in.py does not read yet; each xfail is strict, so it fails once the
# reader catches up and the mark must go.
READER_LACKS: dict[str, tuple[type[Exception], str]] = {}
TEMPLATES = {
    "llama-bpe": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "qwen2": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "spm": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
           "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
}


def family_params(names):
    return [pytest.param(n, marks=pytest.mark.xfail(raises=READER_LACKS[n][0], strict=True,
                                                    reason=f"gguf_in.py lacks {READER_LACKS[n][1]}"))
            if n in READER_LACKS else n for n in names]


# ---- tokenizers of each kind ----------------------------------------------------------------

def byte_level_tokenizer(kind: str):
    """Llama 3's (split regex, ignore_merges, BOS added), Qwen2's (its regex, NFC) or GPT-2's shape."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = {"llama-bpe": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "gpt-2": ["<|endoftext|>"]}[kind]
    tokenizer = Tokenizer(models.BPE())
    if kind == "gpt-2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # transformers' copy of llama.cpp's regex, as the real tokenizer.json files hold it
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[kind]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if kind == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    if kind == "llama-bpe":
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B", special_tokens=[(specials[0], 0)])
        data = json.loads(tokenizer.to_str())
        data["model"]["ignore_merges"] = True
        tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer, specials


def sentencepiece_tokenizer(kind: str):
    """A SentencePiece-style BPE as transformers converts one: special tokens, 256 byte tokens,
    then pieces trained within words; spaces as "▁". Gemma's: <pad> <eos> <bos> <unk> first, no
    prefix space. Llama 2's and Phi-3's: <unk> <s> </s> first, "▁" prepended, <|endoftext|> added
    last (llama.cpp marks these four by name in a model called Phi-3)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    prefix = kind == "spm-llama"
    specials = ["<unk>", "<s>", "</s>"] if prefix else ["<pad>", "<eos>", "<bos>", "<unk>"]
    normalizer = (normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]) if prefix
                  else normalizers.Replace(" ", "▁"))
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.normalizer = normalizer
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer_tokenizer.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=240, show_progress=False))
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in trained["merges"]], unk_token="<unk>",
                                     fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizer
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    added = specials + (["<|endoftext|>"] if prefix else [])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in added])
    bos = specials[1] if prefix else specials[2]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                             special_tokens=[(bos, vocab[bos])])
    return tokenizer, specials


def save_tokenizer(directory, kind: str, template_file: str | None) -> None:
    if kind.startswith("spm"):
        tokenizer, specials = sentencepiece_tokenizer(kind)
        template, bos, eos = TEMPLATES["spm"], *(("<s>", "</s>") if kind == "spm-llama" else ("<bos>", "<eos>"))
    else:
        tokenizer, specials = byte_level_tokenizer(kind)
        template, bos, eos = TEMPLATES.get(kind), specials[0], specials[-1]
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}
    if template_file == "tokenizer_config.json":
        config["chat_template"] = template
    elif template_file == "chat_template.jinja":
        (directory / "chat_template.jinja").write_text(template)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def build(name: str):
    kind, kwargs, _, _ = FAMILIES[name]
    return hf_model(kind, kwargs, sharp_attention=name in SOFTCAPPED)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (HF model, its folder, the exported .gguf), built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            directory = tmp_path_factory.mktemp(name)
            hf = build(name)
            hf.save_pretrained(directory)
            save_tokenizer(directory, FAMILIES[name][2], FAMILIES[name][3])
            out = directory.parent / f"{name}.gguf"
            if main(["export", str(directory), "--format", "gguf", "--out", str(out)]) != 0:
                pytest.fail(f"alloy export {name} failed")  # not an AssertionError: no xfail takes it
            cache[name] = hf, directory, out
        return cache[name]

    return get


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def field(path, key):
    value = gguf.GGUFReader(path).get_field(key)
    return None if value is None else value.contents()


# ---- the round trip ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", family_params(FAMILIES))
def test_export_then_load_gives_hf_logits_and_tokens(name, exported):
    hf, directory, path = exported(name)
    kind = FAMILIES[name][2]
    # what the file says about its tokenizer
    assert field(path, "tokenizer.ggml.pre") == ("default" if kind.startswith("spm") else kind)
    assert field(path, "tokenizer.ggml.model") == ("llama" if kind.startswith("spm") else "gpt2")
    assert field(path, "tokenizer.ggml.add_bos_token") == (kind not in ("qwen2", "gpt-2"))
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    template = FAMILIES[name][3]
    assert field(path, "tokenizer.chat_template") == (TEMPLATES["spm" if kind.startswith("spm") else kind]
                                                      if template else None)
    model = alloy.load(path)
    ids = torch.randint(0, VOCAB, (2, 12))  # 12 > the sliding window of 5
    torch.testing.assert_close(model(ids), hf_logits(hf, ids), rtol=0, atol=1e-5)
    want = reference(TEXT)["input_ids"]
    assert model.tokenizer.encode(TEXT).ids == want
    assert model.tokenizer.decode(want, skip_special_tokens=True) == reference.decode(want, skip_special_tokens=True)
    if template:
        from alloy.infer.tokenize import apply_chat_template

        assert apply_chat_template(model, MESSAGES) == reference.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_llama_cpp_reads_each_export_as_transformers_does(name, exported):
    """llama.cpp's logits (fp32 weights; it keeps some arithmetic in fp16, hence 5e-3) and ids."""
    llama_cpp = pytest.importorskip("llama_cpp")  # the `bench` extra builds it
    hf, directory, path = exported(name)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=32, n_threads=1)
    ids = torch.randint(0, VOCAB, (12,))
    llm.eval(ids.tolist())
    theirs = torch.tensor(llm.scores[:12])
    torch.testing.assert_close(theirs, hf_logits(hf, ids[None])[0], rtol=0, atol=5e-3)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == reference(TEXT)["input_ids"]


def test_llama3_rope_factors_are_llama_cpps_divisors(exported):
    """rope_freqs holds, per frequency, HF's inverse frequency over Llama 3's scaled one."""
    hf, _, path = exported("llama3")
    (tensor,) = [t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    divisors = torch.tensor(tensor.data)
    rotary = hf.model.rotary_emb
    plain = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    torch.testing.assert_close(divisors.double(), plain / rotary.inv_freq.double(), rtol=1e-6, atol=0)
    assert divisors[0] == 1 and divisors[-1] == 8 and 1 < divisors[1] < 8  # kept, on the ramp, slowed


def test_longrope_factors_are_the_configs(exported):
    _, directory, path = exported("phi3-longrope")
    params = json.loads((directory / "config.json").read_text())["rope_parameters"]
    tensors = {t.name: t.data.tolist() for t in gguf.GGUFReader(path).tensors}
    assert tensors["rope_factors_short.weight"] == pytest.approx(params["short_factor"])
    assert tensors["rope_factors_long.weight"] == pytest.approx(params["long_factor"])
    assert field(path, "phi3.rope.scaling.original_context_length") == 256
    assert field(path, "phi3.rope.scaling.attn_factor") == pytest.approx((1 + math.log(2) / math.log(256)) ** 0.5)


# ---- pre-tokenizer names ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama-bpe", "qwen2", "gpt-2"])
def test_chkhsh_is_the_hash_llama_cpps_converter_computes(kind, tmp_path):
    """llama.cpp hashes AutoTokenizer's ids (BOS included) for its fixed text; so does the exporter."""
    save_tokenizer(tmp_path, kind, None)
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path).encode(CHKTXT)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert chkhsh(data) == hashlib.sha256(str(ids).encode()).hexdigest()


def test_a_known_hash_names_the_pre_tokenizer_before_the_regex_does(tmp_path, monkeypatch):
    save_tokenizer(tmp_path, "gpt-2", None)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert pre_tokenizer_name(data, tmp_path) == "gpt-2"  # by its split
    monkeypatch.setitem(alloy.fuse.gguf.KNOWN_CHKHSH, chkhsh(data), "qwen2")
    assert pre_tokenizer_name(data, tmp_path) == "qwen2"  # llama.cpp's table wins, as in its converter


@pytest.mark.parametrize("kind, change, what", [
    ("gpt-2", lambda d: d["pre_tokenizer"].update(add_prefix_space=True), "pre_tokenizer"),
    ("llama-bpe", lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\s+|\S+"),
     "pre_tokenizer"),
    ("llama-bpe", lambda d: d.update(normalizer={"type": "NFKC"}), "normalizer NFKC"),
])
def test_a_pre_tokenizer_llama_cpp_does_not_know_is_written_as_default_with_a_warning(kind, change, what, tmp_path):
    save_tokenizer(tmp_path, kind, None)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    change(data)
    with pytest.warns(UserWarning, match=f"llama.cpp does not know .*{what}"):
        assert pre_tokenizer_name(data, tmp_path) == "default"


# ---- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("olmo2", "does not support model family 'olmo2'"),
    ("neox-sequential-tied", "'gptneox' architecture, which cannot express tie_embeddings=True"),
    # llama.cpp's qwen3moe has experts on every layer; hf_cases' has a dense one (mlp_only_layers)
    ("qwen3-moe", r"'qwen3moe' architecture, which cannot express dense_layers=\(1,\), mlp_only_layers"),
    # llama.cpp's olmoe sizes k_norm as n_embd: no fewer key/value heads than query heads
    ("olmoe", "'olmoe' architecture cannot express num_key_value_heads=2 with 4 query heads"),
    ("qwen2-bias-sliding", "'qwen2' architecture, which cannot express layer_types="),
    ("gemma2-softcap-sliding", r"cannot express attn_scale=0.204124 \(query_pre_attn_scalar=24\)"),
    ("llama-yarn", "cannot express rope_scaling='yarn'"),
])
def test_what_llama_cpp_cannot_express_is_refused_by_name(case, message, tmp_path, capsys):
    directory = tmp_path / "model"
    build_hf(case).save_pretrained(directory)
    with pytest.raises(UnsupportedModelError, match=message):
        alloy.fuse.export_model(directory, tmp_path / "m.gguf", format="gguf")
    capsys.readouterr()  # transformers' save progress
    assert main(["export", str(directory), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
