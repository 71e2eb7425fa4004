"""Fusion of real distributed runs (torchrun workers over gloo) into one transformers model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloy.cli import main
from alloy.errors import CheckpointError
from alloy.fuse import find_checkpoint, fuse_run
from alloy.model import Transformer
from alloy.runtime import Checkpointing, DataSource, OptimConfig, RunLayout, job_document, run_job
from alloy.runtime.checkpoint import sha256
from alloy.spec import ModelSpec

SPEC = ModelSpec(family="llama", vocab_size=64, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2,
                 head_dim=8, intermediate_size=48, max_seq_len=64, tie_embeddings=True)


LAYOUTS = {
    # uneven pipeline: 3, 2 and 1 layers, embeddings first, (tied) head last
    "pp-3-2-1": RunLayout.of([[("cpu0", 0, 3), ("cpu1", 3, 5), ("cpu2", 5, 6)]], (6,), (3,)),
    # 2 replicas x 2 stages, split differently, with uneven shares
    "hybrid-2x2": RunLayout.of([[("cpu0", 0, 4), ("cpu1", 4, 6)], [("cpu2", 0, 2), ("cpu3", 2, 6)]],
                               (4, 2), (2, 2)),
}
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One real run per layout, checkpointed at its last step (built once: each takes ~20 s)."""
    out = {}
    for name, layout in LAYOUTS.items():
        run_dir = tmp_path_factory.mktemp(name)
        (run_dir / "workers").mkdir()
        job = job_document(SPEC, layout, steps=STEPS, seq_len=8, out_dir=run_dir / "workers",
                           data=DataSource("random", seed=3), optim=OptimConfig(lr=3e-3, weight_decay=0.1),
                           threads=1, timeout_s=60,
                           checkpoint=Checkpointing(dir=str(run_dir / "checkpoints"), every=STEPS, keep_last=2))
        run_job(job, timeout_s=240)
        out[name] = run_dir
    return out


def _distributed_forward(checkpoint: Path, layout: RunLayout, replica: int, ids: torch.Tensor) -> torch.Tensor:
    """The distributed model as its ranks run it: one replica's stages, each built from its own
    shard (the head stage with its own copy of the tied embeddings), applied in pipeline order."""
    x = ids
    for info in layout.ranks():
        if info.replica == replica:
            s = info.stage
            stage = Transformer(SPEC, s.layers, embed=s.has_embed, head=s.has_head).eval()
            shard = load_file(checkpoint / f"rank{info.rank}.safetensors")
            stage.load_state_dict({k.removeprefix("param."): v for k, v in shard.items() if k.startswith("param.")},
                                  strict=True)
            x = stage(x)
    return x


@pytest.mark.parametrize("name", LAYOUTS)
def test_fused_run_loads_in_transformers_with_the_distributed_logits(name, runs, tmp_path):
    import transformers

    run_dir = runs[name]
    out = fuse_run(run_dir, tmp_path / "fused")
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".json")) == [
        "config.json", "model.safetensors.index.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, SPEC.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = hf(ids).logits
        for replica in range(len(LAYOUTS[name].replicas)):  # every replica is the same model
            want = _distributed_forward(find_checkpoint(run_dir), LAYOUTS[name], replica, ids)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the checkpoint really is the trained model, not the initial one
    from alloy.model.init import init_params
    init = init_params(Transformer(SPEC), 0).eval()
    with torch.no_grad():
        assert (init(ids) - got).abs().max() > 1e-3


def test_fuse_to_gguf_and_with_a_dtype(runs, tmp_path):
    from gguf import GGUFReader

    path = fuse_run(runs["pp-3-2-1"], tmp_path / "model.gguf", format="gguf")
    reader = GGUFReader(path)
    assert reader.get_field("llama.block_count").contents() == SPEC.num_layers
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # the temporary HF directory is gone
    half = fuse_run(runs["pp-3-2-1"], tmp_path / "half", dtype="bf16")
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"


def _copy(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run's checkpoints to damage, and its checkpoint directory."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    return copy, find_checkpoint(copy)


def _rewrite_shard(checkpoint: Path, rank: int, change) -> None:
    """Edit one rank's tensors and record the new size and checksum, as a consistent (but wrong) save would."""
    path = checkpoint / f"rank{rank}.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path))
    _record(checkpoint, path)


def _record(checkpoint: Path, path: Path) -> None:
    def change(manifest):
        manifest["files"][path.name] = path.stat().st_size
        manifest["sha256"][path.name] = sha256(path)
    _edit_manifest(checkpoint, change)


def _edit_manifest(checkpoint: Path, change) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    change(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _missing_shard(ck):
    (ck / "rank1.safetensors").unlink()


def _duplicated_layer_range(ck):  # stage 1 claims [2, 5): layer 2 twice
    _edit_manifest(ck, lambda m: m["layout"]["replicas"][0][1]["layers"].__setitem__(0, 2))


def _layer_in_two_shards(ck):  # the layout is right but rank 1's shard also holds layer 2
    layer2 = {k: v for k, v in load_file(ck / "rank0.safetensors").items() if k.startswith("param.layers.2.")}
    _rewrite_shard(ck, 1, lambda t: t.update(layer2))


def _truncated(ck):
    path = ck / "rank2.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_and_recorded(ck):  # even when the manifest agrees, safetensors refuses the file
    _truncated(ck)
    _record(ck, ck / "rank2.safetensors")


def _flipped_bit(ck):  # same size, still parses: only the manifest's checksum tells
    path = ck / "rank1.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _manifest_from_another_model(ck):
    _edit_manifest(ck, lambda m: m["spec"].update(hidden_size=48, head_dim=12))


def _diverged_replica(ck):  # replica 1's first stage drifted by 1e-3 on one weight
    def nudge(tensors):
        tensors["param.layers.1.attn.wq.weight"][0, 0] += 1e-3
    _rewrite_shard(ck, 2, nudge)


DAMAGE = [
    ("pp-3-2-1", _missing_shard, "shard rank1.safetensors is missing"),
    ("pp-3-2-1", _duplicated_layer_range, r"overlap — expected it to start at layer 3"),
    ("pp-3-2-1", _layer_in_two_shards, r"also holds layers\.2\..* belongs to another stage"),
    ("pp-3-2-1", _truncated, "truncated"),
    ("pp-3-2-1", _truncated_and_recorded, "unreadable shard"),
    ("pp-3-2-1", _flipped_bit, "rank1.safetensors: corrupt — its SHA-256 differs from the one the manifest recorded"),
    ("pp-3-2-1", _manifest_from_another_model, r"embed.tok.weight has shape \[64, 32\] but the manifest's model implies \[64, 48\] — is the manifest from another model"),
    ("hybrid-2x2", _diverged_replica, r"replicas diverged — replica 1 stage 0 differs .* by up to 0\.001 "
                                      r"at layers\.1\.attn\.wq\.weight"),
]


@pytest.mark.parametrize("name,damage,match", DAMAGE, ids=[d[1].__name__.strip("_") for d in DAMAGE])
def test_a_damaged_checkpoint_fails_clearly_and_leaves_no_output(name, damage, match, runs, tmp_path):
    run_dir, checkpoint = _copy(runs[name], tmp_path)
    damage(checkpoint)
    outs = tmp_path / "outs"
    outs.mkdir()
    with pytest.raises(CheckpointError, match=match):
        fuse_run(run_dir, outs / "fused")
    assert list(outs.iterdir()) == []  # neither the output nor a staging directory


def test_a_failed_fuse_keeps_the_previous_output(runs, tmp_path):
    run_dir, checkpoint = _copy(runs["pp-3-2-1"], tmp_path)
    good = fuse_run(run_dir, tmp_path / "fused")
    before = sorted(p.name for p in good.iterdir())
    _truncated(checkpoint)
    with pytest.raises(CheckpointError):
        fuse_run(run_dir, good, overwrite=True)
    assert sorted(p.name for p in good.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_fuses_and_reports_errors_in_one_line(runs, tmp_path, capsys):
    assert main(["fuse", str(runs["pp-3-2-1"]), "--out", str(tmp_path / "fused")]) == 0
    assert "fused" in capsys.readouterr().out and (tmp_path / "fused" / "config.json").is_file()
    assert main(["fuse", str(runs["pp-3-2-1"]), "--step", "2", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no complete checkpoint at step 2 (complete: 3)" in err
    assert not (tmp_path / "other").exists()
