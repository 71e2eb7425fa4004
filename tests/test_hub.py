"""Hub ids: `org/name[@revision]` loads from a Hugging Face cache built here in the hub's layout
(models--org--name/snapshots/<commit>/..., refs/<branch>), never from the network."""

from __future__ import annotations

import shutil

import pytest
import torch

import alloy
from alloy.cli import main
from alloy.errors import CheckpointError
from hf_cases import build_hf, char_tokenizer

hub_constants = pytest.importorskip("huggingface_hub.constants")

COMMIT, OTHER = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Two tiny saved Llamas (different seeds) with a tokenizer."""
    folders = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"llama{seed}")
        build_hf("llama-gqa", seed=seed).save_pretrained(folder)
        char_tokenizer().save(str(folder / "tokenizer.json"))
        folders.append(folder)
    return folders


@pytest.fixture
def cache(tmp_path, monkeypatch, hf_models):
    """A hub cache: org/tiny at main = COMMIT and at branch `v2` = OTHER (the other weights),
    org/tiny-gguf holding one GGUF file. huggingface_hub reads its settings at import, so the
    module's constants are set as well as the environment."""
    root = tmp_path / "hub"
    repo = root / "models--org--tiny"
    shutil.copytree(hf_models[0], repo / "snapshots" / COMMIT)
    shutil.copytree(hf_models[1], repo / "snapshots" / OTHER)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v2").write_text(OTHER)
    gguf_snapshot = root / "models--org--tiny-gguf" / "snapshots" / COMMIT
    gguf_snapshot.mkdir(parents=True)
    assert main(["export", str(hf_models[0]), "--format", "gguf", "--out", str(gguf_snapshot / "tiny.Q.gguf")]) == 0
    (gguf_snapshot.parent.parent / "refs").mkdir()
    (gguf_snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
    for name, value in (("HF_HUB_CACHE", str(root)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return root


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_a_cached_model_loads_by_id_and_by_revision(cache, hf_models):
    ids = torch.randint(0, 96, (1, 9))
    main_weights = _logits(alloy.load(hf_models[0]), ids)
    v2_weights = _logits(alloy.load(hf_models[1]), ids)
    assert not torch.allclose(main_weights, v2_weights)  # the revisions are told apart, not assumed
    for name, want in (("org/tiny", main_weights), (f"org/tiny@{COMMIT}", main_weights),
                       ("org/tiny@v2", v2_weights), (f"org/tiny@{OTHER}", v2_weights)):
        model = alloy.load(name)
        torch.testing.assert_close(_logits(model, ids), want, rtol=0, atol=0, msg=name)
        assert model.tokenizer is not None
    # a repo of one GGUF file loads by id too
    torch.testing.assert_close(_logits(alloy.load("org/tiny-gguf"), ids), main_weights, rtol=0, atol=1e-5)


def test_the_cli_takes_hub_ids(cache, capsys):
    assert main(["inspect", "org/tiny", "--check"]) == 0
    assert "every tensor accounted for" in capsys.readouterr().out
    assert main(["generate", "--model", "org/tiny@v2", "--prompt", "hello", "--max-new-tokens", "2"]) == 0
    assert main(["inspect", "org/tiny-gguf", "--json"]) == 0  # a spec (plan's path) from a GGUF repo
    assert '"family": "llama"' in capsys.readouterr().out


def test_a_missing_model_says_how_to_get_it(cache, capsys):
    for name in ("org/absent", "org/tiny@v9"):
        with pytest.raises(CheckpointError) as err:
            alloy.load(name)
        assert str(err.value) == f"{name}: not in the local Hugging Face cache — run `alloy pull {name}`"
    assert main(["generate", "--model", "org/absent", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "run `alloy pull org/absent`" in err


def test_pull_offline_fails_in_one_line(cache, capsys):
    assert main(["pull", "org/absent"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "Traceback" not in err and "cannot download" in err
    assert main(["pull", "not a hub id"]) == 2
    assert "is not a hub id" in capsys.readouterr().err
