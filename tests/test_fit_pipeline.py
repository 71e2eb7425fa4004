"""Pipeline-parallel `alloy.Model.fit`: an nn.Sequential's children in stages over three processes.

In float64, a GPipe fit equals a single-process fit up to float64 rounding (micro-batches sum the
gradient in another order), its stage split is the planner's partition of the children's costs,
and a resumed pipeline fit equals an uninterrupted one to the bit.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from test_framework import _cluster, _task
from torch import nn

from alloy.errors import ConfigError
from alloy.framework import Model, pipeline


class RankTanh(nn.Module):
    """tanh that records which process ran it last (0 outside a process group)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ran_on", torch.tensor(-1))

    def forward(self, x):
        import torch.distributed as dist

        self.ran_on.fill_(dist.get_rank() if dist.is_initialized() else 0)
        return torch.tanh(x)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), RankTanh(), nn.Linear(16, 16), RankTanh(), nn.Linear(16, 2)).double()


def _model(module, devices="cpu") -> Model:
    return Model(module, devices=devices).compile(optimizer="adam", metrics=["accuracy"], lr=1e-2)


def _spy_on_plan(monkeypatch) -> list:
    """The (cuts, micro-batches) each pipeline fit's parent plans."""
    plans, plan = [], pipeline.plan_stages

    def recorded(*args):
        plans.append(plan(*args))
        return plans[-1]
    monkeypatch.setattr(pipeline, "plan_stages", recorded)
    return plans


@pytest.mark.parametrize("batch_size, microbatches", [(23, None), (4, 6)], ids=["uneven-micro-batches",
                                                                             "more-micro-batches-than-rows"])
def test_a_pipeline_fit_equals_a_single_process_fit(tmp_path, monkeypatch, batch_size, microbatches):
    """Three stages on devices of speeds 4:2:1. 23 rows in 3 micro-batches: 8/8/7, the last batch
    (200 = 8 x 23 + 16) 6/5/5; 4 rows asked for in 6 micro-batches: one a row."""
    plans = _spy_on_plan(monkeypatch)
    x, y = _task(200 if microbatches is None else 40)
    xv, yv = _task(37, seed=1)
    x, xv = x.double(), xv.double()
    single, piped = _model(_net()), _model(_net(), devices=str(_cluster(tmp_path)))
    h1 = single.fit(x, y, epochs=2, batch_size=batch_size, validation_data=(xv, yv), verbose=0)
    h2 = piped.fit(x, y, epochs=2, batch_size=batch_size, validation_data=(xv, yv), verbose=0,
                   parallelism="pipeline", microbatches=microbatches)
    (cuts, micro_batches), = plans
    assert len(cuts) == 4 and micro_batches == (microbatches or 3)
    stage_of = [s for s in range(3) for _ in range(cuts[s], cuts[s + 1])]
    for k, child in enumerate(piped.module):  # each stage's children ran in its own process
        if isinstance(child, RankTanh):
            assert int(child.ran_on) == stage_of[k], (k, cuts)
    ours, theirs = dict(single.module.named_parameters()), dict(piped.module.named_parameters())
    for name, mine in ours.items():
        torch.testing.assert_close(theirs[name], mine, rtol=1e-12, atol=1e-14, msg=name)
    for mine, theirs in zip(single.optimizer.state.values(), piped.optimizer.state.values(), strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):  # rank 0 gathered every stage's optimizer state
            torch.testing.assert_close(theirs[key], mine[key], rtol=1e-12, atol=1e-14)
    assert h2.epochs == h1.epochs and set(h2.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, values in h1.history.items():
        assert h2.history[key] == pytest.approx(values, rel=1e-12), key


def test_a_resumed_pipeline_fit_equals_an_uninterrupted_one(tmp_path):
    """Rank 0 gathers every stage's weights and optimizer state into one checkpoint."""
    x, y = _task(30)
    x = x.double()
    cluster = str(_cluster(tmp_path))
    settings = {"batch_size": 7, "validation_data": (x[:9], y[:9]), "verbose": 0, "parallelism": "pipeline"}
    straight = _model(_net(0), cluster)
    h_straight = straight.fit(x, y, epochs=3, **settings)
    _model(_net(0), cluster).fit(x, y, epochs=1, checkpoint_dir=tmp_path / "ckpt", **settings)
    resumed = _model(_net(7), cluster)
    h_resumed = resumed.fit(x, y, epochs=3, checkpoint_dir=tmp_path / "ckpt", resume=True, **settings)
    assert h_resumed.history == h_straight.history and h_resumed.epochs == [0, 1, 2]
    # parameters only: RankTanh's buffer says where each fit's (timed, so not always equal) split put it
    for (name, mine), theirs in zip(straight.module.named_parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(mine, theirs), name
    for mine, theirs in zip(straight.optimizer.state.values(), resumed.optimizer.state.values(), strict=True):
        assert all(torch.equal(mine[k], theirs[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def _split_times(costs_s, speeds, cuts) -> tuple[float, float]:
    """(largest stage time, total stage time) of a contiguous split."""
    times = [sum(costs_s[a:b]) / speed for a, b, speed in zip(cuts, cuts[1:], speeds)]
    return max(times), sum(times)


def test_the_stage_split_is_the_planners_partition_of_the_measured_costs(monkeypatch):
    """Against every contiguous split: the least largest stage time, then the least total (devices
    of equal speed side by side can tie, so the times are compared, not the cuts)."""
    rng = random.Random()
    net = nn.Sequential(*(nn.Linear(2, 2) for _ in range(7)))
    x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
    for _ in range(20):
        costs_s = [rng.uniform(1e-4, 1e-2) for _ in range(7)]
        weights = tuple(rng.choice([1e9, 2e9, 4e9, 8e9]) for _ in range(rng.randint(2, 4)))
        speeds = [w / max(weights) for w in weights]
        monkeypatch.setattr(pipeline, "child_costs_s", lambda *args, _c=costs_s: _c)
        cuts, micro_batches = pipeline.plan_stages(net, (x,), y, "cross_entropy", weights, 8, None)
        assert len(cuts) == len(weights) + 1 and cuts[0] == 0 and cuts[-1] == 7
        assert all(a < b for a, b in itertools.pairwise(cuts)), cuts
        best = min(_split_times(costs_s, speeds, (0, *inner, 7))
                   for inner in itertools.combinations(range(1, 7), len(weights) - 1))
        assert _split_times(costs_s, speeds, cuts) == pytest.approx(best, rel=1e-12), (costs_s, weights)
        assert micro_batches == len(weights)


def test_child_costs_are_measured_without_touching_the_module():
    net = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.Dropout(0.5), nn.Linear(64, 2))
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    costs_s = pipeline.child_costs_s(net, x, y, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    assert len(costs_s) == 4 and all(0 < c < 1 for c in costs_s)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm's statistics too
    assert all(p.grad is None for p in net.parameters()) and torch.equal(torch.get_rng_state(), rng)


class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("module, devices, settings, message", [
    (NotSequential, "cpu", {"parallelism": "pipeline"},
     r"parallelism='pipeline' cuts an nn.Sequential's children into stages, and this module is a NotSequential"),
    (lambda: nn.Sequential(nn.Linear(8, 2), nn.Tanh()), "cluster", {"parallelism": "pipeline"},
     r"over 3 devices needs at least 3 children in the nn.Sequential \(one stage each\), and it has 2"),
    (_net, "cpu", {"parallelism": "pipeline"}, r"needs several devices, one stage each, and devices gives one"),
    (_net, "cpu", {"parallelism": "tensor"}, r"parallelism must be one of 'data', 'pipeline', got 'tensor'"),
    (_net, "cpu", {"microbatches": 4}, r"microbatches splits a pipeline's batches; pass parallelism='pipeline'"),
    (_net, "cluster", {"parallelism": "pipeline", "microbatches": 0}, r"microbatches must be an integer >= 1"),
], ids=["not-sequential", "more-stages-than-children", "one-device", "unknown-parallelism",
        "microbatches-without-pipeline", "no-microbatches"])
def test_a_pipeline_fit_that_cannot_be_is_a_one_line_error(tmp_path, module, devices, settings, message):
    x, y = _task(16)
    devices = str(_cluster(tmp_path)) if devices == "cluster" else devices
    model = _model(module().double(), devices)
    with pytest.raises(ConfigError, match=message) as caught:
        model.fit(x.double(), y, epochs=1, verbose=0, **settings)
    assert "\n" not in str(caught.value)
