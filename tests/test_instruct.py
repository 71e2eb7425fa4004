"""Instruction data: the loss mask holds exactly the assistant's tokens under several chat
templates, packing keeps conversations whole, the engine's loss on masked data equals a
single-process mean over the unmasked targets, and `alloy train` fine-tunes on chat JSONL
(full and LoRA) into models `alloy generate --chat` runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alloy.errors import ConfigError
from alloy.runtime import DataSource, OptimConfig, RunLayout, job_document, run_job
from alloy.runtime.data import split_batch
from alloy.spec import ModelSpec
from alloy.train.config import DataConfig
from alloy.train.data import TokenFile, tokenize_corpus

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Meta-Llama-3-8B-Instruct's and Qwen2-7B-Instruct's templates, as their tokenizer_config.json has them
LLAMA3 = (r"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          r"'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          r"'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          r"{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          r"{% endif %}")
QWEN2 = (r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
         r"system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' "
         r"+ message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
         r"assistant\n' }}{% endif %}")
# Qwen3's habit: the last assistant turn gets an (empty) think block that earlier turns do not
THINKING = (r"{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == "
            r"'assistant' and loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{{ message['content'] + "
            r"'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
     {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "Again?"},
     {"role": "assistant", "content": "Hi again."}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "It is 4."}],
]


def char_tokenizer(specials: list[str]):
    """One token per character (so a span of text is a span of tokens), and the template's markers."""
    from tokenizers import Tokenizer, decoders, models

    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def tiny_spec(vocab_size: int = 128, eos: tuple[int, ...] = ()) -> ModelSpec:
    return ModelSpec(family="llama", vocab_size=vocab_size, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=48, max_seq_len=128, tie_embeddings=True, eos_token_id=eos)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stored(tokens: TokenFile) -> np.ndarray:
    return np.fromfile(tokens.path, dtype=np.int32).astype(np.int64)


def decode_ids(values: np.ndarray) -> np.ndarray:
    return np.where(values < 0, -values - 1, values)


# name -> (specials, tokenizer_config.json or None for the built-in ChatML, the model's EOS ids,
#          the end-of-turn marker, the end-of-conversation text, per-turn text added to the last turn)
TEMPLATES = {
    "chatml-builtin": (CHATML_SPECIALS, None, (), "<|im_end|>", "<|endoftext|>", ""),
    "llama3": (LLAMA3_SPECIALS, {"chat_template": LLAMA3, "bos_token": "<|begin_of_text|>",
                                 "eos_token": "<|eot_id|>"}, ("<|end_of_text|>",), "<|eot_id|>", "<|end_of_text|>", ""),
    "qwen2": (CHATML_SPECIALS, {"chat_template": QWEN2, "eos_token": "<|im_end|>"}, ("<|im_end|>",), "<|im_end|>",
              "<|endoftext|>", ""),
    "qwen3-thinking": (CHATML_SPECIALS, {"chat_template": THINKING}, (), "<|im_end|>", "<|endoftext|>",
                       "<think>\n\n</think>\n\n"),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_loss_carrying_targets_are_exactly_the_assistant_turns(name, tmp_path):
    specials, config, eos_tokens, marker, end, last_prefix = TEMPLATES[name]
    tokenizer = char_tokenizer(specials)
    spec = tiny_spec(eos=tuple(tokenizer.token_to_id(t) for t in eos_tokens))
    side = {"tokenizer_config.json": json.dumps(config).encode()} if config else {}
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    tokens = tokenize_corpus(DataConfig(path=str(data), val_fraction=0), tokenizer, tmp_path / "data", spec,
                             side_files=side, seq_len=128, log=lambda *_: None)
    assert tokens.format == "chat" and tokens.seq_len == 128 and tokens.count == 2 * 128 + 1  # a unit each
    blocks = torch.from_numpy(np.stack([stored(tokens)[i * 128: i * 128 + 129] for i in range(2)]))
    inputs, targets = split_batch(blocks)
    learned = [tokenizer.decode(row[row != -100].tolist(), skip_special_tokens=False) for row in targets]
    for conversation, text in zip(CONVERSATIONS, learned):
        turns = [m["content"] for m in conversation if m["role"] == "assistant"]
        expected = "".join(t + marker for t in turns[:-1]) + last_prefix + turns[-1] + marker + end
        assert text == expected
        for m in conversation:
            if m["role"] != "assistant":
                assert m["content"] not in text
    # inputs are the plain ids: the rendered conversation itself, padding after it
    first = tokenizer.decode(decode_ids(stored(tokens)[:128]).tolist(), skip_special_tokens=False)
    assert "Be brief." in first and "Say hi." in first and first.endswith(end * 2)  # EOS, then padding
    assert (inputs >= 0).all()


def _render_chatml(conversation: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conversation) + "<|endoftext|>"


def test_packing_keeps_conversations_whole_and_masks_padding_and_unit_starts(tmp_path):
    rng = np.random.default_rng(0)
    seq_len = 96
    rows = []
    for i in range(30):  # lengths from a few tokens to past a unit
        words = " ".join(f"w{j}" for j in range(int(rng.integers(1, 40))))
        rows.append([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": words}])
    tokenizer = char_tokenizer(CHATML_SPECIALS)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": r[0]["content"], "completion": r[1]["content"]}
                                                 for r in rows])
    lines = []
    tokens = tokenize_corpus(DataConfig(path=str(data), val_fraction=0.25), tokenizer, tmp_path / "data", tiny_spec(),
                             seq_len=seq_len, log=lines.append)
    # what greedy packing in file order must give, from the conversations' own rendered lengths
    lengths = [len(tokenizer.encode(_render_chatml(r), add_special_tokens=False).ids) for r in rows]
    expected_units, used = [[]], 0
    for i, n in enumerate(lengths):
        n = min(n, seq_len)
        if used + n > seq_len:
            expected_units.append([])
            used = 0
        expected_units[-1].append(i)
        used += n
    truncated = sum(n > seq_len for n in lengths)
    assert truncated > 0 and any(f"{truncated} conversation(s) longer than seq_len {seq_len}" in l for l in lines)

    values = stored(tokens)
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert tokens.count == len(expected_units) * seq_len + 1 and values[-1] == -eos - 1
    val_units = len(expected_units) // 4  # int(units * val_fraction): the split on a unit boundary
    assert tokens.train_end == (len(expected_units) - val_units) * seq_len
    for u, members in enumerate(expected_units):
        unit = values[u * seq_len: (u + 1) * seq_len]
        assert unit[0] < 0  # the previous block's last target: never learned across units
        text = "".join(_render_chatml(rows[i]) for i in members)
        ids = tokenizer.encode(text, add_special_tokens=False).ids[:seq_len]
        assert decode_ids(unit[:len(ids)]).tolist() == ids  # whole conversations, in order
        assert (unit[len(ids):] == -eos - 1).all()  # padding: EOS, no loss
    # each training block is one unit plus the next unit's (masked) first token
    train = DataSource("tokens", seed=0, path=str(tokens.path), end=tokens.train_stop)
    assert train.num_blocks(seq_len) == tokens.train_end // seq_len


SPEC = tiny_spec(vocab_size=104)
LAYOUTS = {
    "dp-3-1": RunLayout.of([[(f"cpu{i}", 0, 4)] for i in range(2)], (3, 1), (1, 1)),
    "pp-3-1": RunLayout.of([[("cpu0", 0, 3), ("cpu1", 3, 4)]], (4,), (2,)),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_engine_loss_on_masked_data_is_the_mean_over_unmasked_targets(name, tmp_path):
    """Distributed workers (float64) against one process computing transformers' loss: the mean
    cross entropy over the targets that are not -100, over all accumulated batches."""
    from alloy.model import Transformer
    from alloy.model.init import init_params

    rng = np.random.default_rng(1)
    rows = [{"instruction": f"task {i}", "input": "x" * int(rng.integers(0, 30)),
             "output": "y" * int(rng.integers(1, 20))} for i in range(40)]
    tokenizer = char_tokenizer(CHATML_SPECIALS)
    seq, steps, accum = 48, 3, 2
    tokens = tokenize_corpus(DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", rows)), val_fraction=0.2),
                             tokenizer, tmp_path / "data", SPEC, seq_len=seq, log=lambda *_: None)
    data = DataSource("tokens", seed=5, path=str(tokens.path), end=tokens.train_stop)
    val = DataSource("tokens", seed=6, path=str(tokens.path), start=tokens.train_end, end=tokens.count)
    layout = LAYOUTS[name]
    optim = OptimConfig(lr=1e-2, weight_decay=0.1)
    job = job_document(SPEC, layout, steps=steps, seq_len=seq, out_dir=tmp_path / "job", data=data, optim=optim,
                       threads=1, timeout_s=60, param_dtype="fp64", grad_accum=accum, val_data=val,
                       eval_every=steps, eval_batches=1, metrics_path=str(tmp_path / "metrics.jsonl"))
    report = run_job(job, timeout_s=240)

    model = init_params(Transformer(SPEC), 0).to(torch.float64).train()
    adam = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                             eps=optim.eps)

    def mean_loss(rows: np.ndarray) -> torch.Tensor:
        ids = torch.from_numpy(decode_ids(rows[:, :-1]))
        labels = torch.from_numpy(np.where(rows[:, 1:] < 0, -100, rows[:, 1:]))
        return F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)  # mean

    losses, counts = [], []
    for step in range(steps):
        rows = np.concatenate([data.batch(step * accum + k, layout.global_batch, seq, SPEC.vocab_size).numpy()
                               for k in range(accum)])
        counts.append(int((rows[:, 1:] >= 0).sum()))
        adam.zero_grad(set_to_none=True)
        loss = mean_loss(rows)
        loss.backward()
        for group in adam.param_groups:
            group["lr"] = optim.lr_at(step, steps)
        adam.step()
        losses.append(loss.item())
    assert 0 < min(counts) and max(counts) < accum * layout.global_batch * seq  # the mask is in play
    assert report.losses == pytest.approx(losses, rel=1e-10, abs=0)
    with torch.no_grad():
        expected_eval = mean_loss(val.batch(0, layout.global_batch, seq, SPEC.vocab_size).numpy()).item()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval_loss"] == pytest.approx(expected_eval, rel=1e-10, abs=0)


def test_a_batch_without_loss_targets_gives_zero_not_nan():
    from alloy.runtime.engine import token_loss_sum

    rows = -torch.randint(1, 50, (2, 9))  # every token stored as no-loss
    inputs, targets = split_batch(rows)
    assert (targets == -100).all() and (inputs == -rows[:, :-1] - 1).all()
    assert token_loss_sum(torch.randn(2, 8, 64), targets).item() == 0.0


def test_raw_text_is_separated_by_the_models_eos_when_the_tokenizer_has_no_endoftext(tmp_path):
    tokenizer = char_tokenizer(["</s>"])
    eos = tokenizer.token_to_id("</s>")
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first doc")
    (corpus / "b.txt").write_text("second")
    cfg = DataConfig(path=str(corpus), val_fraction=0)
    tokens = tokenize_corpus(cfg, tokenizer, tmp_path / "d1", tiny_spec(eos=(eos,)), seq_len=8)
    expected = tokenizer.encode("first doc").ids + [eos] + tokenizer.encode("second").ids + [eos]
    assert stored(tokens).tolist() == expected and tokens.eot_id == eos and tokens.format == "text"
    # no EOS in config.json: tokenizer_config.json's eos_token
    side = {"tokenizer_config.json": json.dumps({"eos_token": {"content": "</s>"}}).encode()}
    assert stored(tokenize_corpus(cfg, tokenizer, tmp_path / "d2", tiny_spec(), side_files=side,
                                  seq_len=8)).tolist() == expected
    with pytest.raises(ConfigError, match="no end-of-text token"):  # never id 0 silently
        tokenize_corpus(cfg, tokenizer, tmp_path / "d3", tiny_spec(), seq_len=8)


GOOD = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
BAD_ROWS = {
    "missing fields": ({"instruction": "a"}, "a chat row needs 'messages'"),
    "wrong type": ({"prompt": "a", "completion": 3}, "'completion' must be a string, not int"),
    "content type": ({"messages": [{"role": "user", "content": ["a"]}]}, r"messages\[0\] \(user\) has no string"),
    "unknown role": ({"messages": [{"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
    "no assistant": ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
    "not an object": ([1, 2], "a chat row needs"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_chat_rows_are_one_line_errors_naming_file_and_line(case, tmp_path):
    row, message = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, row])
    with pytest.raises(ConfigError, match=message) as err:
        tokenize_corpus(DataConfig(path=str(data)), char_tokenizer(CHATML_SPECIALS), tmp_path / "d", tiny_spec(),
                        seq_len=32, log=lambda *_: None)
    assert f"{data}:3: " in str(err.value) and "\n" not in str(err.value)


def test_chat_format_on_text_or_empty_files_is_refused(tmp_path):
    tokenizer, spec = char_tokenizer(CHATML_SPECIALS), tiny_spec()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConfigError, match=f"{text}: data.format is chat, but this is not a .jsonl file"):
        tokenize_corpus(DataConfig(path=str(text), format="chat"), tokenizer, tmp_path / "d", spec, seq_len=32)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=f"{empty}:1: empty file"):
        tokenize_corpus(DataConfig(path=str(empty), format="chat"), tokenizer, tmp_path / "d", spec, seq_len=32)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "chat.jsonl", [GOOD])
    (mixed / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="mixes chat rows"):
        tokenize_corpus(DataConfig(path=str(mixed)), tokenizer, tmp_path / "d", spec, seq_len=32)
    # the same rows as text: data.format text reads data.text_field, as before
    with pytest.raises(ConfigError, match="no string field 'text'"):
        tokenize_corpus(DataConfig(path=str(mixed / "chat.jsonl"), format="text"), tokenizer, tmp_path / "d", spec,
                        seq_len=32)


def test_alloys_own_tokenizer_learns_the_chatml_markers():
    from alloy.train.data import EOT, train_tokenizer
    from alloy.train.instruct import CHATML_TOKENS, ChatFormat

    fmt = ChatFormat.for_model(None)
    texts = [fmt.render([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "answer"}],
                        add_generation_prompt=False) for i in range(50)]
    tokenizer = train_tokenizer(iter(texts), 300, (EOT, *CHATML_TOKENS))
    ids = tokenizer.encode(texts[0], add_special_tokens=False).ids
    marker_ids = [tokenizer.token_to_id(t) for t in CHATML_TOKENS]
    assert tokenizer.token_to_id(EOT) == 0 and ids.count(marker_ids[0]) == 2 and ids.count(marker_ids[1]) == 2


# ---- `alloy train` on chat JSONL, then `alloy generate --chat` on what it made ----

QUESTIONS = [(a, b) for a in range(2, 9) for b in range(2, 8)][:40]


@pytest.fixture(scope="module")
def chat_workspace(tmp_path_factory):
    import transformers

    from train_cases import MODEL, make_workspace

    root = make_workspace(tmp_path_factory.mktemp("instruct"))
    tokenizer = char_tokenizer(CHATML_SPECIALS)
    eos = tokenizer.token_to_id("<|im_end|>")
    kwargs = {k: v for k, v in MODEL.items() if k != "model_type"} | {"bos_token_id": None, "eos_token_id": eos}
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **kwargs)).save_pretrained(
        root / "base")
    tokenizer.save(str(root / "base" / "tokenizer.json"))
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN2,
                                                                     "eos_token": "<|im_end|>"}))
    rows = [{"messages": ([{"role": "system", "content": "You add."}] if i % 3 == 0 else []) +
             [{"role": "user", "content": f"{a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}."}]}
            for i, (a, b) in enumerate(QUESTIONS)]
    write_jsonl(root / "chat.jsonl", rows)
    return root


def _train_chat(root: Path, out: str, **overrides):
    from alloy.train.config import load_config
    from alloy.train.run import train
    from train_cases import write_config

    settings = {"model": str(root / "base"), "data": {"path": str(root / "chat.jsonl"), "val_fraction": 0.1},
                "seq_len": 64, "steps": 6, "verify": False, "eval_every": 6, "optimizer": {"lr": 1e-2},
                "schedule": {"warmup_steps": 1}}
    config = write_config(root, out, **(settings | overrides))
    lines = []
    return train(load_config(config), log=lines.append), config, lines


def _generate(capsys, *argv) -> dict:
    from alloy.cli import main

    code = main(["generate", *map(str, argv), "--prompt", "3 plus 4?", "--chat", "--max-new-tokens", "6", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_alloy_train_full_fine_tunes_on_chat_jsonl_and_generates(chat_workspace, capsys):
    import alloy
    from alloy.infer.tokenize import apply_chat_template

    result, config, lines = _train_chat(chat_workspace, "full")
    metrics = [json.loads(l) for l in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] and "eval_loss" in metrics[-1]
    meta = json.loads((result.out_dir / "data" / "tokens.json").read_text())
    assert meta["format"] == "chat" and meta["seq_len"] == 64
    final = alloy.load(result.final_dir)  # the base's template came along: prompts render as in training
    messages = [{"role": "user", "content": "3 plus 4?"}]
    assert apply_chat_template(final, messages) == apply_chat_template(alloy.load(chat_workspace / "base"), messages)
    record = _generate(capsys, "--model", result.final_dir)
    assert record["prompt_tokens"] == len(final.tokenizer.encode(apply_chat_template(final, messages),
                                                                 add_special_tokens=False).ids)
    assert 1 <= len(record["tokens"]) <= 6
    # chat data is packed to its seq_len: resuming with another is refused in one line
    from alloy.train.config import load_config
    from alloy.train.run import train

    with pytest.raises(ConfigError, match="packed for seq_len 64, not 32"):
        train(load_config(config, ["seq_len=32"]), resume=True, log=lambda *_: None)


def test_alloy_train_lora_on_chat_jsonl_and_generates_with_the_adapter(chat_workspace, capsys):
    result, _, _ = _train_chat(chat_workspace, "lora", lora={"rank": 4, "alpha": 8})
    metrics = [json.loads(l) for l in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (result.final_dir / "adapter_config.json").is_file()
    base = _generate(capsys, "--model", chat_workspace / "base")
    tuned = _generate(capsys, "--model", chat_workspace / "base", "--lora", result.final_dir)
    assert tuned["prompt_tokens"] == base["prompt_tokens"] and 1 <= len(tuned["tokens"]) <= 6


def test_a_fresh_model_on_chat_data_trains_its_tokenizer_with_chatml(tmp_path):
    """No model directory: Alloy's tokenizer is trained on ChatML-rendered conversations, its
    markers special tokens, and the run's tokenizer_config.json carries that template."""
    from tokenizers import Tokenizer

    from train_cases import make_workspace

    root = make_workspace(tmp_path)
    write_jsonl(root / "chat.jsonl", [{"prompt": f"{a} plus {b}?", "completion": f"{a + b}."} for a, b in QUESTIONS])
    (root / "base").mkdir()
    result, _, lines = _train_chat(root, "fresh", model=str(root / "model.json"), steps=2, fuse=False)
    assert any("ChatML" in l for l in lines)
    tokenizer = Tokenizer.from_file(str(result.out_dir / "tokenizer.json"))
    assert all(tokenizer.token_to_id(t) is not None for t in CHATML_SPECIALS)
    config = json.loads((result.out_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
