"""`alloy fuse --merge-lora`: a LoRA run's adapter-only checkpoints folded into its base give the
model transformers + PEFT run from the base and the run's adapter; the wrong mode fails in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import alloy
from alloy.cli import main
from alloy.errors import ConfigError
from alloy.fuse import fuse_run
from alloy.runtime import Checkpointing, DataSource, OptimConfig, RunLayout, job_document, run_job
from alloy.spec import ModelSpec
from train_cases import MODEL, make_workspace, write_config

LORA = {"rank": 4, "alpha": 8, "targets": ["wq", "wv", "gate", "down"]}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, base HF directory): 6 LoRA steps on a tiny random Llama over three declared
    CPUs (the planner picks data parallel), checkpointed at 3 and 6."""
    from alloy.train.config import load_config
    from alloy.train.run import train

    workspace = make_workspace(tmp_path_factory.mktemp("lora"))
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("llama", **{k: v for k, v in MODEL.items() if k != "model_type"})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(workspace / "base")
    path = write_config(workspace, "run", model=str(workspace / "base"), steps=6, optimizer={"lr": 2e-2},
                        checkpoint={"every": 3, "keep_last": 2}, verify=False, lora=LORA)
    result = train(load_config(path), log=lambda *_: None)
    return result.out_dir, workspace / "base"


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_run_equals_transformers_and_peft(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    run_dir, base_dir = lora_run
    out = fuse_run(run_dir, tmp_path / "merged", merge_lora=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, run_dir / "final").eval()
    ids = torch.randint(0, MODEL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(7))
    got, want = _logits(merged, ids), _logits(with_adapter, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert (got - _logits(fresh, ids)).abs().max() > 1e-3  # the adapter changed the model
    # the base's side files, and the tokenizer the run trained with (this base has none of its own)
    assert (out / "generation_config.json").read_bytes() == (base_dir / "generation_config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_a_pipelined_lora_run_merges_stage_by_stage(lora_run, tmp_path):
    """Layers [0, 2) with the embeddings on one worker, [2, 3) and the tied head on another: each
    stage's slice of the base gets its own shard's adapters."""
    peft = pytest.importorskip("peft")
    from alloy.checkpoint.lora import write_adapter

    _, base_dir = lora_run
    spec = alloy.load(base_dir).spec
    lora = LORA | {"alpha": 8.0, "dropout": 0.0}
    layout = RunLayout.of([[("cpu0", 0, 2), ("cpu1", 2, 3)]], (4,), (2,))
    run_dir = tmp_path / "run"
    job = job_document(spec, layout, steps=3, seq_len=8, out_dir=run_dir / "workers", init_dir=str(base_dir),
                       data=DataSource("random", seed=3), optim=OptimConfig(lr=2e-2), threads=1, timeout_s=60,
                       checkpoint=Checkpointing(dir=str(run_dir / "checkpoints"), every=3, keep_last=1), lora=lora)
    state = run_job(job, timeout_s=240).state_dict()
    (run_dir / "run.json").write_text(json.dumps({"config": {"seed": 0, "lora": lora}, "spec": spec.to_dict(),
                                                  "init_dir": str(base_dir)}))  # as alloy train writes it
    adapters = {k.removesuffix(".lora_A"): (v, state[k.removesuffix("_A") + "_B"], lora["alpha"] / lora["rank"])
                for k, v in state.items() if k.endswith(".lora_A")}
    write_adapter(spec, adapters, tmp_path / "adapter")
    merged = transformers.AutoModelForCausalLM.from_pretrained(fuse_run(run_dir, tmp_path / "merged",
                                                                        merge_lora=True)).eval()
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) == 2  # one file per stage
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, MODEL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(8))
    got = _logits(merged, ids)
    torch.testing.assert_close(got, _logits(with_adapter, ids), atol=1e-4, rtol=0)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert (got - _logits(fresh, ids)).abs().max() > 1e-3  # the adapters changed the model


def test_an_earlier_step_merges_its_own_adapters(lora_run, tmp_path):
    from alloy.checkpoint.lora import load_adapter
    from alloy.model.lora import merge_lora

    run_dir, base_dir = lora_run
    at_3 = alloy.load(fuse_run(run_dir, tmp_path / "step3", step=3, merge_lora=True))
    at_6 = alloy.load(fuse_run(run_dir, tmp_path / "step6", merge_lora=True))
    final = merge_lora(load_adapter(alloy.load(base_dir), run_dir / "final"))  # final/ is step 6's adapter
    for name, value in final.state_dict().items():
        torch.testing.assert_close(at_6.state_dict()[name], value, atol=1e-6, rtol=0)
    assert any((at_3.state_dict()[k] - v).abs().max() > 1e-5 for k, v in at_6.state_dict().items())


def test_merge_to_gguf(lora_run, tmp_path):
    from gguf import GGUFReader

    run_dir, _ = lora_run
    path = fuse_run(run_dir, tmp_path / "model.gguf", format="gguf", merge_lora=True)
    reader = GGUFReader(path)
    assert reader.get_field("llama.block_count").contents() == MODEL["num_hidden_layers"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # the scratch HF directory is gone


def test_a_lora_run_from_scratch_merges_into_its_seeded_base(tmp_path):
    """No init_dir: the base is drawn from the run's seed, as its workers drew it."""
    from alloy.checkpoint.lora import load_adapter
    from alloy.model import Transformer
    from alloy.model.init import init_params
    from alloy.model.lora import merge_lora
    from alloy.train.config import load_config
    from alloy.train.run import train

    workspace = make_workspace(tmp_path)
    config = write_config(workspace, "scratch", steps=3, checkpoint={"every": 3, "keep_last": 1}, seed=5,
                          optimizer={"lr": 2e-2}, verify=False, lora=LORA)
    run_dir = train(load_config(config), log=lambda *_: None).out_dir
    merged = alloy.load(fuse_run(run_dir, tmp_path / "merged", merge_lora=True))
    spec = ModelSpec.from_dict(json.loads((run_dir / "run.json").read_text())["spec"])
    want = merge_lora(load_adapter(init_params(Transformer(spec), 5), run_dir / "final"))
    for name, value in want.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], value, atol=1e-6, rtol=0)


def test_a_qlora_run_merges_into_the_base_it_trained_on(tmp_path):
    """QLoRA trained against the quantized base (block linears with or without an adapter): the
    merged model is that function, dequantized weights plus the adapters, not the fp32 base's."""
    from alloy.checkpoint.lora import load_adapter
    from alloy.model import Transformer
    from alloy.model.init import init_params
    from alloy.model.lora import quantize_base
    from alloy.train.config import load_config
    from alloy.train.run import train

    workspace = make_workspace(tmp_path)
    lora = {"rank": 4, "alpha": 8, "targets": ["wq", "wv"], "quantize_base": "q8_0"}
    config = write_config(workspace, "qlora", steps=3, checkpoint={"every": 3, "keep_last": 1},
                          optimizer={"lr": 2e-2}, verify=False, lora=lora)
    run_dir = train(load_config(config), log=lambda *_: None).out_dir
    merged = alloy.load(fuse_run(run_dir, tmp_path / "merged", merge_lora=True))
    trained = quantize_base(load_adapter(init_params(Transformer(merged.spec), 0), run_dir / "final"), "q8_0")
    full_precision = load_adapter(init_params(Transformer(merged.spec), 0), run_dir / "final")
    ids = torch.randint(0, merged.spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = merged(ids)
        torch.testing.assert_close(got, trained(ids), atol=1e-5, rtol=0)
        assert (got - full_precision(ids)).abs().max() > 1e-4  # the quantized base is not the fp32 one


def _fails_in_one_line(argv: list[str], capsys, match: str) -> str:
    assert main(argv) != 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and match in err, err
    return err


def test_a_lora_run_without_merge_lora_is_a_one_line_error(lora_run, tmp_path, capsys):
    run_dir, _ = lora_run
    _fails_in_one_line(["fuse", str(run_dir), "--out", str(tmp_path / "out")], capsys, "pass --merge-lora")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A one-step full-training run's checkpoint (every parameter trained)."""
    spec = ModelSpec(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=48, max_seq_len=64)
    run_dir = tmp_path_factory.mktemp("full")
    layout = RunLayout.of([[("cpu0", 0, 2)]], (2,), (1,))
    job = job_document(spec, layout, steps=1, seq_len=8, out_dir=run_dir / "workers", data=DataSource("random", seed=3),
                       optim=OptimConfig(lr=1e-3), threads=1, timeout_s=60,
                       checkpoint=Checkpointing(dir=str(run_dir / "checkpoints"), every=1, keep_last=1))
    run_job(job, timeout_s=240)
    return run_dir


def test_merge_lora_on_a_full_run_is_a_one_line_error(full_run, tmp_path, capsys):
    _fails_in_one_line(["fuse", str(full_run), "--merge-lora", "--out", str(tmp_path / "out")], capsys,
                       "trained the full model")
    assert not (tmp_path / "out").exists()
    assert fuse_run(full_run, tmp_path / "plain").is_dir()  # without the flag it fuses as before


def test_a_missing_base_is_a_one_line_error_naming_it(lora_run, tmp_path, capsys):
    run_dir, base_dir = lora_run
    moved = tmp_path / "run"  # the run's record and checkpoints, its base copied and then deleted
    shutil.copytree(run_dir / "checkpoints", moved / "checkpoints")
    gone = tmp_path / "base-that-was"
    shutil.copytree(base_dir, gone)
    record = json.loads((run_dir / "run.json").read_text())
    (moved / "run.json").write_text(json.dumps(record | {"init_dir": str(gone)}))
    shutil.rmtree(gone)
    _fails_in_one_line(["fuse", str(moved), "--merge-lora", "--out", str(tmp_path / "out")], capsys,
                       f"{gone}, is gone")
    assert not (tmp_path / "out").exists()


def test_the_output_never_replaces_the_base_or_other_files(lora_run, tmp_path, capsys):
    run_dir, base_dir = lora_run
    before = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    for out in (base_dir, base_dir / "merged.gguf"):
        _fails_in_one_line(["fuse", str(run_dir), "--merge-lora", "--force", "--format", out.suffix[1:] or "hf",
                            "--out", str(out)], capsys, "inside the base model")
    assert {p.name: p.read_bytes() for p in base_dir.iterdir()} == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    _fails_in_one_line(["fuse", str(run_dir), "--merge-lora", "--force", "--out", str(notes)], capsys,
                       "holds other files than a model")
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    out = tmp_path / "merged"
    assert main(["fuse", str(run_dir), "--merge-lora", "--out", str(out)]) == 0
    assert "LoRA merged" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--force"):
        fuse_run(run_dir, out, merge_lora=True)
    assert fuse_run(run_dir, out, merge_lora=True, overwrite=True) == out
