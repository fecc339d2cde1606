"""SIGKILL in the middle of writing a large adapter: the real file name holds a complete, loadable
file (the previous version when overwriting) or does not exist, never half a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMEL = 8 * 1024 * 1024  # 32 MiB of fp32 per version: long enough to be killed in the middle

# Writes versions 0, 1, ..., LAST of one adapter file, each tensor filled with its version number, then
# waits to be killed: a write that outran the kill cannot bring a version the test does not expect (a
# fast, idle machine finished version 2 before a kill timed for the middle of version 1).
WRITER = """
import sys, time, torch
from sparta_cli.fileio import write_safetensors
path, numel, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for version in range(last + 1):
    tensor = torch.full((numel,), float(version))
    print(f"begin {version}", flush=True)
    start = time.perf_counter()
    write_safetensors(path, {"delta": tensor}, {"version": str(version)})
    print(f"done {version} {time.perf_counter() - start:.4f}", flush=True)
time.sleep(3600)
"""


def _start(path: Path, last: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(NUMEL), str(last)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_for(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the writer exited (code {proc.wait()}) before printing {prefix!r}")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def _check_complete(path: Path, versions: set[int]) -> int:
    """The file loads, holds all NUMEL values of one version, and that version is one of `versions`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        version = int(handle.metadata()["version"])
        tensor = handle.get_tensor("delta")
    assert version in versions, f"version {version}, expected one of {versions}"
    assert tensor.numel() == NUMEL and bool((tensor == version).all()), "a mixed or short tensor"
    return version


@pytest.mark.parametrize("fraction", [0.2, 0.8])
def test_kill_while_overwriting_keeps_the_previous_version_or_the_new_one(tmp_path, fraction):
    path = tmp_path / "adapter_model.safetensors"
    proc = _start(path, last=1)
    try:
        took = float(_wait_for(proc, "done 0").split()[2])  # version 0 is complete on disk
        _wait_for(proc, "begin 1")
        time.sleep(fraction * took)  # somewhere inside the write of version 1
    finally:
        _kill(proc)
    _check_complete(path, {0, 1})


def test_kill_during_the_first_write_leaves_no_file_or_a_whole_one(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    proc = _start(path, last=0)
    try:
        _wait_for(proc, "begin 0")
        time.sleep(0.05)
    finally:
        _kill(proc)
    if path.exists():
        _check_complete(path, {0})
    # a kill leaves at most hidden temporary files (ours, or safetensors' own) beside it
    assert all(p == path or p.name.startswith(".") for p in tmp_path.iterdir())
