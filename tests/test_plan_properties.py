"""Properties every plan must have, on clusters hypothesis draws."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from alloy.devices import DeviceProfile, Inventory
from alloy.errors import PlanError
from alloy.plan import Plan, Workload, make_plan
from alloy.plan.plan import SCHEMA_PATH, plan_schema
from alloy.checkpoint import resolve_spec

GIB = 2**30
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

flops = st.floats(1e10, 1e12)
memory = st.integers(1 * GIB, 8 * GIB)


def device(name, rate, memory_bytes, node="n0"):
    return DeviceProfile(name=name, kind="cuda", node=node, memory_bytes=memory_bytes,
                         matmul_flops={"bf16": rate}, memory_bandwidth_bytes_per_s=rate / 100)


def spec_with(layers):
    return resolve_spec("llama-3.2-1b").replace(num_layers=layers)


def work(batch, task="train"):
    return Workload(task=task, batch_size=batch, seq_len=256, new_tokens=16)


def assigned_flops(plan: Plan, name: str) -> float:
    rates = {d.name: d.flops(plan.dtype) for d in plan.devices}
    return sum(s.predicted_busy_s * rates[s.device] for s in plan.stages if s.device == name)


@SETTINGS
@given(count=st.integers(2, 4), rate=flops, mem=memory, batch=st.integers(4, 24), layers=st.integers(2, 8))
def test_identical_devices_get_equal_shares(count, rate, mem, batch, layers):
    inventory = Inventory(devices=[device(f"g{i}", rate, 40 * GIB) for i in range(count)])
    plan = make_plan(spec_with(layers), inventory, work(batch), replicas=count)
    shares = [r.batch_share for r in plan.replicas]
    assert sum(shares) == batch
    assert max(shares) - min(shares) <= 1


@SETTINGS
@given(slow=flops, ratio=st.floats(2.0, 4.0), batch=st.integers(1, 12), layers=st.integers(2, 10))
def test_a_device_twice_as_fast_never_gets_less_work(slow, ratio, batch, layers):
    # Same memory and link, so swapping the two devices' roles is always possible.
    inventory = Inventory(devices=[device("slow", slow, 40 * GIB), device("fast", slow * ratio, 40 * GIB)])
    plan = make_plan(spec_with(layers), inventory, Workload(task="train", batch_size=batch, seq_len=256))
    assert assigned_flops(plan, "fast") >= assigned_flops(plan, "slow") * (1 - 1e-9)


@SETTINGS
@given(rates=st.lists(flops, min_size=1, max_size=3), mems=st.lists(st.integers(8 * GIB, 40 * GIB), min_size=4,
                                                                  max_size=4),
       extra=flops, batch=st.integers(1, 8), layers=st.integers(1, 8),
       nodes=st.lists(st.sampled_from(["n0", "n1"]), min_size=4, max_size=4))
# Found by hypothesis: the pipeline DP left the optimizer update out, so 3 layers went to d0
# (the step 1 % slower) and the third device could not win it back.
@example(rates=[19295081364.0, 18313228129.0], mems=[8 * GIB] * 4, extra=1e10, batch=1, layers=4,
         nodes=["n0"] * 4)
def test_adding_a_device_never_makes_it_slower(rates, mems, extra, batch, layers, nodes):
    devices = [device(f"d{i}", r, mems[i], nodes[i]) for i, r in enumerate(rates)]
    spec = spec_with(layers)
    try:
        before = make_plan(spec, Inventory(devices=devices), work(batch)).predicted.step_s
    except PlanError:
        assume(False)  # nothing fits before; there is nothing to compare
    after_devices = devices + [device("new", extra, mems[3], nodes[3])]
    after = make_plan(spec, Inventory(devices=after_devices), work(batch)).predicted.step_s
    assert after <= before * (1 + 1e-9)


@SETTINGS
@given(rates=st.lists(flops, min_size=1, max_size=6), data=st.data(), batch=st.integers(1, 16),
       layers=st.integers(1, 12), task=st.sampled_from(["train", "infer"]), checkpointing=st.booleans())
def test_every_plan_fits_memory_and_tiles_the_model(rates, data, batch, layers, task, checkpointing):
    mems = data.draw(st.lists(memory, min_size=len(rates), max_size=len(rates)))
    inventory = Inventory(devices=[device(f"d{i}", r, m, f"n{i % 2}") for i, (r, m) in enumerate(zip(rates, mems))])
    w = Workload(task=task, batch_size=batch, seq_len=256, new_tokens=16, checkpointing=checkpointing)
    try:
        plan = make_plan(spec_with(layers), inventory, w)
    except PlanError as err:
        assert "GiB" in str(err)  # an infeasible request says what is missing
        return
    assert sum(r.batch_share for r in plan.replicas) == batch
    assert all(r.batch_share >= 1 for r in plan.replicas)
    for stage in plan.stages:
        assert stage.predicted_memory_bytes <= stage.memory_capacity_bytes
    for replica in plan.replicas:
        ranges = [s.layers for s in replica.stages]
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        assert all(a < b for a, b in ranges)
        assert all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:]))
        assert [s.has_embed for s in replica.stages] == [True] + [False] * (len(ranges) - 1)
        assert [s.has_head for s in replica.stages] == [False] * (len(ranges) - 1) + [True]
    used = [s.device for s in plan.stages]
    assert len(used) == len(set(used))  # a device serves one stage of one replica
    assert [s.rank for s in plan.stages] == list(range(plan.world_size))


def test_plan_document_round_trips_and_ranks_are_replica_major(tmp_path):
    inventory = Inventory(devices=[device("a", 4e11, 8 * GIB), device("b", 1e11, 8 * GIB),
                                   device("c", 2e11, 8 * GIB, node="n1")])
    plan = make_plan(spec_with(6), inventory, work(8))
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    assert loaded.version == 1
    expected = [(r.index, s.position) for r in plan.replicas for s in r.stages]
    assert [(loaded.stage_for_rank(k).replica, loaded.stage_for_rank(k).position)
            for k in range(loaded.world_size)] == expected
    assert {b.name for b in plan.baselines} == {"equal layers", "memory-proportional", "greedy fill",
                                                "equal shares"}


def test_schema_file_is_current():
    assert SCHEMA_PATH.read_text() == plan_schema(), "regenerate: python -m alloy.plan.plan"


def test_batch_smaller_than_replicas_is_refused():
    inventory = Inventory(devices=[device(f"g{i}", 1e11, 8 * GIB) for i in range(3)])
    with pytest.raises(PlanError, match="smaller than the 3 replicas"):
        make_plan(spec_with(4), inventory, work(2), replicas=3)
