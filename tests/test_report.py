"""`sparta report` on real MiniLM runs (two densities x two seeds, plus LoRA), and the sweep script's
bookkeeping (skip, resume, failures, foreign folders) with a stand-in launcher."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from typer.testing import CliRunner

from sparta_cli.cli import app
from sparta_cli.config import load_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import write_yaml
from sparta_cli.plots import write_training_loss_png
from sparta_cli.sweep import LORA_BASELINE, plan_sweep

RECIPE = str(REPO / "configs" / "quickstart.yaml")
TINY = ["data.max_train_samples=32", "data.max_eval_samples=32", "data.max_length=32", "training.max_steps=2",
        "training.batch_size=16", "training.log_every=1", "training.eval_every=1", "training.warmup_steps=0"]


def layout(root: Path) -> str:
    return f"output_dir={root}/${{name}}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, minilm_path) -> Path:
    """Five tiny real runs planned as the sweep plans them, and one that never finished."""
    root = tmp_path_factory.mktemp("sweep")
    overrides = [layout(root), f"data.dir={data_dir}", *TINY]
    planned = [args for _, args in plan_sweep(RECIPE, ["0.001", "0.05"], ["1", "2"], overrides)]
    planned.append([*overrides, *LORA_BASELINE, "seed=1"])
    for args in planned:
        result = CliRunner().invoke(app, ["train", RECIPE, *args])
        assert result.exit_code == 0, result.output
    unfinished = root / "sparta-d0.01-s1"
    unfinished.mkdir()
    shutil.copy(root / "sparta-d0.05-s1" / "config.yaml", unfinished / "config.yaml")
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(app, ["report", str(runs), "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_csv_matches_the_runs_own_results(runs, report):
    out, _ = report
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["method"], r["density"], r["n_seeds"]) for r in rows] == [("sparta", "0.001", "2"), ("sparta", "0.05", "2"), ("lora", "", "1")]
    for row in rows:
        setting = f"d{row['density']}" if row["method"] == "sparta" else "r8"
        dirs = [runs / f"{row['method']}-{setting}-s{seed}" for seed in row["seeds"].split()]
        accuracies = [json.loads((d / "all_results.json").read_text())["eval_accuracy"] for d in dirs]
        assert row["metric"] == "accuracy"
        assert float(row["mean"]) == pytest.approx(statistics.fmean(accuracies), abs=1e-12)
        assert (float(row["std"]) if row["std"] else None) == (pytest.approx(statistics.stdev(accuracies), abs=1e-12) if len(dirs) > 1 else None)
        trainable = json.loads((dirs[0] / "adapter_config.json").read_text())["trainable_params"]
        assert int(row["trainable_params"]) == trainable
    assert int(rows[0]["trainable_params"]) < int(rows[1]["trainable_params"])  # density 0.001 < 0.05


def test_unfinished_runs_are_listed(runs, report):
    out, output = report
    assert "sparta-d0.01-s1" in output and "unfinished" in output
    assert "sparta-d0.01-s1" in (out / "report.md").read_text()


@pytest.mark.parametrize("name", ["metric_vs_density.png", "loss_curves.png"])
def test_plots_are_real_pictures(report, name):
    from matplotlib.image import imread

    path = report[0] / name
    assert path.stat().st_size > 20_000
    pixels = imread(path)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.05  # not blank


def test_training_loss_png(runs, tmp_path):
    from matplotlib.image import imread

    run = tmp_path / "run"
    shutil.copytree(runs / "sparta-d0.05-s1", run)
    path = write_training_loss_png(run)
    assert path == run / "training_loss.png" and imread(path)[..., :3].std() > 0.05
    (run / "trainer_log.jsonl").unlink()
    (run / "training_loss.png").unlink()
    assert write_training_loss_png(run) is None and not (run / "training_loss.png").exists()


def test_report_with_nothing_finished_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    assert result.exit_code != 0 and "no finished runs" in str(result.exception)


# ---------------------------------------------------------------- the sweep script

FAKE_LAUNCHER = """#!/usr/bin/env bash
# stands in for `python`: records its arguments; the density-0.005 run fails, the others "finish"
echo "$*" >> "$SWEEP_CALLS"
[[ " $* " == *" adapter.density=0.005 "* ]] && { echo "error: boom"; exit 1; }
exit 0
"""


def sweep(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    launcher = tmp_path / "launcher"
    launcher.write_text(FAKE_LAUNCHER)
    launcher.chmod(0o755)
    env = {**os.environ, "LAUNCHER": str(launcher), "SWEEP_CALLS": str(tmp_path / "calls"), "PYTHON": sys.executable}
    command = ["bash", str(REPO / "scripts" / "sweep_density.sh"), *extra, RECIPE, "0.001 0.005 0.01", "7", "--", layout(tmp_path / "runs")]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)


def test_sweep_skips_finished_resumes_and_goes_on_after_a_failure(tmp_path):
    runs = tmp_path / "runs"
    finished, checkpointed = runs / "sparta-d0.001-s7", runs / "sparta-d0.01-s7"
    finished.mkdir(parents=True)
    (finished / "all_results.json").write_text("{}")
    (checkpointed / "checkpoint-3").mkdir(parents=True)
    result = sweep(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2  # 0.001 skipped; 0.005 failed; 0.01 resumed from its checkpoint
    assert calls[0].startswith(f"-m sparta_cli train {RECIPE} ")
    assert "adapter.density=0.005" in calls[0] and "--resume" not in calls[0]
    assert "adapter.density=0.01" in calls[1] and calls[1].endswith("--resume")
    assert "skip   " + str(finished) in result.stdout
    assert "failed: " + str(runs / "sparta-d0.005-s7") in result.stderr and "boom" in result.stderr
    assert "error: boom" in (runs / "sparta-d0.005-s7.log").read_text()


def test_sweep_resumes_unfinished_runs_without_checkpoints_and_refuses_other_recipes(tmp_path):
    runs = tmp_path / "runs"
    (runs / "sparta-d0.001-s7").mkdir(parents=True)
    (runs / "sparta-d0.001-s7" / "trainer_log.jsonl").write_text("")
    other = runs / "sparta-d0.005-s7"
    other.mkdir()
    theirs = load_recipe(RECIPE, [layout(runs), "adapter.density=0.005", "seed=7", "model.name_or_path=another/model"])
    write_yaml(other / "config.yaml", {**theirs.to_dict(), "run": {"world_size": 1}})
    (other / "all_results.json").write_text("{}")
    result = sweep(tmp_path, "--baselines")
    assert result.returncode == 1
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "adapter.density=0.001" in calls[0] and calls[0].endswith("--resume")  # train.py starts it over
    assert "adapter.method=lora adapter.targets=[q,v] adapter.r=8" in calls[2]
    assert "adapter.method=full training.lr=2e-05" in calls[3]
    assert "holds a run of another recipe (model.name_or_path differ)" in result.stderr
    assert (other / "all_results.json").read_text() == "{}"  # untouched


def test_sweep_refuses_runs_sharing_an_output_dir(tmp_path):
    with pytest.raises(SpartaError, match="share output_dir"):
        plan_sweep(RECIPE, ["0.001", "0.01"], [], [f"output_dir={tmp_path}/same"])


def test_parameter_axis_plot(runs, tmp_path):
    from matplotlib.image import imread

    result = CliRunner().invoke(app, ["report", f"{runs}/*", "--output", str(tmp_path), "--x", "trainable_params"])
    assert result.exit_code == 0, result.output
    assert imread(tmp_path / "metric_vs_trainable_params.png")[..., :3].std() > 0.05
