"""Checkpoints resume exactly, runs reproduce, and SIGINT/SIGTERM leave a resumable run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

STEPS = 60


def _recipe(tmp: Path, model_dir: Path, data_dir: Path, out: Path, **training) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"density": 0.1, "targets": ["v", "o"]},
        "task": {"name": "sst2"},
        "data": {"dir": str(data_dir), "max_length": 32, "max_train_samples": 40, "max_eval_samples": 32},
        "training": {"max_steps": STEPS, "batch_size": 4, "lr": 1e-3, "warmup_steps": 5, "log_every": 1, **training},
        "seed": 7,
        "output_dir": str(out),
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train(recipe: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "sparta_cli", "train", str(recipe), *extra], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _start(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparta_cli", "train", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:  # minutes on a loaded 2-core machine
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "trainer_log.jsonl").read_text().splitlines() if '"loss"' in line]


def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(tmp_path, tiny_bert_dir, data_dir):
    reference = tmp_path / "reference"
    _train(_recipe(tmp_path, tiny_bert_dir, data_dir, reference, save_every=10))
    # same recipe, same seed: identical adapter files (reproducibility)
    again = tmp_path / "again"
    _train(_recipe(tmp_path, tiny_bert_dir, data_dir, again, save_every=10))
    assert (again / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()

    killed = tmp_path / "killed"
    recipe = _recipe(tmp_path, tiny_bert_dir, data_dir, killed, save_every=10, keep_checkpoints=2)
    proc = _start(recipe)
    _wait_for(killed / "checkpoint-20", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "all_results.json").exists(), "the run finished before it was killed"
    # without --resume, the half-finished folder is refused and the error says --resume exists
    refused = _train(recipe, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    _train(recipe, "--resume")
    assert (killed / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    assert _steps(killed) == _steps(reference) == list(range(1, STEPS + 1))
    assert [p.name for p in sorted(killed.glob("checkpoint-*"))] == ["checkpoint-50", "checkpoint-60"]  # keep_checkpoints, the final one included


@pytest.mark.parametrize("save_every", [1000, None])
def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_bert_dir, data_dir, save_every):
    """The checkpoint a signal writes resumes the run; where no checkpoints were asked for (save_every
    null) the finished run leaves none behind, the interruption's included (it once stayed)."""
    run = tmp_path / "stopped"
    recipe = _recipe(tmp_path, tiny_bert_dir, data_dir, run, **({"save_every": save_every} if save_every else {}))
    proc = _start(recipe)
    _wait_for(run / "trainer_log.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    stopped_at = [path.name for path in run.glob("checkpoint-*")]
    assert stopped_at
    _train(recipe, "--resume")
    assert (run / "all_results.json").is_file()
    left = sorted(path.name for path in run.glob("checkpoint-*"))
    assert left == (sorted({*stopped_at, f"checkpoint-{STEPS}"}) if save_every else []), left


def test_sigterm_during_the_final_evaluation_resumes_without_training(tmp_path, tiny_bert_dir, data_dir):
    reference = tmp_path / "reference"
    _train(_recipe(tmp_path, tiny_bert_dir, data_dir, reference))
    assert not list(reference.glob("checkpoint-*")), "the checkpoint guarding the final evaluation is left behind"

    run = tmp_path / "stopped"
    recipe = _recipe(tmp_path, tiny_bert_dir, data_dir, run)
    slow = yaml.safe_load(recipe.read_text())  # the whole dev set one example at a time: a few seconds of evaluation
    slow["data"]["max_eval_samples"] = None
    slow["training"]["eval_batch_size"] = 1
    recipe.write_text(yaml.safe_dump(slow))
    proc = _start(recipe)
    try:
        _wait_for(run / f"checkpoint-{STEPS}", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "after training" in err and "--resume" in err and "Traceback" not in err
    assert not (run / "all_results.json").exists()

    resumed = _train(recipe, "--resume")
    assert "resuming from" in resumed.stdout and f"/{STEPS} · loss" not in resumed.stdout  # no progress line: nothing trained
    assert _steps(run) == list(range(1, STEPS + 1))
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    assert sum("eval_accuracy" in r for r in log) == 1 and sum("train_runtime" in r for r in log) == 1
    assert json.loads((run / "all_results.json").read_text())["eval_num_examples"] == 872
    assert (run / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    assert not list(run.glob("checkpoint-*"))


def test_a_signal_inside_library_code_that_wraps_exceptions_still_stops_the_run():
    # transformers builds tensors under `except Exception: raise ValueError(...)`: a SIGTERM landing
    # there in the final evaluation came out as "the tokenizer files cannot be read" (CI, exit 2)
    from sparta_cli.errors import Interrupted
    from sparta_cli.train import StopFlag

    def library_call():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here, inside the try
        except Exception as exc:
            raise ValueError("Unable to create tensor") from exc

    with pytest.raises(Interrupted, match="stopped by SIGTERM after training"):
        with StopFlag() as stop:
            stop.raise_from_now("stopped by {signal} after training")
            library_call()


def test_resume_of_a_finished_run_that_kept_checkpoints_is_refused(tmp_path, tiny_bert_dir, data_dir):
    run = tmp_path / "finished"
    recipe = _recipe(tmp_path, tiny_bert_dir, data_dir, run, max_steps=4, save_every=2)
    _train(recipe)
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    before = (run / "all_results.json").read_bytes()
    refused = _train(recipe, "--resume", check=False)
    assert refused.returncode == 2 and "already holds a finished run" in refused.stderr
    assert (run / "all_results.json").read_bytes() == before


WINDOW_STEPS = 6
# `sparta train` with a SIGTERM sent to itself in the window between the last training step and the
# final checkpoint: "before" as the run enters its end (after the last optimizer step, before any file
# of the final checkpoint), "during" once the final checkpoint's first file is written (the rest not yet).
SIGNAL_IN_THE_WINDOW = """
import os, signal, sys
from sparta_cli import checkpoint, train
when, steps, recipe = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if when == "before":
    finish = train.Trainer.finish
    def finish_after_a_signal(self):
        os.kill(os.getpid(), signal.SIGTERM)
        finish(self)
    train.Trainer.finish = finish_after_a_signal
else:
    write = checkpoint.write_safetensors
    def write_then_signal(path, tensors, metadata=None):
        write(path, tensors, metadata)
        if path.parent.name == f".checkpoint-{steps}.tmp":
            os.kill(os.getpid(), signal.SIGTERM)
    checkpoint.write_safetensors = write_then_signal
sys.argv = ["sparta", "train", recipe]
from sparta_cli.cli import main
main()
"""


@pytest.fixture(scope="module")
def window_reference(tmp_path_factory, tiny_bert_dir, data_dir) -> bytes:
    tmp = tmp_path_factory.mktemp("window")
    run = tmp / "reference"
    _train(_recipe(tmp, tiny_bert_dir, data_dir, run, max_steps=WINDOW_STEPS))
    return (run / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("when", ["before", "during"])
def test_sigterm_between_the_last_step_and_the_final_checkpoint_saves_it_and_resumes(tmp_path, tiny_bert_dir, data_dir,
                                                                                     window_reference, when):
    run = tmp_path / "stopped"
    recipe = _recipe(tmp_path, tiny_bert_dir, data_dir, run, max_steps=WINDOW_STEPS)
    stopped = subprocess.run([sys.executable, "-c", SIGNAL_IN_THE_WINDOW, when, str(WINDOW_STEPS), str(recipe)],
                             capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 130, stopped.stderr  # not killed by the signal's default action (-15)
    assert "after training" in stopped.stderr and "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    assert [p.name for p in run.glob("checkpoint-*")] == [f"checkpoint-{WINDOW_STEPS}"]  # complete, renamed into place
    assert not (run / "all_results.json").exists() and not (run / "adapter_model.safetensors").exists()

    resumed = _train(recipe, "--resume")
    assert "resuming from" in resumed.stdout and f"/{WINDOW_STEPS} · loss" not in resumed.stdout  # nothing trained again
    assert (run / "adapter_model.safetensors").read_bytes() == window_reference
    assert _steps(run) == list(range(1, WINDOW_STEPS + 1))
    assert not list(run.glob("checkpoint-*")) and not list(run.glob(".checkpoint-*"))
