"""`alloy train` end to end: real torchrun workers, a learnable corpus, checkpoints, exact resume,
and every kind of bad input the issue names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alloy.errors import CheckpointError, ConfigError
from alloy.train.config import load_config
from alloy.train.run import train
from train_cases import MODEL, make_workspace, write_config

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train"))


def _config(workspace: Path, out: str, **overrides) -> Path:
    return write_config(workspace, out, **({"eval_every": 4, "schedule": {"warmup_steps": 2}} | overrides))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "alloy", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def full_run(workspace):
    """One uninterrupted 8-step run over the planned workers."""
    return train(load_config(_config(workspace, "full")), log=lambda *_: None)


def test_end_to_end_run_learns_and_leaves_its_files(full_run):
    out = full_run.out_dir
    plan = json.loads((out / "plan.json").read_text())
    assert sum(len(r["stages"]) for r in plan["replicas"]) >= 2, "the run should use several workers"
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 9))
    assert lines[-1]["loss"] < 0.8 * lines[0]["loss"], "a repetitive corpus must be learnable"
    assert "eval_loss" in lines[3] and "eval_ppl" in lines[-1]
    assert set(lines[-1]["device_step_s"]) <= {"cpu0", "cpu1", "cpu2"} and lines[-1]["predicted_step_s"] > 0
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-00000004", "step-00000008"]
    assert (out / "checkpoints" / "step-00000008" / "manifest.json").is_file()
    assert (out / "loss.png").stat().st_size > 1000 and (out / "tokenizer.json").is_file()


def test_final_model_is_a_transformers_model_with_the_run_weights(full_run):
    import transformers

    import alloy

    final = full_run.final_dir
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ours = alloy.load(final)
    ids = torch.randint(0, MODEL["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=0)
    assert ours.tokenizer is not None


def test_resume_continues_exactly(full_run, workspace):
    config = _config(workspace, "resumed")
    first = train(load_config(config, ["stop_at=4"]), log=lambda *_: None)
    assert first.steps_done == 4 and first.final_dir is None
    second = train(load_config(config), resume=True, log=lambda *_: None)
    assert second.steps_done == 8
    full = [json.loads(l)["loss"] for l in (full_run.out_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(l)["loss"] for l in (second.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert resumed == pytest.approx(full, rel=1e-6, abs=0)
    a = load_file(full_run.final_dir / "model-00001-of-0000{}.safetensors".format(
        len(list(full_run.final_dir.glob("*.safetensors")))))
    b = load_file(second.final_dir / "model-00001-of-0000{}.safetensors".format(
        len(list(second.final_dir.glob("*.safetensors")))))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


def test_unknown_key_names_the_key_and_the_allowed_ones(workspace, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny-llama\nlearning_rate: 0.1\n")
    proc = _cli(bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown key 'learning_rate'" in proc.stderr and "optimizer" in proc.stderr
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.learning_rate'; allowed: lr, weight_decay"):
        load_config(None, ["optimizer.learning_rate=0.1"])


def test_wrong_types_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: many\n")
    with pytest.raises(ConfigError, match="batch_size: Input should be a valid integer"):
        load_config(bad)
    with pytest.raises(ConfigError, match="precision: Input should be 'fp32' or 'bf16'"):
        load_config(None, ["precision=fp16"])
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_missing_data_path(workspace):
    config = load_config(_config(workspace, "nodata", data={"path": str(workspace / "nowhere.txt")}))
    with pytest.raises(ConfigError, match="nowhere.txt: no such file or directory"):
        train(config, log=lambda *_: None)


def test_empty_corpus(workspace):
    (workspace / "empty.txt").write_text("   \n")
    config = load_config(_config(workspace, "empty", data={"path": str(workspace / "empty.txt")}))
    with pytest.raises(ConfigError, match="the corpus has no text"):
        train(config, log=lambda *_: None)
    assert not (workspace / "empty" / "checkpoints").exists()


def test_sequence_longer_than_the_model_allows(workspace):
    proc = _cli(_config(workspace, "toolong", seq_len=4096))
    assert proc.returncode == 2 and "seq_len 4096 is beyond the model's maximum 128" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_existing_run_is_not_overwritten(full_run, workspace):
    before = (full_run.out_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds files; pass --resume"):
        train(load_config(_config(workspace, "full")), log=lambda *_: None)
    assert (full_run.out_dir / "metrics.jsonl").read_bytes() == before


def test_resume_from_a_different_model_is_refused(full_run, workspace):
    other = workspace / "other.json"
    other.write_text(json.dumps(MODEL | {"num_hidden_layers": 2}))
    config = load_config(_config(workspace, "full", model=str(other)))
    with pytest.raises(CheckpointError, match="another model"):
        train(config, resume=True, log=lambda *_: None)


def test_resume_with_a_different_plan_is_refused(full_run, workspace, tmp_path):
    from alloy.plan import Plan

    plan = Plan.load(full_run.out_dir / "plan.json")
    replicas = plan.replicas
    if len(replicas) > 1:  # move one sample of the batch from one replica to another
        giver = max(replicas, key=lambda r: r.batch_share)
        taker = next(r for r in replicas if r.index != giver.index)
        changed = [r.model_copy(update={"batch_share": r.batch_share - (r is giver) + (r is taker)})
                   for r in replicas]
    else:  # move one layer from the second stage to the first
        stages = list(replicas[0].stages)
        if stages[1].layers[1] - stages[1].layers[0] < 2:
            pytest.skip("no other valid split of this plan to try")
        stages[0] = stages[0].model_copy(update={"layers": (0, stages[0].layers[1] + 1)})
        stages[1] = stages[1].model_copy(update={"layers": (stages[1].layers[0] + 1, stages[1].layers[1])})
        changed = [replicas[0].model_copy(update={"stages": stages})]
    other = plan.model_copy(update={"replicas": changed})
    other.save(tmp_path / "other-plan.json")
    with pytest.raises(CheckpointError, match="different plan"):
        train(load_config(_config(workspace, "full")), plan_path=str(tmp_path / "other-plan.json"), resume=True,
              log=lambda *_: None)


def test_interrupted_checkpoint_never_looks_valid(full_run, tmp_path):
    """A save that dies before its manifest leaves a .partial directory that resume and fuse skip."""
    from alloy.fuse import find_checkpoint
    from alloy.runtime.checkpoint import complete_checkpoints

    run = tmp_path / "run"
    shutil.copytree(full_run.out_dir / "checkpoints", run / "checkpoints")
    partial = run / "checkpoints" / "step-00000012.partial"
    shutil.copytree(run / "checkpoints" / "step-00000008", partial)
    (partial / "manifest.json").unlink()
    assert complete_checkpoints(run / "checkpoints")[-1].name == "step-00000008"
    assert find_checkpoint(run).name == "step-00000008"
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    with pytest.raises(CheckpointError, match="interrupted save"):
        find_checkpoint(run)
