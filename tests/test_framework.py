"""The standard training framework: compile / fit / evaluate / predict, callbacks, multi-device fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import alloy
from alloy.errors import ConfigError
from alloy.framework import Callback, EarlyStopping, LearningRateScheduler, Model, ModelCheckpoint

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def _task(n=512, seed=0):
    """Learnable: class 1 when the first two features sum above zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))


def test_fit_learns_and_evaluate_returns_keras_style_lists():
    x, y = _task()
    xv, yv = _task(256, seed=1)
    model = Model(_mlp(), devices="cpu")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy", "f1"])
    history = model.fit(x.numpy(), y.tolist(), epochs=8, batch_size=32, validation_data=(xv, yv), verbose=0)
    assert set(history.history) == {"loss", "accuracy", "f1", "val_loss", "val_accuracy", "val_f1"}
    assert len(history.history["loss"]) == 8 and history.epochs == list(range(8))
    assert history.history["loss"][-1] < history.history["loss"][0]
    loss, accuracy, f1 = model.evaluate(xv, yv)
    assert accuracy >= 0.9 and f1 >= 0.9 and loss < 0.5
    logs = model.evaluate(xv, yv, return_dict=True)
    assert logs == pytest.approx({"loss": loss, "accuracy": accuracy, "f1": f1})
    assert model.predict(xv).argmax(-1).eq(yv).float().mean() == pytest.approx(accuracy)


def test_multi_device_fit_equals_single_device_fit(tmp_path):
    """Three processes with uneven shares (devices 4:2:1) give the single process's weights."""
    cluster = _cluster(tmp_path)
    # float64, so the bound comes from float64 rounding, not from one CPU's fp32 summation order
    # (an AVX-512 machine measured 1.02e-5 in fp32): ~1e-16 per op, amplified by the split sums and
    # ~20 Adam steps, stays far below 1e-10, while any real bug (a share lost or counted twice, a
    # wrong weighting) moves the weights by more than 1e-3.
    x, y = _task(200)
    x = x.double()
    single, multi = Model(_mlp().double(), devices="cpu"), Model(_mlp().double(), devices=str(cluster))
    for m in (single, multi):
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], lr=1e-2)
    h1 = single.fit(x, y, epochs=2, batch_size=23, verbose=0)  # 23: shares 12/7/4, last batch 16: 8/5/3
    h2 = multi.fit(x, y, epochs=2, batch_size=23, verbose=0)
    for (name, a), b in zip(single.module.state_dict().items(), multi.module.state_dict().values()):
        assert (a - b).norm() / a.norm() <= 1e-10, name
    assert h2.history["loss"] == pytest.approx(h1.history["loss"], rel=1e-10)
    assert h2.history["accuracy"] == pytest.approx(h1.history["accuracy"])


def _cluster(tmp_path, rates=(4e9, 2e9, 1e9)):
    cluster = tmp_path / "cpus.json"
    cluster.write_text(json.dumps({"devices": [
        {"name": f"cpu{i}", "kind": "cpu", "memory_bytes": 2**30, "matmul_flops": {"fp32": r},
         "memory_bandwidth_bytes_per_s": 1e10} for i, r in enumerate(rates)]}))
    return cluster


def test_batch_shares_are_the_planners():
    from alloy.framework.model import _shares
    from alloy.plan.search import largest_remainder

    for rows in range(3, 40):
        assert _shares(rows, (4.0, 2.0, 1.0)) == largest_remainder(rows, [4.0, 2.0, 1.0])
    assert _shares(23, (4.0, 2.0, 1.0)) == [12, 7, 4]  # one row each, then 20 by speed
    # fewer rows than ranks (a last batch, a small validation set): one row each to the fastest
    assert _shares(2, (1.0, 4.0, 2.0)) == [0, 1, 1] and _shares(1, (1.0, 1.0, 1.0)) == [1, 0, 0]


def test_multi_device_fit_with_batches_smaller_than_the_ranks_equals_one_process(tmp_path):
    """Batches of 2 rows over 3 ranks (one rank idle each step, yet in every all-reduce), and a
    5-row validation set evaluated over the ranks."""
    x, y = _task(20)
    x = x.double()
    single, multi = Model(_mlp().double(), devices="cpu"), Model(_mlp().double(), devices=str(_cluster(tmp_path)))
    for m in (single, multi):
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], lr=1e-2)
    h1 = single.fit(x, y, epochs=2, batch_size=2, validation_data=(x[:5], y[:5]), verbose=0)
    h2 = multi.fit(x, y, epochs=2, batch_size=2, validation_data=(x[:5], y[:5]), verbose=0)
    for (name, a), b in zip(single.module.state_dict().items(), multi.module.state_dict().values()):
        assert (a - b).norm() / a.norm() <= 1e-10, name
    assert set(h2.history) == set(h1.history)
    for key in h1.history:
        assert h2.history[key] == pytest.approx(h1.history[key], rel=1e-10), key


class FailsInRankOne(nn.Module):
    """A module whose forward raises in the second process of a multi-device fit."""

    def __init__(self, error: Exception):
        super().__init__()
        self.error, self.linear = error, nn.Linear(8, 2)

    def forward(self, x):
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == 1:
            raise self.error
        return self.linear(x)


@pytest.mark.parametrize("error, message", [
    (ConfigError("no such vocabulary"), r"^alloy worker rank 1: error: no such vocabulary \(every rank's output: "),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
     r"^worker rank 1 failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied \(every rank's output: "),
], ids=["alloy-error", "other-exception"])
def test_an_error_in_a_process_reaches_the_user_in_one_line(tmp_path, error, message):
    x, y = _task(64)
    model = Model(FailsInRankOne(error), devices=str(_cluster(tmp_path))).compile()
    with pytest.raises(alloy.AlloyError, match=message) as caught:
        model.fit(x, y, epochs=1, verbose=0)
    assert "\n" not in str(caught.value)
    log = Path(str(caught.value).rsplit(": ", 1)[-1].rstrip(")"))
    assert log.is_file()  # the log the message names outlives the fit (nothing else of it does)
    assert sorted(p.name for p in log.parent.iterdir()) == ["torchrun-node0.log"]
    log.unlink()
    log.parent.rmdir()


def test_an_unpicklable_callback_is_a_clear_error(tmp_path):
    x, y = _task(64)
    model = Model(_mlp(), devices=str(_cluster(tmp_path))).compile()
    with pytest.raises(ConfigError, match="multi-device fit pickles the module.*cannot be"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[LearningRateScheduler(lambda epoch, lr: lr)])


def test_allreduce_grads_sums_every_trainable_gradient_in_place():
    """The runtime's bucketed gradient all-reduce that multi-device fit uses (one process here):
    small buckets, two dtypes, a parameter with no gradient (zeros), a frozen one (left alone)."""
    import torch.distributed as dist

    from alloy.runtime.sync import allreduce_grads

    net = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(3, 2).double(), "unused": nn.Linear(2, 2),
                         "frozen": nn.Linear(2, 2)})
    net["frozen"].requires_grad_(False)
    x = torch.randn(5, 4)
    net["b"](net["a"](x).double()).sum().backward()
    expected = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        allreduce_grads(reversed(list(net.parameters())), bucket_bytes=40)
    finally:
        dist.destroy_process_group()
    for name, p in net.named_parameters():
        if name.startswith("frozen"):
            assert p.grad is None
        elif name.startswith("unused"):
            assert p.grad is not None and not p.grad.any()
        else:
            assert p.grad.dtype == p.dtype and torch.equal(p.grad, expected[name]), name


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self):
        self.calls.append("train_begin")

    def on_epoch_begin(self, epoch):
        self.calls.append(f"epoch_begin {epoch}")

    def on_epoch_end(self, epoch, logs):
        self.calls.append(f"epoch_end {epoch} {sorted(logs)}")

    def on_train_end(self):
        self.calls.append("train_end")


def test_callbacks_fire_in_order_and_do_their_jobs(tmp_path):
    x, y = _task(128)
    model = Model(_mlp(), devices="cpu").compile(optimizer="sgd", metrics=["accuracy"])
    recorder = Recorder()
    checkpoint = ModelCheckpoint(tmp_path / "best.safetensors", monitor="val_loss")
    schedule = LearningRateScheduler(lambda epoch, lr: 0.1 * 0.5**epoch)
    model.fit(x, y, epochs=3, batch_size=32, validation_data=(x, y), verbose=0,
              callbacks=[recorder, checkpoint, schedule])
    assert recorder.calls[0] == "train_begin" and recorder.calls[-1] == "train_end"
    assert recorder.calls[1:3] == ["epoch_begin 0", "epoch_end 0 ['accuracy', 'loss', 'val_accuracy', 'val_loss']"]
    assert schedule.rates == [0.1, 0.05, 0.025] and model.optimizer.param_groups[0]["lr"] == 0.025
    assert (tmp_path / "best.safetensors").is_file() and checkpoint.saved_epochs[0] == 0


def test_the_built_in_callbacks_pickle_for_a_multi_device_fit(tmp_path):
    """A multi-device fit pickles its callbacks for every rank: the built-in ones must survive it
    and still judge improvement the same way (they held lambdas, which pickle refuses)."""
    import pickle

    for callback in (EarlyStopping(monitor="val_accuracy"), EarlyStopping(monitor="val_loss"),
                     ModelCheckpoint(tmp_path / "best", monitor="val_f1")):
        copy = pickle.loads(pickle.dumps(callback))
        assert (copy.better(2.0, 1.0), copy.better(1.0, 2.0)) == (callback.better(2.0, 1.0), callback.better(1.0, 2.0))
    assert EarlyStopping(monitor="val_accuracy").better(2.0, 1.0) and EarlyStopping(monitor="val_loss").better(1.0, 2.0)


def test_early_stopping_stops_when_nothing_improves():
    x, y = _task(128)
    model = Model(_mlp(), devices="cpu").compile(optimizer="sgd", lr=1e-12)  # nothing moves
    stopper = EarlyStopping(monitor="loss", patience=2, min_delta=1e-3)
    history = model.fit(x, y, epochs=20, batch_size=64, callbacks=[stopper], verbose=0)
    assert stopper.stopped_epoch == 2 and len(history.history["loss"]) == 3


def test_bad_inputs_have_clear_errors():
    x, y = _task(64)
    model = Model(_mlp(), devices="cpu").compile()
    with pytest.raises(ConfigError, match="evaluation data is empty"):
        model.evaluate(x[:0], y[:0])
    with pytest.raises(ConfigError, match=r"label 7 is outside the model's 2 classes \(0..1\)"):
        model.fit(x, torch.where(y == 1, 7, 0), epochs=1, verbose=0)
    with pytest.raises(ConfigError, match=r"label -1 is outside"):
        model.fit(x, y - 1, epochs=1, verbose=0)
    with pytest.raises(ConfigError, match=r"x and y have different lengths \(64, 63\)"):
        model.fit(x, y[:63], epochs=1, verbose=0)
    with pytest.raises(ConfigError, match="rows of different lengths"):
        model.fit([[1, 2], [3]], [0, 1], epochs=1, verbose=0)
    with pytest.raises(ConfigError, match="unknown optimizer 'adamax'"):
        Model(_mlp()).compile(optimizer="adamax")
    with pytest.raises(ConfigError, match="unknown metric 'auc'"):
        Model(_mlp()).compile(metrics=["auc"])
    with pytest.raises(ConfigError, match="call model.compile"):
        Model(_mlp()).fit(x, y)


def test_save_and_load_round_trip(tmp_path):
    x, y = _task(64)
    model = Model(_mlp(), devices="cpu").compile(metrics=["accuracy"])
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m")
    again = Model.load(tmp_path / "m", _mlp(seed=5), devices="cpu")
    assert again.evaluate(x, y) == pytest.approx(model.evaluate(x, y))


def test_objects_work_where_names_do():
    x, y = _task(64)
    net = _mlp()
    model = Model(net, devices="cpu").compile(optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
                                              loss=nn.CrossEntropyLoss(), metrics=["accuracy"])
    history = model.fit(x, y, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]


def test_encoder_classifier_on_a_transformer_encoder():
    spec = alloy.ModelSpec(family="bert", causal=False, vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                           num_kv_heads=2, head_dim=8, intermediate_size=32, max_seq_len=16, norm="layernorm",
                           norm_placement="post", final_norm=False, embedding_norm=True, positions="learned",
                           type_vocab_size=2, qkv_bias=True, o_bias=True, mlp="plain", activation="gelu",
                           mlp_bias=True)
    torch.manual_seed(0)
    ids = torch.randint(2, 50, (64, 8))
    y = (ids[:, 0] > 25).long()  # the label is in the first token
    model = Model(alloy.layers.EncoderClassifier(alloy.Transformer(spec), 2), devices="cpu")
    model.compile(optimizer="adamw", lr=3e-3, metrics=["accuracy"])
    model.fit((ids, torch.ones_like(ids)), y, epochs=15, batch_size=16, verbose=0)
    assert model.evaluate((ids, torch.ones_like(ids)), y)[1] >= 0.9


@pytest.mark.skipif(not SST2.is_dir(), reason="needs ../shared/data/sst2 (present in CI)")
def test_the_seed_lstm_learns_sst2_sentiment():
    from alloy.data import LabelEncoder, read_table
    from alloy.layers import LSTM, Dense, Embedding, Sequential
    from alloy.text import WordTokenizer

    texts, labels = read_table(SST2 / "train.tsv", "sentence", "label")
    dev_texts, dev_labels = read_table(SST2 / "dev.tsv", "content", "label")
    tokenizer = WordTokenizer(num_words=8000, max_len=32).fit(texts[:6000])
    encoder = LabelEncoder()
    torch.manual_seed(0)
    model = Model(Sequential(Embedding(tokenizer.vocab_size, 64), LSTM(64, 64), Dense(64, 2)), devices="cpu")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(tokenizer.encode(texts[:6000]), encoder.fit_transform(labels[:6000]), epochs=2, batch_size=32,
              verbose=0)
    loss, accuracy = model.evaluate(tokenizer.encode(dev_texts), encoder.transform(dev_labels))
    assert accuracy >= 0.6  # 6,000 rows, two epochs: above chance (0.5); the full example is in the closing note
