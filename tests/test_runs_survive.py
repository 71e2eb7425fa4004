"""Runs survive their workers and their launcher, refuse a second trainer, restart after a failure,
and move with their directory (issue 18, findings 2, 3, 4, 6 and 8), with real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alloy.errors import ConfigError
from alloy.train.config import load_config
from alloy.train.run import train
from train_cases import TEXT, make_workspace, write_config

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("survive"))


def _config(workspace: Path, out: str, **overrides) -> Path:
    return write_config(workspace, out, **({"eval_every": 1000} | overrides))


def _start(config: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alloy", "train", str(config), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _lines(out_dir: Path) -> list[dict]:
    metrics = out_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]


def _wait_for_step(proc, out_dir: Path, step: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not _lines(out_dir) or _lines(out_dir)[-1]["step"] < step:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"the run never reached step {step}"
        time.sleep(0.02)


def _workers_of(out_dir: Path) -> list[int]:
    """PIDs of every process of the run (torchrun and its ranks name the run's job file)."""
    found = subprocess.run(["pgrep", "-f", str(out_dir / "workers")], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def _last_rank_pid(out_dir: Path) -> int:
    """The worker with the highest rank (not rank 0, which writes the metrics, when there are two)."""
    ranks = {}
    for pid in _workers_of(out_dir):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        rank = [e[5:] for e in environ if e.startswith(b"RANK=")]
        if rank and b"alloy.runtime.worker" in cmdline:
            ranks[int(rank[0])] = pid
    assert ranks, "no worker found"
    return ranks[max(ranks)]


def _final(out_dir: Path) -> dict:
    return {k: v for f in sorted((out_dir / "final").glob("*.safetensors")) for k, v in load_file(f).items()}


def test_a_killed_worker_restarts_from_its_checkpoint_and_ends_as_if_never_killed(workspace):
    steps = dict(steps=60, checkpoint={"every": 10, "keep_last": 2})
    reference = train(load_config(_config(workspace, "whole", **steps), ["verify=false"]), **QUIET)
    out_dir = workspace / "killed"
    proc = _start(_config(workspace, "killed", **steps), "--no-verify")
    try:
        _wait_for_step(proc, out_dir, 14)  # past the checkpoint at 10, before the end
        os.kill(_last_rank_pid(out_dir), signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert [l["step"] for l in _lines(out_dir)] == list(range(1, 61))  # the lost steps ran again, once
    want, got = _final(reference.out_dir), _final(out_dir)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_launcher_leaves_no_process_of_the_run(workspace, sig):
    out_dir = workspace / f"launcher-{sig.name}"
    proc = _start(_config(workspace, out_dir.name, steps=100000, checkpoint={"every": 1000, "keep_last": 1}),
                  "--no-verify")
    try:
        _wait_for_step(proc, out_dir, 2)
        # while it runs, a second trainer on the same directory is refused, naming the first
        second = subprocess.run([sys.executable, "-m", "alloy", "train", str(workspace / f"{out_dir.name}.yaml"),
                                 "--resume", "--no-verify"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr and "Traceback" not in second.stderr
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    deadline = time.monotonic() + 5
    while _workers_of(out_dir):
        assert time.monotonic() < deadline, f"still running 5 s after {sig.name}: {_workers_of(out_dir)}"
        time.sleep(0.1)


def test_a_run_that_failed_before_its_first_checkpoint_can_be_started_again(workspace):
    (workspace / "blank.txt").write_text("   \n")
    config = _config(workspace, "failed", data={"path": str(workspace / "blank.txt")})
    with pytest.raises(ConfigError, match="the corpus has no text"):
        train(load_config(config, ["verify=false"]), **QUIET)
    fixed = ["verify=false", f"data.path={workspace / 'corpus.txt'}"]
    assert train(load_config(config, fixed + ["stop_at=2"]), **QUIET).steps_done == 2  # before: "already holds files"
    shutil.rmtree(workspace / "failed")
    with pytest.raises(ConfigError, match="the corpus has no text"):
        train(load_config(config, ["verify=false"]), **QUIET)
    # before: "nothing to resume (no run.json)"
    assert train(load_config(config, fixed), resume=True, **QUIET).steps_done == 8


def test_a_moved_run_resumes_from_its_own_tokens_and_a_changed_corpus_is_refused(workspace):
    config = _config(workspace, "here")
    train(load_config(config, ["verify=false", "stop_at=4"]), **QUIET)
    shutil.move(workspace / "here", workspace / "there")
    moved = ["verify=false", f"out_dir={workspace / 'there'}"]
    assert json.loads((workspace / "there" / "data" / "tokens.json").read_text())["path"] == "tokens.bin"
    done = train(load_config(config, moved), resume=True, **QUIET)
    assert done.steps_done == 8 and not (workspace / "here").exists()
    (workspace / "other.txt").write_text(TEXT.upper())
    with pytest.raises(ConfigError, match="data changed since the run started"):
        train(load_config(config, moved + [f"data.path={workspace / 'other.txt'}"]), resume=True, **QUIET)


def test_a_rank_killed_by_sigkill_is_named_with_the_likely_cause():
    from alloy.runtime.launch import _first_error

    log = ("[rank1]:[W] something\nRoot Cause (first observed failure):\n[0]:\n  time      : 2026-12-05\n"
           "  host      : box\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 4242)\n"
           "  error_file: <N/A>\n  traceback : Signal 9 (SIGKILL) received by PID 4242\n" + "=" * 40 + "\n")
    message = _first_error(log, "127.0.0.1:1")
    assert message.startswith("worker rank 1 died of exit code -9 (SIGKILL") and "out-of-memory" in message


def test_without_restarts_the_error_names_the_killed_rank_not_its_peer(workspace):
    out_dir = workspace / "no-restart"
    proc = _start(_config(workspace, "no-restart", steps=100000, checkpoint={"every": 1000, "keep_last": 1}),
                  "--no-verify", "--max-restarts", "0")
    try:
        _wait_for_step(proc, out_dir, 2)
        killed = _last_rank_pid(out_dir)
        rank = [e for e in Path(f"/proc/{killed}/environ").read_bytes().split(b"\0") if e.startswith(b"RANK=")][0]
        os.kill(killed, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Traceback" not in err
    assert f"worker rank {rank[5:].decode()} died of exit code -9 (SIGKILL" in err, err
    assert "torchrun-node0.log" in err  # where every rank's output was kept
