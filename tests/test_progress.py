"""Progress when the output is not a terminal (nohup, `| tee`, CI): plain lines, not a bar."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import yaml
from rich.console import Console

from sparta_cli.console import TrainingProgress


def _plain(out: io.StringIO, **kwargs) -> TrainingProgress:
    return TrainingProgress(100, 0, out=Console(file=out, force_terminal=False, width=200), **kwargs)


def test_plain_lines_every_twentieth_of_the_run_and_at_the_end():
    out = io.StringIO()
    with _plain(out, every_s=1e9) as progress:
        for step in range(1, 101):
            progress.update(step, lr=1e-3, rate=12.5, loss=0.5 if step % 10 == 0 else None)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{step}/100" for step in range(5, 101, 5)]
    assert lines[-1].startswith("step 100/100 · loss 0.5000 · lr 1.00e-03 · 12.5 samples/s · elapsed 0:00:00 · ETA 0:00:00")
    assert "\x1b" not in out.getvalue()  # no terminal control codes in a log file


def test_plain_lines_every_interval_of_seconds():
    out = io.StringIO()
    with _plain(out, every_s=0.0) as progress:
        for step in range(1, 4):
            progress.update(step, lr=0.0, rate=0.0)
    assert len(out.getvalue().splitlines()) == 3


def test_no_loss_is_shown_until_one_has_been_read():
    out = io.StringIO()
    with _plain(out, every_s=0.0) as progress:
        for step in range(1, 5):
            progress.update(step, lr=1e-3, rate=1.0, loss=0.25 if step == 3 else None)
    losses = [line.split(" · ")[1] for line in out.getvalue().splitlines()]
    assert losses == ["loss –", "loss –", "loss 0.2500", "loss 0.2500"]  # the last one read, never `nan`


def test_the_terminal_bar_shows_a_dash_before_the_first_loss():
    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, width=200)
    with TrainingProgress(10, 0, out=terminal) as progress:
        progress.update(1, lr=1e-3, rate=1.0)
        before = progress._bar.get_renderable()
        text = Console(file=io.StringIO(), width=200)
        with text.capture() as captured:
            text.print(before)
        assert "loss – · lr" in captured.get() and "nan" not in captured.get()
        progress.update(2, lr=1e-3, rate=1.0, loss=0.5)
        with text.capture() as captured:
            text.print(progress._bar.get_renderable())
        assert "loss 0.5000 · lr" in captured.get()


def test_a_piped_training_run_prints_progress_evaluations_and_the_summary(tmp_path, tiny_bert_nodropout_dir, data_dir):
    recipe = {
        "model": {"name_or_path": str(tiny_bert_nodropout_dir)},
        "task": {"name": "sst2"},
        "adapter": {"density": 0.1},
        "data": {"dir": str(data_dir), "max_length": 32, "max_train_samples": 40, "max_eval_samples": 16},
        "training": {"max_steps": 10, "batch_size": 4, "eval_every": 5, "log_every": 5},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = subprocess.run([sys.executable, "-m", "sparta_cli", "train", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    progress = [line for line in lines if line.startswith("step ") and "/10 · loss" in line]
    assert [line.split()[1] for line in progress] == [f"{step}/10" for step in range(1, 11)]  # every 5% of 10 steps
    assert any(line.startswith("step 5: eval_accuracy=") for line in lines)
    assert lines[-1].startswith("done in") and "samples/s" in lines[-1] and "tokens/s" in lines[-1]
    assert str(Path(tmp_path / "run")) in lines[-1]
    assert "━" not in result.stdout  # no bar
