"""The planner knows LoRA: a frozen base needs no gradient, optimizer state or all-reduce, so the
README's 8B example fits the workstation."""

from __future__ import annotations

import pytest
import torch

from alloy.devices import Inventory
from alloy.errors import PlanError
from alloy.model import Transformer
from alloy.model.lora import LoraConfig, apply_lora
from alloy.plan import Workload, make_plan
from alloy.plan.cost import ADAMW_STATE_BYTES, DTYPE_BYTES, LORA_HEAP_RETAINED, model_costs
from alloy.plan.timing import build_problem, stage_memory_bytes, stage_params, sync_cost
from alloy.checkpoint import resolve_spec

WORKSTATION = "examples/clusters/workstation.json"


def test_the_readme_8b_example_plans_as_lora_and_not_as_full_training():
    spec, inventory = resolve_spec("llama-3.1-8b"), Inventory.load(WORKSTATION)
    with pytest.raises(PlanError, match="needs"):
        make_plan(spec, inventory, Workload("train", 16, 2048))
    plan = make_plan(spec, inventory, Workload("train", 16, 2048, lora_rank=16))
    stages = [s for r in plan.replicas for s in r.stages]
    assert sum(s.layers[1] - s.layers[0] for s in stages) == spec.num_layers
    for stage in stages:
        assert stage.predicted_memory_bytes <= stage.memory_capacity_bytes


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_lora_saves_at_least_the_frozen_gradients_and_optimizer_state(dtype):
    spec, inventory = resolve_spec("llama-3.1-8b"), Inventory.load(WORKSTATION)
    full = build_problem(spec, inventory, Workload("train", 16, 2048, dtype=dtype))
    lora = build_problem(spec, inventory, Workload("train", 16, 2048, dtype=dtype, lora_rank=16))
    adapter_bytes = lora.costs.layer_adapter_params * lora.costs.adapter_state_bytes
    for start, stop in ((0, 3), (3, 18), (18, 32), (0, 32)):
        saved = (stage_memory_bytes(full, start, stop, 2, 1, 16) - stage_memory_bytes(lora, start, stop, 2, 1, 16))
        grads_and_adamw = stage_params(full, start, stop) * (DTYPE_BYTES[dtype] + ADAMW_STATE_BYTES)
        # a frozen-base run's heap keeps more of its freed forward temporaries (measured, priced)
        retained = LORA_HEAP_RETAINED * 2 * (lora.prefix_act_bytes[stop] - lora.prefix_act_bytes[start])
        assert saved >= grads_and_adamw - (stop - start) * adapter_bytes - retained
        assert saved > 0.5 * grads_and_adamw  # the adapters are a rounding error next to it
    # data parallel moves only the adapters' gradient
    two = sync_cost(lora, [(0,), (1,)]).total_s
    assert 0 < two < sync_cost(full, [(0,), (1,)]).total_s / 50


def test_the_planned_adapter_count_is_what_the_runtime_trains():
    spec = resolve_spec("llama-3.1-8b")
    costs = model_costs(spec, Workload("train", 1, 128, dtype="fp32", lora_rank=16))
    with torch.device("meta"):
        model = apply_lora(Transformer(spec), LoraConfig(rank=16))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert costs.layer_adapter_params * spec.num_layers == trainable
    assert costs.total_param_bytes == trainable * 4


def test_lora_rank_must_be_positive():
    with pytest.raises(PlanError, match="lora rank"):
        Workload("train", 1, 128, lora_rank=0)
    with pytest.raises(PlanError, match="lora rank"):
        Workload("infer", 1, 128, lora_rank=8)



def test_the_plan_document_records_the_lora_rank(tmp_path, capsys):
    """plan.json says whether it priced a LoRA run, and a LoRA plan read back is priced as one: the
    8B example, which fits only as LoRA, passes the check a plan from elsewhere gets."""
    import json

    from pydantic import ValidationError

    from alloy.cli import main
    from alloy.plan import Plan
    from alloy.plan.planner import check_fits

    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "llama-3.1-8b", "--devices", WORKSTATION, "--batch-size", "16",
                 "--lora-rank", "16", "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["lora_rank"] == 16
    plan = Plan.load(out)
    assert plan.lora_rank == 16
    check_fits(plan, resolve_spec("llama-3.1-8b"), str(out))
    full = make_plan(resolve_spec("tiny-llama"), Inventory.load(WORKSTATION), Workload("train", 4, 128))
    assert full.lora_rank is None
    before = json.loads(full.to_json())
    del before["lora_rank"]  # a version-1 plan written before the field: full training
    assert Plan.model_validate(before).lora_rank is None
    with pytest.raises(ValidationError, match="lora_rank"):
        Plan.model_validate(before | {"lora_rank": 0})
