"""docs/MODELS.md's matrix: each family x (load HF, load GGUF, export HF, export GGUF, train,
generate), every cell checked against its expected outcome in MATRIX, and MATRIX against the doc.

A cell is "yes" (works, and equals transformers where there is a transformers to equal), "refused"
(a typed error naming why) or "n/a" (the capability does not apply). Each family is one tiny random
model from hf_cases, with the knobs its published checkpoints ship (so a cell says what happens to
the models people have, not to a test's corner case; those are refused by name in
test_gguf_roundtrip.py and test_export.py)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

import alloy
from alloy.errors import ConfigError, UnsupportedModelError
from alloy.fuse.gguf import export_gguf
from alloy.infer import generate
from alloy.runtime.reference import reference_run
from hf_cases import CASES, hf_model, hf_output

CAPABILITIES = ("load HF", "load GGUF", "export HF", "export GGUF", "train", "generate")
YES, REFUSED, NA = "yes", "refused", "n/a"


def _row(gguf: str = YES, causal: bool = True) -> dict[str, str]:
    return {"load HF": YES, "load GGUF": gguf if gguf == YES else NA, "export HF": YES, "export GGUF": gguf,
            "train": YES if causal else REFUSED, "generate": YES if causal else REFUSED}


MATRIX: dict[str, dict[str, str]] = {
    "llama": _row(), "mistral": _row(REFUSED), "qwen2": _row(), "qwen3": _row(), "phi3": _row(), "gemma": _row(),
    "gemma2": _row(), "gemma3_text": _row(), "mixtral": _row(), "qwen3_moe": _row(),
    "olmo2": _row(REFUSED), "olmoe": _row(), "gpt2": _row(REFUSED), "gpt_neox": _row(),
    "bert": _row(REFUSED, causal=False),
}
# Why GGUF export refuses: the error must say so, or a refusal for another reason would pass.
GGUF_REFUSALS = {
    "mistral": "cannot express layer_types=",  # llama.cpp's "llama" has no sliding window
    **{f: f"does not support model family '{f}'" for f in
       ("olmo2", "gpt2", "bert")},
}
# family -> (hf_cases case, config changes to the form the family's published checkpoints take)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama3-rope", {}),
    "mistral": ("mistral-sliding", {}),  # Mistral 7B v0.1: a window on every layer
    "qwen2": ("qwen2-bias-sliding", dict(use_sliding_window=False)),  # as every Qwen2/2.5 config.json
    "qwen3": ("qwen3-qknorm", {}),
    "phi3": ("phi3-fused-partial", {}),
    "gemma": ("gemma-mqa", {}),
    "gemma2": ("gemma2-softcap-sliding", dict(query_pre_attn_scalar=16)),  # = head_dim, as 2B and 9B
    "gemma3_text": ("gemma3", dict(query_pre_attn_scalar=16)),  # = head_dim, as 1B, 4B, 12B
    "mixtral": ("mixtral", {}),
    "qwen3_moe": ("qwen3-moe", dict(mlp_only_layers=[])),  # experts on every layer, as every Qwen3-MoE config
    "olmo2": ("olmo2", {}),
    "olmoe": ("olmoe", dict(num_key_value_heads=4)),  # as many key/value heads as query heads, as OLMoE-1B-7B
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("neox-parallel-partial", {}),
    "bert": ("bert", {}),
}
TOLERANCE = 1e-4
VOCAB = 96
NEW = 4


def _cells(capability: str):
    return [pytest.param(family, MATRIX[family][capability], id=family) for family in MATRIX]


def _ids(batch=2, seq=16, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _out(model, ids):
    with torch.no_grad():
        return model(ids)


def _build(family: str):
    """hf_cases.build_hf, on the family's published form of its case."""
    name, changes = FAMILIES[family]
    kind, kwargs = CASES[name]
    return hf_model(kind, kwargs | changes)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """family -> (HF model, the folder it was saved to), built once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = _build(family)
            directory = tmp_path_factory.mktemp(family)
            model.save_pretrained(directory)
            cache[family] = model, directory
        return cache[family]

    return get


@pytest.fixture(scope="module")
def family_gguf(family_dir, tmp_path_factory):
    """family -> the GGUF file `alloy export --format gguf` writes, or the UnsupportedModelError it raises."""
    cache = {}

    def get(family: str):
        if family not in cache:
            _, directory = family_dir(family)
            try:
                cache[family] = export_gguf(directory, tmp_path_factory.mktemp("gguf") / f"{family}.gguf")
            except UnsupportedModelError as err:
                cache[family] = err
        return cache[family]

    return get


def test_families_are_the_model_types_of_their_cases():
    assert set(FAMILIES) == set(MATRIX) == set(GGUF_REFUSALS) | {f for f in MATRIX if MATRIX[f]["export GGUF"] == YES}
    assert {f: CASES[name][0] for f, (name, _) in FAMILIES.items()} == {f: f for f in FAMILIES}
    assert all(set(row) == set(CAPABILITIES) and set(row.values()) <= {YES, REFUSED, NA} for row in MATRIX.values())


@pytest.mark.parametrize("family, expected", _cells("load HF"))
def test_load_hf(family, expected, family_dir):
    hf, directory = family_dir(family)
    ids = _ids()
    torch.testing.assert_close(_out(alloy.load(directory), ids), hf_output(hf, ids), atol=TOLERANCE, rtol=0)
    assert expected == YES


@pytest.mark.parametrize("family, expected", _cells("export HF"))
def test_export_hf(family, expected, family_dir, tmp_path):
    import transformers

    hf, directory = family_dir(family)
    out = alloy.save(alloy.load(directory), tmp_path / "out")
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    reloaded = auto.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids()
    torch.testing.assert_close(hf_output(reloaded, ids), hf_output(hf, ids), atol=TOLERANCE, rtol=0)
    assert expected == YES


@pytest.mark.parametrize("family, expected", _cells("export GGUF"))
def test_export_gguf(family, expected, family_gguf):
    result = family_gguf(family)
    if expected == REFUSED:
        assert isinstance(result, UnsupportedModelError), f"{family}: exported, but MATRIX says refused"
        assert GGUF_REFUSALS[family] in str(result)
    else:
        assert not isinstance(result, Exception), f"{family}: {result}"
        assert expected == YES and result.stat().st_size > 0


@pytest.mark.parametrize("family, expected", _cells("load GGUF"))
def test_load_gguf(family, expected, family_dir, family_gguf):
    result = family_gguf(family)
    if expected == NA:  # no file to load
        assert isinstance(result, UnsupportedModelError)
        return
    hf, _ = family_dir(family)
    ids = _ids()
    torch.testing.assert_close(_out(alloy.load(result), ids), hf_output(hf, ids), atol=TOLERANCE, rtol=0)
    assert expected == YES


class FixedBatch:
    """One batch of token ids [2, 17] every step: a model that learns lowers its loss on it."""

    def __init__(self):
        self.tokens = _ids(seq=17, seed=1)

    def batch(self, step, batch_size, seq_len, vocab_size):
        return self.tokens


@pytest.mark.parametrize("family, expected", _cells("train"))
def test_train(family, expected, family_dir, tmp_path):
    _, directory = family_dir(family)
    model = alloy.load(directory)
    if expected == REFUSED:  # an encoder: no next-token loss; `alloy train` says so before any work
        from alloy.train.config import TrainConfig
        from alloy.train.run import train

        (tmp_path / "text.txt").write_text("some text " * 50)
        config = TrainConfig(model=str(directory), data={"path": str(tmp_path / "text.txt")},
                             out_dir=str(tmp_path / "run"), verify=False)
        with pytest.raises(ConfigError, match="is an encoder"):
            train(config, log=lambda *_: None)
        assert not (tmp_path / "run" / "workers").exists()
        return
    losses, _ = reference_run(model.spec, steps=3, global_batch=2, seq_len=16, data=FixedBatch(), model=model)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] > losses[1] > losses[2], losses
    assert expected == YES


@pytest.mark.parametrize("family, expected", _cells("generate"))
def test_generate(family, expected, family_dir):
    hf, directory = family_dir(family)
    model = alloy.load(directory)
    prompt = _ids(batch=1, seq=7, seed=2)
    if expected == REFUSED:
        with pytest.raises(ConfigError, match="is an encoder; it does not generate text"):
            generate(model, prompt.tolist(), max_new_tokens=NEW, eos_ids=())
        return
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW,
                           min_new_tokens=NEW, pad_token_id=0, eos_token_id=None)[0, prompt.shape[1]:].tolist()
    assert [g.tokens for g in generate(model, prompt.tolist(), max_new_tokens=NEW, eos_ids=())] == [want]
    assert expected == YES


# ---- the doc ------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "MODELS.md"
SYMBOLS = {"✓": YES, "refused": REFUSED, "n/a": NA}


def doc_matrix(text: str) -> dict[str, dict[str, str]]:
    """The Markdown table under "## What each family can do", as MATRIX spells it."""
    section = text.split("## What each family can do", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), section[start:]))  # the first table only
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["family", *CAPABILITIES]
    matrix = {}
    for line in rows[2:]:  # after the header and the |---| line
        family, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        matrix[re.sub(r"`", "", family)] = {c: SYMBOLS[v] for c, v in zip(CAPABILITIES, cells, strict=True)}
    return matrix


def test_the_doc_shows_this_matrix():
    assert doc_matrix(DOC.read_text(encoding="utf-8")) == MATRIX
