"""alloy.Model.fit's checkpoints and resume, and its typed job.

A fit of N epochs resumed after epoch k equals, to the bit, one that never stopped: float64, Adam
(its moments must come back), shuffled batches, and dropout (each rank's RNG state must come
back), so a piece the checkpoint forgot changes the weights.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_framework import _cluster, _task
from torch import nn

from alloy.errors import CheckpointError, ConfigError
from alloy.framework import Callback, Model
from alloy.framework.job import FitJob, FitRun
from alloy.runtime import JobError


def _net(seed: int, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.25), nn.Linear(hidden, 2)).double()


def _model(module: nn.Module, devices="cpu") -> Model:
    return Model(module, devices=devices).compile(optimizer="adam", metrics=["accuracy"], lr=1e-2)


def _assert_same(a: Model, b: Model) -> None:
    for (name, mine), theirs in zip(a.module.state_dict().items(), b.module.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name
    for mine, theirs in zip(a.optimizer.state.values(), b.optimizer.state.values(), strict=True):
        assert all(torch.equal(mine[k], theirs[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def _fits(tmp_path, devices="cpu", rows=64, batch_size=10):
    """(uninterrupted fit, resumed fit) of 3 epochs: the second stopped after 1 and went on in a
    new Model whose module starts from other weights."""
    x, y = _task(rows)
    x, xv, yv = x.double(), x[:9].double(), y[:9]
    settings = {"batch_size": batch_size, "validation_data": (xv, yv), "verbose": 0}
    straight = _model(_net(0), devices)
    torch.manual_seed(123)  # dropout's draws (with several processes, the seeds of their own generators)
    h_straight = straight.fit(x, y, epochs=3, **settings)

    first = _model(_net(0), devices)
    torch.manual_seed(123)
    first.fit(x, y, epochs=1, checkpoint_dir=tmp_path / "ckpt", **settings)
    resumed = _model(_net(7), devices)
    torch.manual_seed(999)  # the checkpoint's RNG state must win over whatever the process has now
    h_resumed = resumed.fit(x, y, epochs=3, checkpoint_dir=tmp_path / "ckpt", resume=True, **settings)
    assert h_resumed.history == h_straight.history and h_resumed.epochs == h_straight.epochs == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch-00000002", "epoch-00000003"]
    return straight, resumed


def test_a_resumed_fit_equals_an_uninterrupted_one(tmp_path):
    straight, resumed = _fits(tmp_path)
    _assert_same(straight, resumed)


def test_a_resumed_multi_device_fit_equals_an_uninterrupted_one(tmp_path):
    """Three processes with uneven shares (4:2:1); each rank's dropout state comes back."""
    straight, resumed = _fits(tmp_path, devices=str(_cluster(tmp_path)), rows=30, batch_size=7)
    _assert_same(straight, resumed)


class StopAfter(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs):
        if epoch == self.epoch:
            self.model.stop_training = True


def test_a_fit_a_callback_stops_is_checkpointed_where_it_stopped(tmp_path):
    x, y = _task(40)
    x = x.double()
    straight = _model(_net(0))
    torch.manual_seed(5)
    h_straight = straight.fit(x, y, epochs=4, batch_size=8, verbose=0)
    stopped = _model(_net(0))
    torch.manual_seed(5)
    history = stopped.fit(x, y, epochs=4, batch_size=8, verbose=0, callbacks=[StopAfter(1)],
                          checkpoint_dir=tmp_path, checkpoint_every=3)
    assert history.epochs == [0, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-00000002"]  # the last epoch run, off the every-3 grid
    resumed = _model(_net(3))
    h_resumed = resumed.fit(x, y, epochs=4, batch_size=8, verbose=0, checkpoint_dir=tmp_path, resume=True)
    assert h_resumed.history == h_straight.history
    _assert_same(straight, resumed)


def _checkpointed(tmp_path, module=None) -> Model:
    x, y = _task(32)
    model = _model(module or _net(0))
    model.fit(x.double(), y, epochs=1, batch_size=8, verbose=0, checkpoint_dir=tmp_path / "ckpt")
    return model


def _resume(module: nn.Module, directory, epochs: int = 2):
    x, y = _task(32)
    model = _model(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        x = x.to(next(module.parameters()).dtype)  # so a float32 module gets past fit's label check
        model.fit(x, y, epochs=epochs, batch_size=8, verbose=0, checkpoint_dir=directory, resume=True)
    finally:  # a refused resume leaves the module as it was
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def _one_line(caught) -> str:
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_resume_with_no_checkpoint_is_a_clear_error(tmp_path):
    for directory in (tmp_path / "missing", tmp_path):
        with pytest.raises(CheckpointError, match="no complete checkpoint to resume from") as caught:
            _resume(_net(0), directory)
        _one_line(caught)


@pytest.mark.parametrize("other, message", [
    (lambda: _net(1, hidden=16), r"0\.weight is float64\[32, 8\] there, float64\[16, 8\] here"),
    (lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)).double(),  # no dropout: 3.* is 2.*
     r"2\.weight is absent there, float64\[2, 32\] here"),
    (lambda: _net(1).float(), r"0\.weight is float64\[32, 8\] there, float32\[32, 8\] here"),
], ids=["shape", "names", "dtype"])
def test_a_checkpoint_of_another_module_is_a_clear_error(tmp_path, other, message):
    _checkpointed(tmp_path)
    with pytest.raises(CheckpointError, match=r"written for another module: " + message) as caught:
        _resume(other(), tmp_path / "ckpt")
    _one_line(caught)


@pytest.mark.parametrize("name, damage, message", [
    ("model.safetensors", lambda b: b[:-9] + bytes([b[-9] ^ 1]) + b[-8:], "corrupt — its SHA-256 differs"),
    ("trainer.pt", lambda b: b[: len(b) // 2], r"\d+ bytes but the manifest recorded \d+ — truncated"),
], ids=["flipped-bit", "truncated"])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, name, damage, message):
    _checkpointed(tmp_path)
    path = tmp_path / "ckpt" / "epoch-00000001" / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"{name}: {message}") as caught:
        _resume(_net(0), tmp_path / "ckpt")
    _one_line(caught)


def test_a_checkpoint_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt").write_text("not a directory")
    x, y = _task(16)
    with pytest.raises(ConfigError, match="checkpoint_dir .*ckpt is a file") as caught:
        _model(_net(0)).fit(x.double(), y, epochs=1, verbose=0, checkpoint_dir=tmp_path / "ckpt")
    _one_line(caught)


def test_other_misuse_of_checkpoints_is_refused(tmp_path):
    x, y = _task(16)
    with pytest.raises(ConfigError, match="resume=True needs checkpoint_dir"):
        _model(_net(0)).fit(x.double(), y, epochs=1, verbose=0, resume=True)
    with pytest.raises(ConfigError, match="checkpoint_every and keep_last must be >= 1"):
        _model(_net(0)).fit(x.double(), y, epochs=1, verbose=0, checkpoint_dir=tmp_path, checkpoint_every=0)
    _checkpointed(tmp_path)
    # a new fit into a directory of an old one's checkpoints would mix them
    with pytest.raises(ConfigError, match="already holds checkpoints .*epoch-00000001.*pass resume=True"):
        _checkpointed(tmp_path)
    with pytest.raises(CheckpointError, match="holds Adam state, and this model compiles SGD"):
        Model(_net(0), devices="cpu").compile(optimizer="sgd").fit(
            x.double(), y, epochs=2, verbose=0, checkpoint_dir=tmp_path / "ckpt", resume=True)


def test_more_epochs_done_than_asked_is_refused(tmp_path):
    _checkpointed(tmp_path)
    x, y = _task(32)
    model = _model(_net(0))
    model.fit(x.double(), y, epochs=3, batch_size=8, verbose=0, checkpoint_dir=tmp_path / "ckpt", resume=True)
    with pytest.raises(ConfigError, match=r"has 3 epochs done, more than fit\(epochs=2\) asks for"):
        _resume(_net(0), tmp_path / "ckpt", epochs=2)


def _every_field_set(rng: random.Random) -> FitJob:
    """A job with every field away from its default (so a field to_dict or from_dict drops shows)."""
    run = FitRun(epochs=rng.randint(2, 9), batch_size=rng.randint(2, 64), shuffle=False, seed=rng.randint(1, 99),
                 checkpoint_dir="/tmp/fit/ckpt", checkpoint_every=rng.randint(2, 5), resume=True, keep_last=3)
    return FitJob(out_dir="/tmp/fit", payload="/tmp/fit/payload.pt", run=run, weights=(4.0, rng.random()),
                  profiles=({"name": "cpu0", "kind": "cpu"}, None), main={"sys_path": ["/src"]}, torch_seeds=(5, 6),
                  timeout_s=rng.uniform(1, 99), metrics_path="/tmp/fit/progress.jsonl",
                  stage_cuts=(0, rng.randint(1, 3), 4), micro_batches=rng.randint(2, 8))


def test_a_fit_job_survives_its_json_round_trip():
    job = _every_field_set(random.Random())
    assert FitJob.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    least = FitJob(out_dir="o", payload="p", weights=(1.0,), profiles=(None,), main={}, torch_seeds=(0,),
                   run=FitRun(epochs=1, batch_size=1, shuffle=True, seed=0, checkpoint_dir=None, checkpoint_every=1,
                              resume=False))
    assert FitJob.from_dict(json.loads(json.dumps(least.to_dict()))) == least
    assert [k for k, v in least.to_dict().items() if v == job.to_dict()[k]] == []


def test_a_fit_job_refuses_unknown_and_missing_keys_by_name():
    doc = _every_field_set(random.Random(0)).to_dict()
    with pytest.raises(JobError, match="unknown key.*batchsize.*a FitRun's keys are"):
        FitJob.from_dict(doc | {"run": doc["run"] | {"batchsize": 8}})
    with pytest.raises(JobError, match="unknown key.*metric_path"):
        FitJob.from_dict(doc | {"metric_path": None})
    del doc["run"]["seed"]
    with pytest.raises(JobError, match="lacks the key.*seed"):
        FitJob.from_dict(doc)
