"""`sparta report` on real MiniLM runs (two densities x two seeds, plus LoRA), and the sweep script's
bookkeeping (skip, resume, failures, foreign folders) with a stand-in launcher."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from typer.testing import CliRunner

from sparta_cli.cli import app
from sparta_cli.config import load_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import write_yaml
from sparta_cli.plots import read_loss_log, write_training_loss_png
from sparta_cli.report import write_report
from sparta_cli.sweep import LORA_BASELINE, plan_sweep, run_action

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


def test_a_sweep_resumes_a_run_written_before_a_recipe_key_existed(tmp_path):
    # The paper table's seed-2 runs, started before data.packing existed, were refused as "another
    # recipe" on restart: a key the old config.yaml lacks held its default there.
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path / 'run'}", "seed=2"])
    old = recipe.to_dict()
    del old["data"]["packing"], old["task"]["generation_metrics"]
    (tmp_path / "run").mkdir()
    write_yaml(tmp_path / "run" / "config.yaml", {**old, "run": {"world_size": 1}})
    assert run_action(recipe) == "resume"
    old["data"]["max_length"] = 7
    write_yaml(tmp_path / "run" / "config.yaml", old)
    assert run_action(recipe).startswith("conflict:") and "(data.max_length differ)" in run_action(recipe)


def test_a_sweep_never_resumes_into_a_folder_of_the_users_files(tmp_path):
    """A non-empty folder without config.yaml was "resume": `train --resume` then wrote a run among the files."""
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert run_action(recipe) == f"conflict:{tmp_path / 'run'} holds files no sparta run writes (notes.txt): set output_dir elsewhere or move them"
    (tmp_path / "run" / "notes.txt").unlink()
    (tmp_path / "run" / "trainer_log.jsonl").write_text("")  # a run killed before its config.yaml: started over
    assert run_action(recipe) == "resume"


def test_sweep_refuses_runs_sharing_an_output_dir(tmp_path):
    with pytest.raises(SpartaError, match="share output_dir"):
        plan_sweep(RECIPE, ["0.001", "0.01"], [], [f"output_dir={tmp_path}/same"])


def test_parameter_axis_plot(runs, tmp_path):
    from matplotlib.image import imread

    result = CliRunner().invoke(app, ["report", f"{runs}/*", "--output", str(tmp_path), "--x", "trainable_params"])
    assert result.exit_code == 0, result.output
    assert imread(tmp_path / "metric_vs_trainable_params.png")[..., :3].std() > 0.05


# ---------------------------------------------------------------- grouping (runs written by hand: no training)


def fake_run(root: Path, name: str, overrides: list[str], accuracy: float) -> Path:
    """A finished run folder as `sparta train` leaves it: config.yaml, all_results.json, a loss log."""
    folder = root / name
    folder.mkdir(parents=True)
    recipe = load_recipe(RECIPE, [*overrides, f"output_dir={folder}"])
    write_yaml(folder / "config.yaml", {**recipe.to_dict(), "run": {"world_size": 1, "trainable_params": 1000}})
    (folder / "all_results.json").write_text(json.dumps({"eval_accuracy": accuracy, "eval_loss": 0.5, "train_loss": 0.6}))
    (folder / "trainer_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    return folder


def run_report(tmp_path: Path, *args: str, monkeypatch=None) -> tuple[list[dict[str, str]], str]:
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out"), *args])
    assert result.exit_code == 0, result.output
    return list(csv.DictReader((tmp_path / "out" / "report.csv").open())), result.output


def test_runs_that_differ_in_more_than_the_seed_are_never_averaged(tmp_path):
    runs = tmp_path / "runs"
    for seed, acc in ((1, 0.8), (2, 0.82)):
        fake_run(runs, f"long-s{seed}", [f"seed={seed}", "training.max_steps=125"], acc)
        fake_run(runs, f"short-s{seed}", [f"seed={seed}", "training.max_steps=20"], acc - 0.2)
    rows, output = run_report(tmp_path)
    assert [(r["settings"], r["seeds"], r["mean"]) for r in rows] == [
        ("training.max_steps=125", "1 2", repr(statistics.fmean([0.8, 0.82]))),
        ("training.max_steps=20", "1 2", repr(statistics.fmean([0.6, 0.62]))),
    ]
    assert "settings that differ between rows: training.max_steps" in output
    assert "SpaRTA · max_steps=20" in output


def test_every_differing_setting_is_named(tmp_path):
    changes = ["training.max_steps=20", "training.lr=0.01", "data.max_length=32", "training.batch_size=8", "training.warmup_steps=0",
               "data.max_train_samples=100"]
    fake_run(tmp_path / "runs", "base", [], 0.8)
    fake_run(tmp_path / "runs", "changed", changes, 0.7)
    rows, output = run_report(tmp_path)
    named = output.split("settings that differ between rows: ")[1].splitlines()[0]
    assert named.split(", ") == sorted(change.split("=")[0] for change in changes)
    assert len(rows) == 2


def test_runs_with_one_seed_are_not_a_mean_and_std(tmp_path):
    for i in range(7):
        fake_run(tmp_path / "runs", f"again-{i}", [], 0.7 + i / 100)
    rows, output = run_report(tmp_path)
    assert len(rows) == 7 and all(r["seeds"] == "42" and r["std"] == "" and r["n_seeds"] == "1" for r in rows)
    assert sorted(float(r["mean"]) for r in rows) == pytest.approx([0.7 + i / 100 for i in range(7)])
    assert "7 runs share every setting and seed 42" in output and "without ±" in output


def test_task_names_are_case_insensitive(tmp_path):
    fake_run(tmp_path / "runs", "upper", ["task.name=SST2", "seed=1"], 0.8)
    fake_run(tmp_path / "runs", "lower", ["task.name=sst2", "seed=2"], 0.9)
    rows, output = run_report(tmp_path)
    assert [(r["task"], r["seeds"]) for r in rows] == [("sst2", "1 2")]
    assert "differ" not in output


def test_loss_curves_are_labelled_by_their_settings(tmp_path, monkeypatch):
    import sparta_cli.plots

    drawn: list[str] = []
    monkeypatch.setattr(sparta_cli.plots, "loss_curves_png", lambda runs, path: drawn.extend(label for label, _ in runs))
    fake_run(tmp_path / "runs", "folder-a", ["seed=1", "training.lr=0.01"], 0.8)
    fake_run(tmp_path / "runs", "folder-b", ["seed=2", "training.lr=0.002", "adapter.density=0.001"], 0.8)
    fake_run(tmp_path / "runs", "folder-c", ["seed=3", "adapter.method=lora", "adapter.r=4", "training.lr=0.002"], 0.8)
    run_report(tmp_path)
    assert sorted(drawn) == ["LoRA r=4 · lr=0.002 · seed 3", "SpaRTA · lr=0.002 d=0.001 · seed 2", "SpaRTA · lr=0.01 d=0.05 · seed 1"]


def test_a_metric_no_finished_run_has_names_the_ones_they_have(tmp_path):
    fake_run(tmp_path / "runs", "a", [], 0.8)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out"), "--metric", "f1"])
    assert result.exit_code != 0
    message = str(result.exception)
    assert "none of the 1 finished runs" in message and "has metric f1" in message and "they have accuracy, loss" in message
    assert "unfinished" not in message


def test_a_rerun_replaces_its_own_report_but_never_a_users_files(tmp_path):
    fake_run(tmp_path / "runs", "a", [], 0.8)
    run_report(tmp_path)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    fake_run(tmp_path / "runs", "b", ["seed=7"], 0.9)
    rows, _ = run_report(tmp_path)  # the earlier report is replaced; the user's file next to it stays
    assert rows[0]["seeds"] == "7 42" and (tmp_path / "out" / "notes.txt").read_text() == "mine"

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.md").write_text("# my own report\n")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--output", str(theirs)])
    message = str(result.exception)  # main() turns a SpartaError into one line and exit 2
    assert isinstance(result.exception, SpartaError) and result.exception.exit_code == 2
    assert "already holds report.md, not written by an earlier `sparta report`" in message
    assert (theirs / "report.md").read_text() == "# my own report\n" and sorted(p.name for p in theirs.iterdir()) == ["report.md"]

    (tmp_path / "out" / "report.csv").unlink()
    (tmp_path / "out" / "report.csv").symlink_to(tmp_path / "elsewhere.csv")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out")])
    assert isinstance(result.exception, SpartaError) and "already holds report.csv" in str(result.exception)
    assert not (tmp_path / "elsewhere.csv").exists()


def test_a_report_that_fails_midway_never_blocks_its_rerun(tmp_path, monkeypatch):
    """A failure after the first picture was written refused the rerun: the folder held a PNG but no report.md."""
    import sparta_cli.plots

    def fails(runs, path):
        raise SpartaError("the loss curves failed")

    fake_run(tmp_path / "runs", "a", [], 0.8)
    monkeypatch.setattr(sparta_cli.plots, "loss_curves_png", fails)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out")])
    assert isinstance(result.exception, SpartaError) and "the loss curves failed" in str(result.exception)
    monkeypatch.undo()
    rows, _ = run_report(tmp_path)
    assert len(rows) == 1 and (tmp_path / "out" / "loss_curves.png").is_file()


@pytest.mark.parametrize("line", [b'{"loss": 0.5}', b"5", b"null", b'{"step": "x", "loss": 0.5}', b'{"step": 4, "loss": "x"}', b"\xff"])
def test_a_damaged_line_of_the_loss_log_is_skipped(tmp_path, line):
    """The loss curve is a picture: a damaged line of trainer_log.jsonl (a KeyError, TypeError or
    UnicodeDecodeError before) must not stop the report."""
    folder = fake_run(tmp_path / "runs", "a", [], 0.8)
    with open(folder / "trainer_log.jsonl", "ab") as log:
        log.write(line + b"\n")
    log = read_loss_log(folder)
    assert (log.steps, log.loss) == ([1, 2, 3], [1.0, 0.5, 1.0 / 3])
    rows, _ = run_report(tmp_path)
    assert len(rows) == 1


def test_a_run_whose_metric_is_nan_is_left_out_saying_why(tmp_path):
    """sparta writes NaN for a correlation of constant predictions; the report crashed on it (statistics' AttributeError)."""
    fake_run(tmp_path / "runs", "fine-s1", ["seed=1"], 0.8)
    fake_run(tmp_path / "runs", "flat-s2", ["seed=2"], float("nan"))
    rows, output = run_report(tmp_path)
    assert [(r["seeds"], r["mean"]) for r in rows] == [("1", "0.8")]
    assert "flat-s2" in output and "is nan" in output


def test_the_sweep_says_one_line_for_a_bad_rate_and_a_damaged_run_folder(tmp_path, capsys):
    from sparta_cli.sweep import main

    assert main(["--full-lr", "abc", str(RECIPE), "0.01"]) == 2
    assert "--full-lr abc: give full fine-tuning's learning rate as a number" in capsys.readouterr().err
    (resolved, _), = plan_sweep(str(RECIPE), ["0.01"], [], [layout(tmp_path / "runs")], False, 5e-5)
    damaged = Path(resolved.output_dir)
    damaged.mkdir(parents=True)
    (damaged / "config.yaml").write_text("model: [\n")
    assert main([str(RECIPE), "0.01", "--", layout(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.yaml" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("edit, phrase", [
    (lambda d: d.update(task="sst2"), "`task` is str, not a mapping: the file is damaged"),
    (lambda d: d.update(model=None), "`model` is null, not a mapping: the file is damaged"),
    (lambda d: d.update(seed="one"), "`seed` is str, not an integer: the file is damaged"),
    (lambda d: d["model"].pop("name_or_path"), "model.name_or_path is not text: the file is damaged"),
    (lambda d: d["task"].pop("name"), "cannot tell the main metric of .*task needs `name`.*: pass --metric"),
    (lambda d: d["task"].update(name="nosuchtask"), "cannot tell the main metric of .*nosuchtask.*: pass --metric"),
])
def test_a_damaged_config_yaml_is_one_line_naming_the_file(tmp_path, edit, phrase):
    """Each of these ended in a KeyError, AttributeError or TypeError (the last-resort error, with no fix)."""
    folder = fake_run(tmp_path / "runs", "run-s1", ["seed=1"], 0.8)
    recorded = yaml.safe_load((folder / "config.yaml").read_text())
    edit(recorded)
    write_yaml(folder / "config.yaml", recorded)
    with pytest.raises(SpartaError) as raised:  # the CLI prints a SpartaError as one line, exit 2
        write_report([str(tmp_path / "runs")], tmp_path / "out")
    assert re.search(phrase, str(raised.value)) and "\n" not in str(raised.value), raised.value
    assert not (tmp_path / "out").exists()
