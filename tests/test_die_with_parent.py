"""A worker rank dies with the process that started it (PR_SET_PDEATHSIG, alloy.runtime.launch).

A serving rank that waits in a C call (a gloo recv) never runs a Python SIGTERM handler, and the
HTTP rank installs one: once, such a rank outlived its torchrun, re-parented to init, and held its
port until killed by hand. Every rank asks Linux to kill it when its parent goes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: None)  # a Python handler, as the HTTP rank has
from alloy.runtime.launch import die_with_parent
die_with_parent()
print(os.getpid(), flush=True)
time.sleep(120)
"""

PARENT = r"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
print(child.stdout.readline().strip(), flush=True)
"""  # exits at once, leaving the child behind


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "Z" not in state.split()[1]  # a zombie has died; only its reaping is left


def test_a_rank_dies_with_its_parent_even_with_a_python_sigterm_handler():
    out = subprocess.run([sys.executable, "-c", PARENT, CHILD], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(pid)
    if alive:
        os.kill(pid, 9)
    assert not alive, "the child outlived its parent"


def test_without_the_request_the_child_would_outlive_its_parent():
    """The check above can fail: the same child without die_with_parent() stays."""
    child = CHILD.replace("die_with_parent()\n", "")
    out = subprocess.run([sys.executable, "-c", PARENT, child], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    pid = int(out.stdout.strip())
    try:
        time.sleep(1.0)
        assert _alive(pid)
    finally:
        os.kill(pid, 9)
