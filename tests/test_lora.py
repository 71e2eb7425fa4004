"""LoRA parity with PEFT on transformers: the same adapter gives the same loss, gradients and
logits, and adapters travel both ways in PEFT's own format. B is random in every test (PEFT's
init makes it zero), so the adapter changes the output and parity cannot hold vacuously."""

from __future__ import annotations

import copy

import pytest
import torch

import alloy
from alloy.checkpoint.lora import adapter_files, load_adapter, read_adapter, save_adapter
from alloy.errors import CheckpointError, ConfigError
from alloy.model.lora import LoraConfig, LoraLinear, apply_lora, lora_modules, lora_state_dict, merge_lora
from alloy.runtime.engine import token_loss_sum
from hf_cases import build_hf, hf_output

peft = pytest.importorskip("peft")

VOCAB, SEQ = 96, 12
RANK, ALPHA = 4, 8.0
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# PEFT's target names per family: HF's own, fused where HF fuses
HF_TARGETS = {
    "llama-gqa": LLAMA_TARGETS, "qwen2-bias-sliding": LLAMA_TARGETS, "gemma-mqa": LLAMA_TARGETS,
    "phi3-fused-partial": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "neox-parallel-partial": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
SEPARATE_QKV = ["llama-gqa", "qwen2-bias-sliding", "gemma-mqa"]


def _peft_model(name, dtype, seed=1):
    """transformers + PEFT with random B (and PEFT's own A init)."""
    hf = build_hf(name).to(dtype)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS[name],
                             fan_in_fan_out=name == "gpt2")
    model = peft.get_peft_model(hf, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.1)
    return model


def _peft_grads(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if "lora_" in n}


def _ids(batch=2):
    return torch.randint(0, VOCAB, (batch, SEQ + 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", SEPARATE_QKV)
def test_loss_and_adapter_gradients_equal_peft(name, dtype, saved, tmp_path):
    _, directory = saved(name)
    theirs = _peft_model(name, dtype)
    theirs.save_pretrained(tmp_path)
    ours = apply_lora(alloy.load(directory, dtype=dtype), LoraConfig(rank=RANK, alpha=ALPHA))
    # apply_lora targets exactly the linears PEFT did, at PEFT's rank; now give them PEFT's values
    adapters, _ = read_adapter(ours.spec, tmp_path)
    assert set(adapters) == set(lora_modules(ours))
    with torch.no_grad():
        for module_name, (A, B, scale) in adapters.items():
            module = ours.get_submodule(module_name)
            assert module.lora_A.shape == A.shape and module.scale == scale
            module.lora_A.copy_(A)
            module.lora_B.copy_(B)

    ids = _ids()
    if dtype == torch.float32:
        their_loss = theirs(input_ids=ids, labels=ids).loss  # transformers' own loss
    else:  # transformers computes its loss in fp32 whatever the model's dtype: take the logits instead
        their_loss = token_loss_sum(theirs(input_ids=ids[:, :-1]).logits, ids[:, 1:]) / ids[:, 1:].numel()
    their_loss.backward()
    our_loss = token_loss_sum(ours(ids[:, :-1]), ids[:, 1:]) / ids[:, 1:].numel()
    our_loss.backward()

    # transformers runs its norms and RoPE tables in fp32 even in a float64 model (~1e-8 relative);
    # fp32 is the bound
    rtol = 1e-6 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(our_loss, their_loss, rtol=rtol, atol=0)
    grads = {n: (m.lora_A.grad, m.lora_B.grad, m.scale) for n, m in lora_modules(ours).items()}
    ours_by_peft_name, _ = adapter_files(ours.spec, grads)
    expected = _peft_grads(theirs)
    assert ours_by_peft_name.keys() == expected.keys()
    for key, grad in ours_by_peft_name.items():
        # relative to the tensor's size: single entries of a gradient may be near zero
        error = (grad - expected[key]).norm() / expected[key].norm()
        assert error <= rtol, f"{key}: relative error {float(error):.2e}"
    # only the adapters learn: the base has no gradients at all
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)
    assert sum(p.requires_grad for p in ours.parameters()) == 2 * len(adapters)


@pytest.mark.parametrize("name", list(HF_TARGETS))
def test_peft_adapter_loads_into_alloy(name, saved, tmp_path):
    _, directory = saved(name)
    theirs = _peft_model(name, torch.float32).eval()
    theirs.save_pretrained(tmp_path)
    base = alloy.load(directory)
    ids = _ids()[:, :-1]
    with torch.no_grad():
        plain = base(ids)
        ours = load_adapter(base, tmp_path)(ids)
    expected = hf_output(theirs, ids)
    assert (expected - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def _random_adapter(model, seed=2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name", list(HF_TARGETS))
def test_alloy_adapter_loads_into_peft(name, saved, tmp_path):
    hf, directory = saved(name)
    ours = _random_adapter(apply_lora(alloy.load(directory), LoraConfig(rank=RANK, alpha=ALPHA)))
    save_adapter(ours, tmp_path, base_model=str(directory))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    ids = _ids()[:, :-1]
    with torch.no_grad():
        got = ours.eval()(ids)
    torch.testing.assert_close(got, hf_output(theirs, ids), atol=1e-4, rtol=0)
    assert (got - hf_output(hf, ids)).abs().max() > 1e-2
    # and back into Alloy: the same function
    with torch.no_grad():
        again = load_adapter(alloy.load(directory), tmp_path)(ids)
    torch.testing.assert_close(again, got, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_merge_equals_unmerged_forward(name, saved):
    _, directory = saved(name)
    model = _random_adapter(apply_lora(alloy.load(directory), LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.1)))
    model.eval()  # dropout off: merging folds the adapter's eval-time function
    ids = _ids()[:, :-1]
    with torch.no_grad():
        before = model(ids)
        merge_lora(model)
        after = model(ids)
    assert not lora_modules(model) and not any(isinstance(m, LoraLinear) for m in model.modules())
    assert not lora_state_dict(model)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_init_is_peft_and_starts_at_the_base(saved):
    _, directory = saved("llama-gqa")
    base = alloy.load(directory)
    ids = _ids()[:, :-1]
    with torch.no_grad():
        plain = base(ids)
        model = apply_lora(base, LoraConfig(rank=RANK, alpha=ALPHA, targets=("wq", "wv")))
        assert torch.equal(model(ids), plain)  # B = 0
    modules = lora_modules(model)
    assert sorted({n.rpartition(".")[2] for n in modules}) == ["wq", "wv"]
    for m in modules.values():
        bound = 1 / m.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on [rank, in]
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > bound / 2
        assert m.scale == ALPHA / RANK
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))


def test_bad_input_is_a_typed_error(saved, tmp_path):
    _, llama_dir = saved("llama-gqa")
    _, gemma_dir = saved("gemma-mqa")
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="q_proj"):
        apply_lora(alloy.load(llama_dir), LoraConfig(targets=("q_proj",)))
    save_adapter(_random_adapter(apply_lora(alloy.load(llama_dir), LoraConfig(rank=RANK))), tmp_path / "llama")
    with pytest.raises(CheckpointError, match="different base model"):
        load_adapter(alloy.load(gemma_dir), tmp_path / "llama")  # wq is 32 wide there, 64 here
    _peft_model("gpt2", torch.float32).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="different base model"):
        load_adapter(alloy.load(llama_dir), tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="not a PEFT adapter"):
        load_adapter(alloy.load(llama_dir), llama_dir)


def test_generate_with_an_adapter_follows_transformers_and_peft(tmp_path, capsys):
    """`alloy generate --lora DIR`: the greedy continuation of transformers + PEFT with that adapter."""
    import json

    from alloy.cli import main
    from hf_cases import char_tokenizer

    directory = tmp_path / "base"
    build_hf("llama-gqa").save_pretrained(directory)
    char_tokenizer().save(str(directory / "tokenizer.json"))
    theirs = _peft_model("llama-gqa", torch.float32, seed=5).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ids = [ord(c) - 32 for c in "Hello"]  # the char tokenizer: printable ASCII from id 0
    with torch.no_grad():
        expected = list(ids)
        for _ in range(8):
            expected.append(int(theirs(input_ids=torch.tensor([expected])).logits[0, -1].argmax()))
    code = main(["generate", "--model", str(directory), "--prompt", "Hello", "--max-new-tokens", "8", "--json",
                 "--lora", str(tmp_path / "adapter")])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["tokens"] == expected[len(ids):]
    code = main(["generate", "--model", str(directory), "--prompt", "Hello", "--max-new-tokens", "8", "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] != record["tokens"]  # the adapter changed the text


@pytest.mark.parametrize("name", ["phi3-fused-partial", "neox-parallel-partial"])
def test_some_parts_of_a_fused_linear_save_as_one_peft_adapter(name, saved, tmp_path):
    """Adapters on q and v only, where HF fuses q/k/v: PEFT gets one block-structured adapter with
    zero rows for k, and runs the same function."""
    hf, directory = saved(name)
    config = LoraConfig(rank=RANK, alpha=ALPHA, targets=("wq", "wv"))
    ours = _random_adapter(apply_lora(alloy.load(directory), config)).eval()
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    ids = _ids()[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_output(theirs, ids), atol=1e-4, rtol=0)
