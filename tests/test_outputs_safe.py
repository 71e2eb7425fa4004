"""Outputs never destroy data and never leave debris (issue 18, findings 1 and 9).

fuse, merge, save and export write only where nothing is lost: never onto their input, never
over a file or a folder holding anything but a previous output of their kind, and over that only
with --force. A writer killed at any moment leaves the old output or the new one, and the next
start sweeps its staging folder. Modes follow the umask; checkpoint shards carry checksums.
The kill tests kill real processes with SIGKILL; this file is also the program they kill.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import alloy
from alloy.cli import main
from alloy.errors import CheckpointError, ConfigError
from alloy.fuse import export_model, fuse_run, merge
from alloy.fuse.fuse import check_checkpoint
from alloy.model import Transformer
from alloy.runtime.checkpoint import complete_checkpoints, finalize, load_rank, save_rank
from alloy.runtime.layout import RunLayout
from alloy.spec import ModelSpec

# ~0.8M parameters (3 MB; 10 MB of checkpoint with AdamW state): a fuse or a save takes long
# enough (tens of ms) that a random kill lands in the middle of writing as well as between.
SPEC = ModelSpec(family="llama", vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=32, intermediate_size=256, max_seq_len=64)
LAYOUT = RunLayout.of([[("cpu0", 0, 2), ("cpu1", 2, 4)]], (2,), (1,))
KEEP_LAST = 2
KILLS = 8  # per loop: two loops, 16 kills in all


def _stage(rank: int, step: int) -> tuple[Transformer, SimpleNamespace]:
    """Rank `rank`'s stage after `step`: weights and AdamW state a function of (rank, step) alone.
    The optimizer is its state alone, all save_rank and load_rank touch (torch.optim would import
    torch._dynamo: 3 s more for every process the kill tests start)."""
    s = LAYOUT.ranks()[rank].stage
    torch.manual_seed(1000 * step + rank)
    model = Transformer(SPEC, s.layers, embed=s.has_embed, head=s.has_head)
    optimizer = SimpleNamespace(state={p: {"step": torch.tensor(float(step)), "exp_avg": torch.randn_like(p),
                                           "exp_avg_sq": torch.rand_like(p)} for p in model.parameters()})
    return model, optimizer


def write_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint as a run writes it: every rank's `save_rank`, then rank 0's `finalize`."""
    for info in LAYOUT.ranks():
        model, optimizer = _stage(info.rank, step)
        save_rank(root, step, info.rank, model, optimizer, {"stage": info.stage_index})
    return finalize(root, step, SPEC, LAYOUT, KEEP_LAST, {})


def _resumes_exactly(checkpoint: Path) -> None:
    """What resume and fuse do with a checkpoint succeeds, and gives back exactly what was saved."""
    check_checkpoint(checkpoint)
    step = int(checkpoint.name.split("-")[1])
    for info in LAYOUT.ranks():
        want, want_optimizer = _stage(info.rank, step)
        got, got_optimizer = _stage(info.rank, 0)
        assert load_rank(checkpoint, info.rank, got, got_optimizer)["step"] == step
        for (name, a), b in zip(want.named_parameters(), got.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(got_optimizer.state[b]["exp_avg"], want_optimizer.state[a]["exp_avg"],
                                       rtol=0, atol=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory with checkpoints at steps 1 and 2 (and a file of its own, as runs have)."""
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "metrics.jsonl").write_text('{"step": 2}\n')
    for step in (1, 2):
        write_checkpoint(run_dir / "checkpoints", step)
    return run_dir


def _contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


# --- finding 1: outputs delete whatever --out names ---------------------------------------------

def test_fuse_never_writes_onto_its_own_run(run, capsys):
    before = _contents(run)
    for force in ([], ["--force"]):
        assert main(["fuse", str(run), "--out", str(run), *force]) == 2
        _one_line_error(capsys, "alloy fuse: error:", "is (or holds) the input")
        assert main(["fuse", str(run / "checkpoints"), "--out", str(run), *force]) == 2  # a folder above it
        _one_line_error(capsys, "is (or holds) the input")
    assert _contents(run) == before


def test_fuse_and_merge_never_delete_a_folder_holding_other_files(run, tmp_path, capsys):
    model = fuse_run(run, tmp_path / "model")
    notes = tmp_path / "d" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("x")
    for force in ([], ["--force"]):  # --force replaces previous outputs only
        assert main(["fuse", str(run), "--out", str(notes.parent), *force]) == 2
        _one_line_error(capsys, "alloy fuse: error:", "holds other files than a model (notes.txt)")
        assert main(["merge", str(model), str(model), "--out", str(notes.parent), *force]) == 2
        _one_line_error(capsys, "alloy merge: error:", "holds other files than a model (notes.txt)")
    assert [p.name for p in notes.parent.iterdir()] == ["notes.txt"] and notes.read_text() == "x"


def test_save_never_replaces_a_file_with_a_folder(run, tmp_path):
    model = alloy.load(fuse_run(run, tmp_path / "model"))
    existing = tmp_path / "existing_file.yaml"
    existing.write_text("steps: 10\n")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        alloy.save(model, existing)
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        alloy.save(model, existing, overwrite=True)
    assert existing.read_text() == "steps: 10\n"


def test_a_previous_fused_model_is_replaced_only_with_force(run, tmp_path, capsys):
    out = tmp_path / "fused"
    assert main(["fuse", str(run), "--step", "1", "--out", str(out)]) == 0
    step1 = _contents(out)
    assert main(["fuse", str(run), "--step", "2", "--out", str(out)]) == 2
    _one_line_error(capsys, "already holds a model; replace it with --force")
    assert _contents(out) == step1
    assert main(["fuse", str(run), "--step", "2", "--out", str(out), "--force"]) == 0
    assert _contents(out) == _contents(fuse_run(run, tmp_path / "step2", step=2)) != step1


def test_a_previous_merge_or_save_is_replaced_only_with_overwrite_and_never_an_input(run, tmp_path):
    a, b = fuse_run(run, tmp_path / "a", step=1), fuse_run(run, tmp_path / "b", step=2)
    merged = merge([a, b], tmp_path / "merged")
    with pytest.raises(ConfigError, match="already holds a model"):
        merge([a, b], merged, weights=[1, 0])
    merge([a, b], merged, weights=[1, 0], overwrite=True)
    assert _weights(merged).keys() == _weights(a).keys()
    for name, tensor in _weights(a).items():
        torch.testing.assert_close(_weights(merged)[name], tensor, rtol=0, atol=0)
    for out in (a, tmp_path):  # an input, or a folder holding one: refused even with overwrite
        with pytest.raises(ConfigError, match="is \\(or holds\\) the input"):
            merge([a, b], out, overwrite=True)
    model = alloy.load(b)
    with pytest.raises(ConfigError, match="already holds a model"):
        alloy.save(model, merged)
    alloy.save(model, merged, overwrite=True)
    assert _weights(merged).keys() == _weights(b).keys()


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(directory.glob("*.safetensors")) for k, v in load_file(path).items()}


def test_an_export_replaces_only_a_previous_export_of_its_format_and_only_with_force(run, tmp_path, capsys):
    model = fuse_run(run, tmp_path / "model")
    gguf = export_model(model, tmp_path / "model.gguf", format="gguf")
    assert main(["export", str(model), "--format", "gguf", "--out", str(gguf)]) == 2
    _one_line_error(capsys, "already exists; replace it with --force")
    assert main(["export", str(model), "--format", "gguf", "--out", str(gguf), "--force"]) == 0
    before = _contents(model)
    for out in (model / "config.json", model):
        assert main(["export", str(model), "--format", "gguf", "--out", str(out), "--force"]) == 2
        _one_line_error(capsys, "is not a")
    assert _contents(model) == before
    assert main(["fuse", str(run), "--format", "gguf", "--out", str(model / "config.json"), "--force"]) == 2
    _one_line_error(capsys, "exists and is not a gguf file")
    assert _contents(model) == before


# --- finding 9: staging left behind, 0700/0600 modes (tokenizers: tests/test_merge.py) ------------------

def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("kill_at_rename", [1, 2], ids=["setting-the-old-aside", "renaming-the-new-in"])
def test_a_fuse_killed_while_publishing_loses_nothing_and_its_staging_is_swept(run, tmp_path, capsys, kill_at_rename):
    out = tmp_path / "fused"
    fuse_run(run, out, step=1)
    step1 = _contents(out)
    child = subprocess.run([sys.executable, __file__, "fuse-kill-at-rename", str(run), str(out), str(kill_at_rename)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # The next start finds the previous output where it was (so it asks for --force) and no debris.
    assert main(["fuse", str(run), "--step", "2", "--out", str(out)]) == 2
    _one_line_error(capsys, "already holds a model")
    assert _contents(out) == step1
    assert _hidden(tmp_path) == []


def _modes(directory: Path) -> set[str]:
    return {f"{'dir' if p.is_dir() else 'file'} {oct(p.stat().st_mode & 0o777)}"
            for p in [directory, *directory.rglob("*")]}


def test_outputs_follow_the_umask(run, tmp_path):
    old = os.umask(0o027)
    try:
        fused = fuse_run(run, tmp_path / "fused")
        merged = merge([fused, fused], tmp_path / "merged")
        saved = alloy.save(alloy.load(fused), tmp_path / "saved")
        gguf = export_model(fused, tmp_path / "model.gguf", format="gguf")
        write_checkpoint(tmp_path / "run" / "checkpoints", 3)
    finally:
        os.umask(old)
    want = {"dir 0o750", "file 0o640"}
    for directory in (fused, merged, saved, tmp_path / "run"):
        assert _modes(directory) == want, directory
    assert oct(gguf.stat().st_mode & 0o777) == "0o640"


def test_an_onnx_export_killed_mid_write_leaves_nothing_after_the_next_and_follows_the_umask(run, tmp_path):
    pytest.importorskip("onnxscript")
    fused = fuse_run(run, tmp_path / "fused")
    target = tmp_path / "out" / "model.onnx"
    child = subprocess.run([sys.executable, __file__, "onnx-kill-mid-write", str(fused), str(target)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert _hidden(target.parent), "the killed export left no staging: the test did not kill it mid-write"
    old = os.umask(0o027)
    try:
        export_model(fused, target, format="onnx")
    finally:
        os.umask(old)
    assert _hidden(target.parent) == []
    assert {oct(p.stat().st_mode & 0o777) for p in target.parent.iterdir()} == {"0o640"}


def test_a_document_written_to_a_fifo_goes_through_it_and_a_failed_write_names_the_users_path(tmp_path, monkeypatch):
    import errno
    import threading

    from alloy.jsonio import write_text_atomic

    fifo = tmp_path / "plan.fifo"  # as /dev/stdout would be: replaced by a regular file before
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_text_atomic(fifo, "{}\n")
    reader.join(10)
    assert got == ["{}\n"] and fifo.is_fifo()

    def disk_full(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError) as caught:
        write_text_atomic(tmp_path / "plan.json", "{}")
    assert caught.value.filename == str(tmp_path / "plan.json") and ".tmp" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.fifo"]


# --- checksums: a corrupted shard is refused, naming the file --------------------------------------

def test_resume_and_fuse_refuse_a_corrupted_shard_naming_it(run, tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint = write_checkpoint(root, 1)
    shard = checkpoint / "rank1.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor data: same size, still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="rank1.safetensors: corrupt — its SHA-256 differs"):
        load_rank(checkpoint, 1, *_stage(1, 0))
    with pytest.raises(CheckpointError, match="rank1.safetensors: corrupt"):
        fuse_run(tmp_path, tmp_path / "fused")
    load_rank(checkpoint, 0, *_stage(0, 0))  # the other rank's shard is fine


# --- random kills: 0 unusable outputs, 0 leftover staging after the next start -----------------------

def _start(*args: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "ready\n", child.stderr.read()
    return child


def _kill_after(child: subprocess.Popen, delay_s: float) -> None:
    time.sleep(delay_s)
    assert child.poll() is None, child.stderr.read()  # it loops until killed
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_fuse_killed_at_random_moments_never_leaves_an_unusable_output_or_staging(run, tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    reference = _contents(fuse_run(run, tmp_path / "reference"))
    out = tmp_path / "outs" / "fused"
    fuse_run(run, out)
    started = time.monotonic()
    fuse_run(run, out, overwrite=True)
    one_fuse_s = time.monotonic() - started
    mid_write = 0
    for kill in range(KILLS):
        child = _start("fuse-loop", str(run), str(out))
        _kill_after(child, rng.uniform(0, 3 * one_fuse_s))
        where = f"kill {kill} (seed {seed})"
        assert not out.exists() or _contents(out) == reference, where  # old or new, never half
        mid_write += bool(_hidden(out.parent))
        fuse_run(run, out, overwrite=True)  # the next start
        assert _contents(out) == reference, where
        assert _hidden(out.parent) == [], where
    print(f"fuse: {KILLS} kills, {mid_write} left staging for the next start to sweep (seed {seed})")


def test_checkpoint_saves_killed_at_random_moments_never_leave_an_unusable_checkpoint(tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 1)
    started = time.monotonic()
    write_checkpoint(root, 2)
    one_save_s = time.monotonic() - started
    mid_write = 0
    for kill in range(KILLS):
        where = f"kill {kill} (seed {seed})"
        latest = int(complete_checkpoints(root)[-1].name.split("-")[1])
        child = _start("save-loop", str(root), str(latest + 1))
        _kill_after(child, rng.uniform(0, 3 * one_save_s))
        mid_write += any(p.name.endswith((".partial", ".trash")) for p in root.iterdir())
        for checkpoint in complete_checkpoints(root):
            _resumes_exactly(checkpoint)
        latest = int(complete_checkpoints(root)[-1].name.split("-")[1])
        write_checkpoint(root, latest + 1)  # the next start: the resumed run's first save
        assert [p.name for p in root.iterdir() if not p.name.startswith("step-") or p.name.endswith(".partial")] \
            == [], where
        assert len(complete_checkpoints(root)) == KEEP_LAST, where
        for checkpoint in complete_checkpoints(root):
            assert _hidden(checkpoint) == [], f"{where}: {checkpoint.name}"  # no temp files of a killed try
        _resumes_exactly(complete_checkpoints(root)[-1])
    print(f"checkpoint saves: {KILLS} kills, {mid_write} left a partial or trash directory (seed {seed})")


# --- the programs the tests kill ----------------------------------------------------------------------

def _kill_self_at_rename(n: int) -> None:
    real, calls = os.rename, itertools.count(1)

    def rename(*args, **kwargs):
        if next(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    os.rename = rename


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "fuse-kill-at-rename":
        run_dir, out, n = args
        _kill_self_at_rename(int(n))
        fuse_run(run_dir, out, step=2, overwrite=True)
    elif mode == "onnx-kill-mid-write":  # SIGKILL once the exporter has written part of its file
        model_dir, out = args

        def half_written(model, example, path, **kwargs):
            Path(path).write_bytes(b"\x08half")
            os.kill(os.getpid(), signal.SIGKILL)

        torch.onnx.export = half_written
        export_model(model_dir, out, format="onnx")
    elif mode == "fuse-loop":  # "ready" once warm, so that the kill lands in the steady loop
        run_dir, out = args
        fuse_run(run_dir, out, overwrite=True)
        print("ready", flush=True)
        while True:
            fuse_run(run_dir, out, overwrite=True)
    elif mode == "save-loop":
        root, first = Path(args[0]), int(args[1])
        write_checkpoint(root, first)
        print("ready", flush=True)
        for step in itertools.count(first + 1):
            write_checkpoint(root, step)
    sys.exit(f"unknown mode {mode!r}")
