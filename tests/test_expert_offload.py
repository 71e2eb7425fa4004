"""Expert offload over processes: a stage keeps attention, an expert rank holds and runs the MoE
modules (router and experts) of some of its layers. Generation must equal the one-process model's,
and each side must hold only its own tensors."""

from __future__ import annotations

import json

import pytest
import torch

import alloy
from alloy.errors import ConfigError
from alloy.infer import Sampling, generate
from alloy.infer.distributed import RemoteMoE, generate_distributed, load_stage
from alloy.infer.load import load_experts, load_for_decoding
from alloy.infer.partition import ExpertSpec, StageSpec, expert_ranks, stages_from_plan
from alloy.model.moe import MoE

VOCAB = 96
NEW = 8
# case -> (one stage with these layers' experts offloaded, two stages: the second's offloaded).
# Qwen3-MoE's layer 1 is dense (mlp_only_layers): in a range it stays with its stage.
PLACEMENTS = {
    "mixtral": ((1, 3), [(0, 1), (1, 3)]),
    "qwen3-moe": ((1, 3), [(0, 2), (2, 3)]),
}


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _one_stage(offloaded, cpu_slice=None):
    return [StageSpec("cpu", (0, 3), True, True, ExpertSpec("cpu", offloaded, cpu_slice))]


def _two_stages(split, cpu_slice=None):
    (a, b), (c, d) = split
    return [StageSpec("cpu", (a, b), True, False), StageSpec("cpu", (c, d), False, True,
                                                             ExpertSpec("cpu", (c, d), cpu_slice))]


def _tensors(module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters()) | dict(module.named_buffers())


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_stage_and_expert_rank_hold_disjoint_parts_that_make_the_model(name, saved):
    from alloy.checkpoint.io import open_model

    _, directory = saved(name)
    offloaded, _ = PLACEMENTS[name]
    whole = alloy.load(directory)
    moe_layers = [i for i in range(*offloaded) if whole.spec.is_moe_layer(i)]  # a dense one stays
    assert name != "qwen3-moe" or len(moe_layers) < len(range(*offloaded))
    stages = _one_stage(offloaded)

    # unprepared: the stage's parameters are the whole model's less exactly those MoE modules
    read = open_model(directory)
    stand_ins = {f"layers.{i}.mlp": RemoteMoE(i, 1, torch.float32) for i in moe_layers}
    stage = read(layers=(0, 3), stand_ins=stand_ins)
    moe_params = sum(p.numel() for i in moe_layers for p in whole.layers[str(i)].mlp.parameters())
    assert moe_params > 0
    assert sum(p.numel() for p in stage.parameters()) == sum(p.numel() for p in whole.parameters()) - moe_params
    assert not [n for n in _tensors(stage) if any(n.startswith(f"layers.{i}.mlp.") for i in moe_layers)]

    # prepared for decoding, as the ranks load them
    stage = load_stage(directory, stages, 0)
    assert [stage.layers[str(i)].mlp.peer for i in range(*offloaded)
            if isinstance(stage.layers[str(i)].mlp, RemoteMoE)] == [1] * len(moe_layers)
    assert not [n for n in _tensors(stage) if any(n.startswith(f"layers.{i}.mlp.") for i in moe_layers)]
    experts = load_experts(directory, offloaded)
    assert sorted(experts) == [str(i) for i in moe_layers]
    assert all(isinstance(m, MoE) for m in experts.values())
    names = list(_tensors(experts))
    assert names and all(".router." in n or ".experts." in n for n in names), names
    whole_prepared = load_for_decoding(directory)
    sizes = lambda m: sum(t.numel() for t in _tensors(m).values())  # noqa: E731
    assert sizes(stage) + sizes(experts) == sizes(whole_prepared)

    # the stage with the expert modules put back in place of its stand-ins gives the model's logits
    local = load_for_decoding(directory, stand_ins={f"layers.{i}.mlp": experts[str(i)] for i in moe_layers})
    ids = torch.tensor(_prompts([6, 6], seed=1))
    with torch.inference_mode():
        torch.testing.assert_close(local(ids), whole_prepared(ids), rtol=0, atol=0)


def test_quantized_stage_holds_no_experts(saved):
    _, directory = saved("mixtral")  # every layer's experts offloaded: the rest is Q8_0-wide
    stage = load_stage(directory, _one_stage((0, 3)), 0, "q8_0")
    assert all(isinstance(stage.layers[str(i)].mlp, RemoteMoE) for i in range(3))
    assert not [n for n in _tensors(stage) if ".mlp." in n]


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_offloaded_generation_equals_one_process(name, saved):
    _, directory = saved(name)
    offloaded, split = PLACEMENTS[name]
    prompts = _prompts([5, 3], seed=len(name))
    whole = alloy.load(directory)
    expected = [g.tokens for g in generate(whole, prompts, max_new_tokens=NEW, eos_ids=())]

    got, timings = generate_distributed(directory, _one_stage(offloaded), prompts, max_new_tokens=NEW, eos_ids=(),
                                        timings=True)
    assert got == expected
    assert timings["prefill_s"] > 0 and timings["decode_s"] > 0
    assert timings["decode_steps"] == NEW - 1 and timings["decode_tokens"] == (NEW - 1) * len(prompts)
    # two stages and an expert rank pinned to core 0 (an emulated device's slice)
    stages = _two_stages(split, cpu_slice={"cores": [0]})
    assert expert_ranks(stages) == {2: 1}
    assert generate_distributed(directory, stages, prompts, max_new_tokens=NEW, eos_ids=()) == expected


def test_offloaded_sampling_equals_one_process(saved):
    _, directory = saved("mixtral")
    prompts = _prompts([4, 6], seed=7)
    sampling = Sampling(temperature=0.9, top_k=20, seed=3)
    expected = [g.tokens for g in generate(alloy.load(directory), prompts, max_new_tokens=NEW, sampling=sampling,
                                           eos_ids=())]
    got = generate_distributed(directory, _one_stage((0, 3)), prompts, max_new_tokens=NEW, sampling=sampling,
                               eos_ids=())
    assert got == expected


@pytest.mark.parametrize("name, stages, words", [
    ("qwen3-moe", _one_stage((1, 2)), "has only dense layers there"),  # layer 1 is dense
    ("mixtral", [StageSpec("cpu", (0, 1), True, False),
                 StageSpec("cpu", (1, 3), False, True, ExpertSpec("cpu", (0, 2)))], "within them"),
    ("mixtral", _one_stage((2, 2)), "non-empty"),
    ("llama-gqa", _one_stage((0, 1)), "has no experts"),
])
def test_bad_expert_placements_are_refused(name, stages, words, saved):
    _, directory = saved(name)
    with pytest.raises(ConfigError) as err:
        generate_distributed(directory, stages, _prompts([3]), max_new_tokens=2)
    assert words in str(err.value) and "\n" not in str(err.value)


def _plan(spec, experts_layers):
    from alloy.devices import CpuSlice, DeviceProfile
    from alloy.plan.plan import ExpertPlacement, ModelSummary, Plan, ReplicaPlan, Stage

    def device(name, cores):
        return DeviceProfile(name=name, kind="cpu", memory_bytes=1 << 30, matmul_flops={"fp32": 1e11},
                             memory_bandwidth_bytes_per_s=1e10, cpu_slice=CpuSlice(cores=cores))

    placement = ExpertPlacement(rank=1, device="small", layers=experts_layers, predicted_memory_bytes=1.0,
                                memory_capacity_bytes=2.0, predicted_busy_s=1.0)
    stage = Stage(rank=0, replica=0, position=0, device="big", layers=(0, spec.num_layers), has_embed=True,
                  has_head=True, predicted_memory_bytes=1.0, memory_capacity_bytes=2.0, predicted_busy_s=1.0,
                  predicted_utilisation=0.5, experts=placement)
    summary = ModelSummary(family=spec.family, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                           vocab_size=spec.vocab_size, num_params=1, max_seq_len=spec.max_seq_len,
                           spec=spec.to_dict())
    replica = ReplicaPlan(index=0, batch_share=1, micro_batches=1, predicted_time_s=1.0, stages=[stage])
    return Plan.model_construct(task="infer", model=summary, devices=[device("big", [0, 1]), device("small", [1])],
                                replicas=[replica])


def test_stages_from_plan_carry_experts_and_cpu_slices(saved):
    _, directory = saved("qwen3-moe")
    spec = alloy.load(directory).spec
    (stage,) = stages_from_plan(_plan(spec, (2, 3)))
    assert stage == StageSpec("cpu", (0, 3), True, True, ExpertSpec("cpu", (2, 3), {"cores": [1], "quota": None}),
                              {"cores": [0, 1], "quota": None})
    assert StageSpec.from_dict(__import__("dataclasses").asdict(stage)) == stage
    with pytest.raises(ConfigError, match="has only dense layers there"):
        stages_from_plan(_plan(spec, (1, 2)))


def test_cli_generate_runs_a_planned_expert_placement_over_processes(tmp_path, capsys):
    """`alloy plan` output with experts apart from attention, fed to `alloy generate --plan`: it runs
    over processes on its own (no --processes) and gives the single-process greedy tokens."""
    from hf_cases import build_hf, char_tokenizer

    from alloy.cli import main
    from alloy.devices import DeviceProfile, Inventory
    from alloy.plan import Workload
    from alloy.plan.planner import expert_offload_plan

    build_hf("mixtral").save_pretrained(tmp_path)
    char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    spec = alloy.load(tmp_path).spec
    devices = [DeviceProfile(name=n, kind="cpu", memory_bytes=1 << 30, matmul_flops={"fp32": 1e11},
                             memory_bandwidth_bytes_per_s=1e10) for n in ("fast", "roomy")]
    plan = expert_offload_plan(spec, Inventory(devices=devices), Workload("infer", 1, 5, dtype="fp32", new_tokens=6))
    assert plan.stages[0].experts is not None
    plan.save(tmp_path / "plan.json")
    args = ["generate", "--model", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "6", "--json"]
    assert main(args) == 0
    expected = json.loads(capsys.readouterr().out)["tokens"]
    assert main(args + ["--plan", str(tmp_path / "plan.json")]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == expected
