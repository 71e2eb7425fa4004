"""QLoRA: LoRA over a frozen base held as GGUF blocks.

The claim is exactness against a reference that is independent of the quantized path: the same
model with each block linear's weight replaced by the values its blocks decode to (a plain
nn.Linear, plain LoRA, autograd's own matmuls) — loss, adapter gradients and, over real worker
processes, a whole uneven run, in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alloy.errors import ConfigError
from alloy.model import Transformer
from alloy.model.init import init_params
from alloy.model.lora import LoraConfig, LoraLinear, apply_lora, init_lora_params, quantize_base
from alloy.quant.linear import QuantLinear
from alloy.runtime import DataSource, OptimConfig, RunLayout, job_document, reference_run, run_job
from alloy.runtime.engine import token_loss_sum
from alloy.spec import ModelSpec

SPEC = ModelSpec(family="llama", vocab_size=96, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=96, max_seq_len=64, tie_embeddings=False)
LORA = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wv", "down"]}
TOL = 1e-10  # float64 on both sides; the weights are the same decoded values


def _dequantized_twin(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each quantized linear's weight as its blocks decode it (the reference's plain weights)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            owner = name.removesuffix(".base")  # a LoraLinear's base, or a bare frozen linear
            out[f"{owner}.weight"] = module.dequantized().double()
    return out


def _reference(fmt: str) -> nn.Module:
    """Plain LoRA (float64) over the weights the quantized model decodes."""
    quantized = init_params(Transformer(SPEC), 0)
    quantize_base(apply_lora(quantized, LoraConfig(**LORA)), fmt)
    reference = init_params(Transformer(SPEC), 0).double()
    with torch.no_grad():
        for key, value in _dequantized_twin(quantized).items():
            reference.get_parameter(key).copy_(value)
    return init_lora_params(apply_lora(reference, LoraConfig(**LORA)), 0)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])  # Q4_K (256-wide blocks): the next test
def test_qlora_loss_and_adapter_gradients_equal_lora_on_the_decoded_weights(fmt):
    reference = _reference(fmt)
    model = init_params(Transformer(SPEC), 0).double()
    init_lora_params(apply_lora(model, LoraConfig(**LORA)), 0)
    quantize_base(model, fmt)
    for module in [*reference.modules(), *model.modules()]:  # B != 0, so the adapters act
        if isinstance(module, LoraLinear):
            with torch.no_grad():
                module.lora_B.copy_(torch.linspace(-0.5, 0.5, module.lora_B.numel(), dtype=torch.float64)
                                    .view_as(module.lora_B))
    ids = torch.randint(0, SPEC.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (reference, model):
        loss = token_loss_sum(m(ids[:, :-1]), ids[:, 1:]) / ids[:, 1:].numel()
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=TOL, abs=0)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref_grads) and grads
    for name, grad in grads.items():
        assert ((grad - ref_grads[name]).norm() / ref_grads[name].norm()).item() <= TOL, name


def test_q4_k_qlora_input_gradient_is_the_decoded_weights_transpose():
    """Q4_K (256-weight super-blocks): the frozen layer's backward is dy @ W of the decoded W."""
    weight = torch.randn(48, 512, generator=torch.Generator().manual_seed(0))
    layer = QuantLinear.from_weight(weight, None, "q4_k", exact=True)
    decoded = layer.dequantized().double()
    x = torch.randn(5, 512, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 48, dtype=torch.float64)
    y = layer(x)
    y.backward(dy)
    assert torch.allclose(y, x.detach() @ decoded.t(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(x.grad, dy @ decoded, rtol=1e-12, atol=1e-12)


def test_quantize_base_holds_no_float_copy_of_the_block_linears():
    model = init_params(Transformer(SPEC), 0)
    quantize_base(apply_lora(model, LoraConfig(**LORA)), "q4_0")
    float_weights = [n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2
                     and ".lora_" not in n]
    assert float_weights == []
    held = sum(b.numel() for n, b in model.named_buffers() if n.endswith(".blocks"))
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    assert held == linear * 18 // 32  # Q4_0: 18 bytes per 32 weights


def test_qlora_bad_input_is_a_typed_one_line_error():
    with pytest.raises(ConfigError, match="unknown quantized format 'q3_k'"):
        LoraConfig(rank=4, quantize_base="q3_k")
    narrow = ModelSpec(family="llama", vocab_size=32, hidden_size=24, num_layers=1, num_heads=2, num_kv_heads=2,
                       head_dim=12, intermediate_size=40, max_seq_len=16)
    model = apply_lora(init_params(Transformer(narrow), 0), LoraConfig(rank=2))
    with pytest.raises(ConfigError, match="not a multiple of q4_0's block of 32"):
        quantize_base(model, "q4_0")
    trainable = init_params(Transformer(SPEC), 0)  # no apply_lora: its linears still train
    with pytest.raises(ConfigError, match="trainable"):
        quantize_base(trainable, "q8_0")


LAYOUTS = {
    # uneven data parallel: 2 and 1 samples of a 3-sample batch
    "dp-2-1": RunLayout.of([[(f"cpu{i}", 0, 3)] for i in range(2)], (2, 1), (1, 1)),
    # uneven pipeline: 2 layers (with the embeddings) then 1 (with the head)
    "pp-2-1": RunLayout.of([[("cpu0", 0, 2), ("cpu1", 2, 3)]], (3,), (3,)),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_distributed_qlora_equals_a_single_process(name, tmp_path):
    """Workers build their stage layer by layer (alloy.runtime.build) and quantize it; the run
    equals one process training plain LoRA over the decoded weights."""
    layout, steps, seq, fmt = LAYOUTS[name], 3, 8, "q8_0"
    data, optim = DataSource("random", seed=5), OptimConfig(lr=1e-2, weight_decay=0.1)
    ref_losses, ref_state = reference_run(SPEC, steps=steps, global_batch=layout.global_batch, seq_len=seq,
                                          data=data, optim=optim, dtype=torch.float64, model=_reference(fmt))
    job = job_document(SPEC, layout, steps=steps, seq_len=seq, out_dir=tmp_path, data=data, optim=optim,
                       threads=1, timeout_s=60, param_dtype="fp64", lora=LORA | {"quantize_base": fmt})
    report = run_job(job, timeout_s=240)
    assert report.losses == pytest.approx(ref_losses, rel=TOL, abs=0)
    state = report.state_dict()
    adapters = {k for k in state if k.endswith((".lora_A", ".lora_B"))}
    assert adapters == {k for k in ref_state if k.endswith((".lora_A", ".lora_B"))}
    for key in adapters:
        assert ((state[key] - ref_state[key]).norm() / ref_state[key].norm()).item() <= TOL, key
    assert all(state[k].abs().max() > 1e-4 for k in adapters if k.endswith("lora_B"))  # they trained


def test_alloy_train_runs_qlora_and_records_it_in_the_plan(tmp_path):
    """`lora.quantize_base` in a training config: the planned workers train adapters over a Q8_0
    base (loss falls), plan.json says QLoRA, and final/ is a PEFT adapter that loads over the base."""
    import json

    import transformers

    import alloy
    from alloy.checkpoint.lora import load_adapter
    from alloy.train.config import load_config
    from alloy.train.run import train
    from train_cases import MODEL, make_workspace, write_config

    workspace = make_workspace(tmp_path)
    kwargs = {k: v for k, v in MODEL.items() if k != "model_type"}
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **kwargs))
    hf.save_pretrained(workspace / "base")
    config = write_config(workspace, "qlora", model=str(workspace / "base"), steps=6, optimizer={"lr": 2e-2},
                          lora={"rank": 4, "alpha": 8, "quantize_base": "q8_0"})
    result = train(load_config(config), log=lambda *_: None)
    lines = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]
    plan = json.loads((result.out_dir / "plan.json").read_text())
    assert plan["lora_rank"] == 4 and plan["quantize_base"] == "q8_0"
    ours = load_adapter(alloy.load(workspace / "base"), result.final_dir)
    assert any(m.lora_B.abs().max() > 1e-4 for m in ours.modules() if isinstance(m, LoraLinear))
