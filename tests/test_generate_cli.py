"""`alloy generate` end to end: a tiny model with a character tokenizer and a chat template."""

from __future__ import annotations

import json

import pytest

import alloy
from alloy import kernels
from alloy.cli import main
from alloy.infer import generate
from alloy.infer.tokenize import TextStream, apply_chat_template, encode
from hf_cases import CHARS, build_hf, char_tokenizer

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat-model")
    build_hf("llama-gqa").save_pretrained(directory)
    char_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "~"}))
    return directory


def _cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_streams_the_greedy_continuation(model_dir, capsys):
    model = alloy.load(model_dir)
    ids = encode(model, "Hello")
    expected = generate(model, [ids], max_new_tokens=10, eos_ids=())[0]
    code, out, _ = _cli(capsys, "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", 10)
    assert code == 0 and out == model.tokenizer.decode(expected.tokens) + "\n"
    code, out, _ = _cli(capsys, "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", 10, "--json",
                        "--dtype", "bf16")
    record = json.loads(out)
    assert code == 0 and record["prompt_tokens"] == 5 and len(record["tokens"]) == 10 and record["dtype"] == "bf16"


def test_cli_bf16_weights_planned_over_this_machine(model_dir, capsys, tmp_path):
    # A CPU without a fast bf16 matmul still decodes bf16 weights (fp32 arithmetic in Alloy's
    # kernels): planning over such a device must not refuse bf16.
    inventory = {"schema_version": 1, "name": "slow-bf16", "devices": [
        {"name": "cpu", "kind": "cpu", "memory_bytes": 10**9, "matmul_flops": {"fp32": 5e10},
         "slow_dtypes": {"bf16": "no fast path"}, "memory_bandwidth_bytes_per_s": 2e10}]}
    argv = ["--model", model_dir, "--prompt", "abc", "--max-new-tokens", 6, "--json", "--dtype", "bf16"]
    code, single, _ = _cli(capsys, *argv)
    code_planned, planned, err = _cli(capsys, *argv, "--devices", _write(tmp_path / "inv.json", inventory))
    if not kernels.available():
        assert code_planned == 2 and "bf16" in err  # refused with the planner's one-line reason
        return
    assert code == 0 and code_planned == 0, err
    assert json.loads(planned)["tokens"] == json.loads(single)["tokens"]


def test_cli_chat_template_and_stop_string(model_dir, capsys):
    model = alloy.load(model_dir)
    rendered = apply_chat_template(model, [{"role": "user", "content": "hi"}])
    assert rendered == "<user>hi<assistant>"
    text = model.tokenizer.decode(generate(model, [encode(model, rendered)], max_new_tokens=12, eos_ids=())[0].tokens)
    stop = text[4:6]
    code, out, _ = _cli(capsys, "--model", model_dir, "--prompt", "hi", "--chat", "--max-new-tokens", 12,
                        "--stop", stop, "--json")
    record = json.loads(out)
    assert code == 0 and record["finish_reason"] == "stop" and record["text"] == text[:text.find(stop)]


def test_cli_split_over_processes_matches(model_dir, capsys, tmp_path):
    code, single, _ = _cli(capsys, "--model", model_dir, "--prompt", "abc", "--max-new-tokens", 6, "--json")
    inventory = {"schema_version": 1, "name": "two-cpus", "devices": [
        {"name": f"cpu{i}", "kind": "cpu", "memory_bytes": 100_000, "matmul_flops": {"fp32": 1e10},
         "memory_bandwidth_bytes_per_s": 1e10} for i in range(2)]}
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "--model", str(model_dir), "--devices", _write(tmp_path / "inv.json", inventory),
                 "--task", "infer", "--batch-size", "1", "--seq-len", "3", "--new-tokens", "6", "--dtype", "fp32",
                 "--out", str(plan_file), "--json"]) == 0
    capsys.readouterr()
    code, split, _ = _cli(capsys, "--model", model_dir, "--prompt", "abc", "--max-new-tokens", 6, "--json",
                          "--plan", plan_file)
    record = json.loads(split)
    assert code == 0 and record["tokens"] == json.loads(single)["tokens"]
    assert len(record["stages"]) == 2, record["stages"]  # the plan did split the layers
    code, procs, _ = _cli(capsys, "--model", model_dir, "--prompt", "abc", "--max-new-tokens", 6, "--json",
                          "--plan", plan_file, "--processes")
    assert code == 0 and json.loads(procs)["tokens"] == record["tokens"]


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "empty"),
    (["--prompt", "x" * 70], "context"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--dtype", "fp12"], "dtype"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.2"], "top_p"),
])
def test_cli_bad_input_exits_2_with_one_line(model_dir, capsys, argv, message):
    argv = ["--prompt", "hi"] + argv if "--prompt" not in argv else argv
    code, out, err = _cli(capsys, "--model", model_dir, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_text_stream_holds_back_a_possible_stop_string():
    tokenizer = char_tokenizer()
    stream = TextStream(tokenizer, stop=["xyz"])
    pieces = [stream.push(CHARS.index(c)) for c in "abxyq"]
    assert "".join(pieces) == "abxyq" and pieces[2:4] == ["", ""]  # "x", "xy" could start "xyz"
    stream = TextStream(tokenizer, stop=["xyz"])
    assert "".join(stream.push(CHARS.index(c)) for c in "abxyzcd") == "ab" and stream.stopped


def _trained_tokenizer(kind: str):
    """A byte-level BPE (GPT-2 / Llama 3 style) or a Metaspace one (SentencePiece style: the
    decoder drops the first token's leading space), trained here on multilingual text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["héllo wörld, naïve café — 東京 タワー 🙂🙃 digits 12345", "the quick brown fox  jumps\tover",
            "ünïcödé ßtraße 北京 😀 x=y+1; print('ok')"] * 20
    if kind == "byte-level":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                               decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"] + [f"<0x{b:02X}>" for b in range(256)])
    tokenizer.train_from_iterator(text, trainer)
    return tokenizer


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_text_stream_pieces_equal_the_whole_decode_cut_at_the_first_stop(kind):
    """The incremental stream (a short decode window per token) against decoding everything at
    once: the same text, cut at the first stop string, and never a piece taken back."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tokenizer = _trained_tokenizer(kind)
    size = tokenizer.get_vocab_size()

    @settings(max_examples=150, deadline=None)
    @given(tokens=st.lists(st.integers(0, size - 1), min_size=1, max_size=40),
           stop=st.lists(st.text(alphabet="ab é東🙂 lo", min_size=1, max_size=3), max_size=2))
    def check(tokens, stop):
        stream = TextStream(tokenizer, stop)
        pieces = [stream.push(t) for t in tokens]
        pieces.append(stream.flush())
        whole = tokenizer.decode(tokens)
        hits = [whole.find(s) for s in stop if s in whole]
        assert "".join(pieces) == (whole[:min(hits)] if hits else whole)

    check()


def test_a_stop_string_inside_an_unfinished_character_cuts_the_flushed_tail():
    """A token whose text ends in half a UTF-8 character is held back until the end; the stop
    string inside it still cuts there (the flush once printed it whole)."""
    tokenizer = _trained_tokenizer("byte-level")
    cases = [(t, text) for t in range(tokenizer.get_vocab_size())
             if len(text := tokenizer.decode([t])) >= 2 and text.endswith("\ufffd") and text[0] != "\ufffd"]
    assert cases, "the byte-level vocabulary has a token ending in a partial character"
    token, text = cases[0]
    stream = TextStream(tokenizer, [text[1]])
    pieces = [stream.push(token), stream.flush()]
    assert "".join(pieces) == text[:text.index(text[1])]
