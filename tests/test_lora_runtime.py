"""LoRA training over real torchrun workers equals a single process that trains the same adapters,
and the frozen base comes back bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alloy.model import Transformer
from alloy.model.init import init_params
from alloy.model.lora import LoraConfig, apply_lora, init_lora_params, lora_state_dict
from alloy.runtime import DataSource, OptimConfig, RunLayout, job_document, reference_run, run_job
from alloy.spec import ModelSpec

SPEC = ModelSpec(family="llama", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=8, intermediate_size=48, max_seq_len=64, tie_embeddings=True)
STEPS, SEQ = 3, 8
DATA = DataSource("random", seed=3)
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1)
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wq", "wv", "down"]}
TOL = 1e-10  # float64, as tests/test_runtime.py argues

LAYOUTS = {
    # uneven data parallel: 3 and 1 samples of a 4-sample batch
    "dp-3-1": RunLayout.of([[(f"cpu{i}", 0, 4)] for i in range(2)], (3, 1), (1, 1)),
    # three replicas with 3, 2 and 1 samples of a 6-sample batch
    "dp-3-2-1": RunLayout.of([[(f"cpu{i}", 0, 4)] for i in range(3)], (3, 2, 1), (1, 1, 1)),
    # uneven pipeline: 3 layers then 1 (and the tied head)
    "pp-3-1": RunLayout.of([[("cpu0", 0, 3), ("cpu1", 3, 4)]], (4,), (2,)),
}


def _reference(global_batch: int):
    """One process: the same base, adapters, data, loss weighting and AdamW on the adapters only."""
    model = init_lora_params(apply_lora(init_params(Transformer(SPEC), 0).to(torch.float64), LoraConfig(**LORA)), 0)
    return reference_run(SPEC, steps=STEPS, global_batch=global_batch, seq_len=SEQ, data=DATA, optim=OPTIM,
                         dtype=torch.float64, model=model)


def _relative(got: dict, expected: dict) -> float:
    return max(((got[k] - expected[k]).norm() / expected[k].norm()).item() for k in got)


@pytest.mark.parametrize("name", LAYOUTS)
def test_distributed_lora_equals_a_single_process(name, tmp_path):
    layout = LAYOUTS[name]
    ref_losses, ref_state = _reference(layout.global_batch)
    job = job_document(SPEC, layout, steps=STEPS, seq_len=SEQ, out_dir=tmp_path, data=DATA, optim=OPTIM,
                       threads=1, timeout_s=60, param_dtype="fp64", lora=LORA)
    report = run_job(job, timeout_s=240)
    state = report.state_dict()
    adapters = {k for k in state if k.endswith((".lora_A", ".lora_B"))}
    assert adapters == set(lora_state_dict(apply_lora(Transformer(SPEC), LoraConfig(**LORA))))
    assert set(state) == set(ref_state)
    assert _relative({k: state[k] for k in adapters}, ref_state) <= TOL
    assert report.losses == pytest.approx(ref_losses, rel=TOL, abs=0)
    base = init_params(Transformer(SPEC), 0).to(torch.float64).state_dict()
    for r in report.ranks:  # every rank: the base untouched bit for bit, the same adapters
        shard = load_file(tmp_path / f"rank{r['rank']}.safetensors")
        for key, value in shard.items():
            if key in adapters:
                assert _relative({key: value}, ref_state) <= TOL
            else:
                assert torch.equal(value, base[key]), f"rank {r['rank']}: frozen {key} changed"
    # the adapters really trained (B starts at zero)
    assert all(state[k].abs().max() > 1e-4 for k in adapters if k.endswith("lora_B"))


def test_alloy_train_with_lora_writes_a_peft_adapter(tmp_path):
    """`alloy train` with a `lora:` section fine-tunes an HF model over the planned workers; final/
    is a PEFT adapter on that base, which transformers + PEFT run as Alloy does."""
    import hashlib
    import json

    import transformers

    import alloy
    from alloy.checkpoint.lora import load_adapter
    from alloy.train.config import load_config
    from alloy.train.run import train
    from train_cases import MODEL, make_workspace, write_config

    peft = pytest.importorskip("peft")
    workspace = make_workspace(tmp_path)
    kwargs = {k: v for k, v in MODEL.items() if k != "model_type"}
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **kwargs))
    hf.save_pretrained(workspace / "base")
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (workspace / "base").iterdir()}  # noqa: E731
    before = digest()
    config = write_config(workspace, "lora", model=str(workspace / "base"), steps=6, optimizer={"lr": 2e-2},
                          lora={"rank": 4, "alpha": 8, "targets": ["wq", "wk", "wv", "wo"]})
    result = train(load_config(config), log=lambda *_: None)

    lines = [json.loads(l) for l in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert digest() == before  # the base directory is only read
    adapter = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((workspace / "base").resolve()) and adapter["r"] == 4
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(workspace / "base"),
                                            result.final_dir).eval()
    ours = load_adapter(alloy.load(workspace / "base"), result.final_dir).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (2, 16))
    with torch.no_grad():
        got = ours(ids)
        torch.testing.assert_close(got, theirs(input_ids=ids).logits, atol=1e-4, rtol=0)
        assert (got - alloy.load(workspace / "base")(ids)).abs().max() > 1e-3  # the adapter learned something


def test_lora_config_errors_are_one_line(tmp_path):
    from alloy.errors import ConfigError
    from alloy.train.config import load_config
    from alloy.train.run import train
    from train_cases import make_workspace, write_config

    workspace = make_workspace(tmp_path)
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config(write_config(workspace, "zero", lora={"rank": 0}))
    with pytest.raises(ConfigError, match="q_proj name no linear"):
        train(load_config(write_config(workspace, "bad", lora={"targets": ["q_proj"]})), log=lambda *_: None)


def test_a_lora_run_resumes_exactly_from_adapter_only_checkpoints(tmp_path):
    """Checkpoints of a LoRA run hold the adapters and their AdamW state, not the frozen base; a run
    stopped at step 2 and resumed ends where an uninterrupted one does."""
    import json

    from alloy.checkpoint.lora import ADAPTER_WEIGHTS
    from alloy.errors import ConfigError
    from alloy.train.config import load_config
    from alloy.train.run import train
    from train_cases import make_workspace, write_config

    workspace = make_workspace(tmp_path)
    lora = {"lora": {"rank": 4, "alpha": 8}, "steps": 4, "optimizer": {"lr": 1e-2}}
    whole = train(load_config(write_config(workspace, "whole", **lora)), log=lambda *_: None)
    config = write_config(workspace, "cut", **lora)
    first = train(load_config(config, ["stop_at=2"]), log=lambda *_: None)
    shard = load_file(next((first.out_dir / "checkpoints").glob("step-*")) / "rank0.safetensors")
    assert shard and all(".lora_" in k for k in shard)  # adapters (param, exp_avg, exp_avg_sq) only
    with pytest.raises(ConfigError, match="lora changed"):
        train(load_config(config, ["--lora.rank", "8"]), resume=True, log=lambda *_: None)
    second = train(load_config(config), resume=True, log=lambda *_: None)
    losses = [[json.loads(l)["loss"] for l in (r.out_dir / "metrics.jsonl").read_text().splitlines()]
              for r in (whole, second)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=0)
    a, b = (load_file(r.final_dir / ADAPTER_WEIGHTS) for r in (whole, second))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
