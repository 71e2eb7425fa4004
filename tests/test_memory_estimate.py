"""The plan's memory estimate against what a training worker really holds at its peak.

A worker records its resident memory before it builds its model and its peak after the run
(`memory` in rankN.json); the difference is what the job added, which is what the plan's
per-stage estimate claims. Bound: 15 % (the issue's), on models big enough (14-34M parameters)
that the tensors, not the interpreter, make up the figure.
"""

from __future__ import annotations

import json

import pytest

from alloy.devices import DeviceProfile, Inventory
from alloy.plan import Workload, make_plan
from alloy.runtime import run
from alloy.runtime.data import DataSource
from alloy.checkpoint import resolve_spec
from alloy.spec import ModelSpec


def spec(hidden: int, layers: int, vocab: int, seq: int) -> ModelSpec:
    return ModelSpec(family="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=8,
                     num_kv_heads=8, head_dim=hidden // 8, intermediate_size=int(hidden * 2.6875), max_seq_len=seq,
                     tie_embeddings=False)


def cpu(name: str) -> DeviceProfile:
    return DeviceProfile(name=name, kind="cpu", memory_bytes=2**34, matmul_flops={"fp32": 1e11},
                         memory_bandwidth_bytes_per_s=1e10, threads=1)


@pytest.mark.parametrize("hidden,layers,vocab,batch,seq,workers", [
    (512, 8, 8192, 8, 128, 1),   # activations and the loss weigh most
    (384, 6, 4096, 6, 256, 1),   # a longer sequence
    (512, 8, 8192, 4, 128, 2),   # data parallel: each worker its share, plus the gradient buckets
])
def test_peak_memory_is_within_15_percent_of_the_plan(tmp_path, hidden, layers, vocab, batch, seq, workers):
    model = spec(hidden, layers, vocab, seq)
    inventory = Inventory(name="cpus", devices=[cpu(f"cpu{i}") for i in range(workers)])
    plan = make_plan(model, inventory, Workload("train", batch, seq, dtype="fp32"), replicas=workers)
    report = run(plan, steps=2, out_dir=tmp_path, data=DataSource("random", seed=0), timeout_s=600)
    stages = [s for r in plan.replicas for s in r.stages]
    assert len(report.ranks) == len(stages) == workers
    for rank, stage in zip(report.ranks, stages):
        used = rank["memory"]["peak_bytes"] - rank["memory"]["before_bytes"]
        assert used == pytest.approx(stage.predicted_memory_bytes, rel=0.15), (used / 2**20, stage)


def test_a_plan_that_cannot_fit_is_refused_before_any_worker_starts(tmp_path, capsys):
    """A plan made on another machine, or edited, is priced again on its own devices: one whose
    stage overflows its device is refused in one line, and no worker is launched."""
    from alloy.cli import main
    from alloy.spec import PRESETS

    config = tmp_path / "config.json"
    config.write_text(json.dumps(PRESETS["tiny-llama"]))
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question. " * 200)
    model = resolve_spec(str(config))
    inventory = Inventory(name="cpus", devices=[cpu("cpu0"), cpu("cpu1")])
    plan = make_plan(model, inventory, Workload("train", 8, 64, dtype="fp32"), replicas=2)
    need = max(s.predicted_memory_bytes for s in plan.stages)
    argv = ["train", f"--model={config}", f"--data.path={text}", "--batch_size=8", "--seq_len=64", "--steps=1",
            "--verify=false", "--devices=auto"]

    small = plan.model_copy(update={"devices": [d.model_copy(update={"memory_bytes": int(need * 0.9)})
                                                for d in plan.devices]})
    small.save(tmp_path / "small.json")
    assert main(argv + [f"--out_dir={tmp_path / 'refused'}", f"--plan={tmp_path / 'small.json'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the tokenizer's progress
    assert err.startswith("alloy train: error:") and "needs" in err and "cpu0" in err, err
    assert not (tmp_path / "refused" / "workers").exists()

    # The same plan with room to spare runs: the check refuses overflow, not plans made elsewhere.
    plan.save(tmp_path / "roomy.json")
    assert main(argv + [f"--out_dir={tmp_path / 'ran'}", f"--plan={tmp_path / 'roomy.json'}"]) == 0, \
        capsys.readouterr().err


@pytest.mark.parametrize("quantize_base", ["q4_0", None])
def test_lora_and_qlora_peak_memory_on_a_100m_model_is_within_15_percent(tmp_path, quantize_base):
    """A ~100M Llama (h768, 12 layers, FFN 2048, vocab 8192) fine-tuned with rank-16 adapters on
    every block linear, its base in fp32 (LoRA) or as Q4_0 blocks (QLoRA): the worker's peak
    against the plan's estimate, which prices the base at the format's bytes, the adapters with
    their AdamW state, and the heap a frozen-base run keeps (alloy.plan.cost.LORA_HEAP_RETAINED)."""
    model = ModelSpec(family="llama", vocab_size=8192, hidden_size=768, num_layers=12, num_heads=12,
                      num_kv_heads=12, head_dim=64, intermediate_size=2048, max_seq_len=128, tie_embeddings=False)
    assert 95e6 < model.num_params() < 100e6
    inventory = Inventory(name="cpus", devices=[cpu("cpu0")])
    work = Workload("train", 4, 128, dtype="fp32", lora_rank=16, quantize_base=quantize_base)
    plan = make_plan(model, inventory, work)
    report = run(plan, steps=2, out_dir=tmp_path, data=DataSource("random", seed=0), timeout_s=600,
                 lora={"rank": 16, "alpha": 32.0, "quantize_base": quantize_base})
    (rank,), (stage,) = report.ranks, plan.replicas[0].stages
    used = rank["memory"]["peak_bytes"] - rank["memory"]["before_bytes"]
    assert used == pytest.approx(stage.predicted_memory_bytes, rel=0.15), (used / 2**20, stage)


def test_qlora_prices_the_base_at_its_format_bytes():
    """The plan's memory moves by exactly the block linears' bytes between fp32 and each format."""
    from alloy.plan.cost import QUANT_BYTES
    from alloy.quant import FORMATS

    assert QUANT_BYTES == {name: f.type_size / f.block_size for name, f in FORMATS.items()}
    model = spec(512, 8, 8192, 128)
    inventory = Inventory(name="cpus", devices=[cpu("cpu0")])
    base = make_plan(model, inventory, Workload("train", 4, 128, dtype="fp32", lora_rank=8))
    linear_params = 8 * (4 * 512 * 512 + 3 * 512 * model.intermediate_size)
    for fmt, per_weight in QUANT_BYTES.items():
        plan = make_plan(model, inventory, Workload("train", 4, 128, dtype="fp32", lora_rank=8, quantize_base=fmt))
        saved = base.replicas[0].stages[0].predicted_memory_bytes - plan.replicas[0].stages[0].predicted_memory_bytes
        # the estimate counts a layer's parameters less its norms (2 h here, 4 h allowed for) as linear
        assert saved == pytest.approx(linear_params * (4 - per_weight), rel=2e-3), fmt


def test_qlora_saves_only_where_the_quantized_base_runs():
    """QLoRA's blocks run on CPU workers; a GPU stage of the run keeps its base in float (the
    engine gives it plain LoRA), so the plan prices the saving on CPU stages only."""
    from alloy.plan.timing import build_problem, stage_memory_bytes

    model = spec(512, 8, 8192, 128)
    gpu = DeviceProfile(name="gpu0", kind="cuda", memory_bytes=2**34, matmul_flops={"fp32": 1e13},
                        memory_bandwidth_bytes_per_s=1e12)
    inventory = Inventory(name="mixed", devices=[cpu("cpu0"), gpu])
    lora = build_problem(model, inventory, Workload("train", 4, 128, dtype="fp32", lora_rank=8))
    qlora = build_problem(model, inventory, Workload("train", 4, 128, dtype="fp32", lora_rank=8, quantize_base="q4_0"))
    on = {d: [stage_memory_bytes(p, 2, 6, 1, 4, 4, d) for p in (lora, qlora)] for d in (0, 1)}
    assert on[1][0] == on[1][1]  # the GPU: as plain LoRA
    assert on[0][1] == pytest.approx(on[0][0] - 4 * qlora.costs.layer_quant_saving_bytes)
    assert qlora.costs.layer_quant_saving_bytes > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "q8_0", "q4_0"])
def test_a_decode_plan_counts_at_least_the_kv_cache_the_prepared_model_makes(dtype):
    """The plan's KV bytes per request token (a block format planned as int8, as `alloy generate
    --devices` plans it) are never below what the prepared model's own cache holds per token:
    int8 and the block formats are weights only, their keys and values fp32 (or bf16)."""
    import torch

    from alloy.infer.optimize import QUANT_FORMATS, prepare
    from alloy.model import Transformer
    from alloy.plan.cost import model_costs

    model_spec = ModelSpec(family="llama", vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, intermediate_size=128, max_seq_len=32)  # widths every format takes
    plan_dtype = "int8" if dtype in QUANT_FORMATS else dtype
    costs = model_costs(model_spec, Workload("infer", 1, 16, dtype=plan_dtype, new_tokens=16))
    planned_per_token = float(costs.layer_kv_bytes_per_sample.sum()) / 32
    torch.manual_seed(0)
    cache = prepare(Transformer(model_spec), dtype).new_cache(1, 32)
    held_per_token = sum(t.numel() * t.element_size() for t in (*cache.k.values(), *cache.v.values())) / 32
    if dtype == "bf16" and cache.k[0].dtype == torch.float32:
        # a CPU whose fused step keeps no bf16 cache (AVX2 builds) decodes bf16 over fp32 keys and
        # values; the device-blind cost model counts bf16's two bytes: a known underestimate there
        pytest.xfail("bf16 on a CPU without the bf16 KV cache: the plan counts 2 bytes, the cache holds 4")
    assert planned_per_token >= held_per_token
    assert planned_per_token <= 2 * held_per_token  # and not far above: at most fp32 for bf16's cache
