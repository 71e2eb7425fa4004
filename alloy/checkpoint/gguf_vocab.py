"""A GGUF file's tokenizer metadata -> a `tokenizers` Tokenizer and the side files an HF folder
would carry (tokenizer.json, tokenizer_config.json with the chat template, generation_config.json).

Two vocabularies, as llama.cpp names them (facts from llama.cpp's llama-vocab.cpp and
transformers' GGUF tokenizer builder):
- "gpt2": byte-level BPE, tokens spelled in GPT-2's byte alphabet, merges as "a b" strings. The
  split regex before the byte mapping depends on `tokenizer.ggml.pre` (llama3, qwen2, ...).
- "llama": SentencePiece BPE: tokens with scores, bytes as <0xNN> tokens. Merges are not
  stored; a pair merges into a token when both halves are tokens, best score first.
Token types: 1 normal, 2 unknown, 3 control (special), 4 user-defined (added), 5 unused, 6 byte.
User-defined tokens (Gemma's runs of spaces and newlines, HTML tags) are matched whole before the
model runs, as llama.cpp's tokenizer_st_partition does.
"""

from __future__ import annotations

import json
import warnings

from alloy.errors import UnsupportedModelError
from alloy.spec import ModelSpec

CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2

_GPT2_SPLIT = None  # the ByteLevel pre-tokenizer's own regex
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's Llama 3 pre-tokenizer type: add BOS unless the file says not, and look a whole
# split piece up in the vocabulary before merging (tokenizer.json's "ignore_merges").
LLAMA3_PRES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"})
# tokenizer.ggml.pre -> split regex, as llama.cpp's llama-vocab.cpp groups them.
PRE_SPLITS = {
    "default": _GPT2_SPLIT, "gpt-2": _GPT2_SPLIT, "gpt2": _GPT2_SPLIT,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT, "pixtral": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}


# Control tokens that end a turn, by text, as llama.cpp's llama-vocab.cpp finds them (files rarely
# name an end-of-turn id): generation stops on them as on EOS (ModelSpec.eos_token_id).
END_OF_TURN = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                         "<EOT>", "<|end_of_text|>"})
# Gemma's turn format, as Google's Gemma 3 tokenizer_config.json writes it (text content only), for
# a file with Gemma's turn tokens but no template: files converted before llama.cpp's converter
# read chat_template.jinja carry none, and llama.cpp then falls back to ChatML, whose markers are
# not in the vocabulary. The same turns as llama.cpp's built-in "gemma" template, BOS included.
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def end_of_generation(meta) -> tuple[int, ...]:
    """EOS first, then the end-of-turn and end-of-message tokens: the file's ids and the control
    tokens named in END_OF_TURN, as llama.cpp's end-of-generation set holds them."""
    eos = meta.get("tokenizer.ggml.eos_token_id", None)
    ends = {meta.get("tokenizer.ggml.eot_token_id", None), meta.get("tokenizer.ggml.eom_token_id", None)}
    tokens = meta.get("tokenizer.ggml.tokens", None) or []
    types = meta.get("tokenizer.ggml.token_type", None) or []
    ends |= {i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in END_OF_TURN}
    return (() if eos is None else (eos,)) + tuple(sorted(ends - {None, eos}))


def side_files_from_gguf(meta, spec: ModelSpec):
    """(tokenizer or None, side files by name) from the metadata of a GGUF file."""
    kind = meta.get("tokenizer.ggml.model", None)
    side: dict[str, bytes] = {}
    if kind is None:
        return None, side
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", None) or [1] * len(tokens))
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(tokens, types, meta)
        add_bos_default = meta.get("tokenizer.ggml.pre", "default") in LLAMA3_PRES
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(tokens, types, meta, spec.family)
        add_bos_default = True
    else:
        raise UnsupportedModelError(f"{meta.path}: GGUF tokenizer model {kind!r} is not supported; supported: gpt2, llama")
    _add_special_tokens(tokenizer, tokens, types)
    bos, eos = spec.bos_token_id, spec.eos_token_id[0] if spec.eos_token_id else None
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    if add_bos:
        from tokenizers import processors

        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 {tokens[bos]}:1 $B:1",
            special_tokens=[(tokens[bos], bos)])
    config = {"add_bos_token": add_bos, "model_max_length": spec.max_seq_len}
    for key, token_id in (("bos_token", bos), ("eos_token", eos), ("pad_token", spec.pad_token_id),
                          ("unk_token", meta.get("tokenizer.ggml.unknown_token_id", None))):
        if token_id is not None and 0 <= token_id < len(tokens):
            config[key] = tokens[token_id]
    template = meta.get("tokenizer.chat_template", None)
    control = {t for t, k in zip(tokens, types) if k == CONTROL}
    if not template and {"<start_of_turn>", "<end_of_turn>"} <= control:
        template = GEMMA_TURNS
    if template:
        config["chat_template"] = template
    generation = {"bos_token_id": bos, "eos_token_id": sorted(spec.eos_token_id) or None}
    side["tokenizer.json"] = tokenizer.to_str().encode()
    side["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    side["generation_config.json"] = (json.dumps(generation, indent=2) + "\n").encode()
    return tokenizer, side


def _byte_level_bpe(tokens: list[str], types: list[int], meta):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", None) or []]
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                     ignore_merges=pre in LLAMA3_PRES))
    if pre not in PRE_SPLITS:
        warnings.warn(f"{meta.path}: pre-tokenizer {pre!r} is unknown to Alloy; splitting text as GPT-2 does, "
                      "which may tokenize some text differently from llama.cpp", stacklevel=3)
    split = PRE_SPLITS.get(pre)
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta, family: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    scores = list(meta.get("tokenizer.ggml.scores", None) or [0.0] * len(tokens))
    if family in ("gemma", "gemma2"):
        # Gemma stores runs of spaces as real spaces, and its merge order is the file's order.
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    unk = next((tokens[i] for i, kind in enumerate(types) if kind == UNKNOWN), None)
    merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if family == "phi3":  # the prefix space comes from a normalizer (Phi-3's own tokenizer.json)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")] if prefix
            else [normalizers.Replace(" ", "\u2581")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, the merged token's score first (as
    transformers.tokenization_utils_base.generate_merges orders them)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens as special, user-defined ones as plain added tokens: both matched whole."""
    from tokenizers import AddedToken

    special = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL]
    added = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if special:
        tokenizer.add_special_tokens(special)
    if added:
        tokenizer.add_tokens(added)
