"""The shell scripts right after `scripts/setup.sh`: no activated virtualenv, so `python` and
`sparta` on PATH are not sparta's; the scripts must find the checkout's .venv themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

RECIPE = str(REPO / "configs" / "quickstart.yaml")


def bare_env(**extra: str) -> dict[str, str]:
    """The environment of a new shell after setup.sh: system PATH only, no venv activated, no $PYTHON."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "LAUNCHER")}
    return {**env, "PATH": "/usr/bin:/bin", **extra}


def tiny_run_overrides(model: Path, data_dir: Path) -> list[str]:
    return [f"model.name_or_path={model}", f"data.dir={data_dir}", "data.max_train_samples=16", "data.max_eval_samples=16",
            "data.max_length=32", "training.max_steps=1", "training.batch_size=8", "training.eval_every=null"]


def test_sweep_runs_without_an_activated_venv(tmp_path, tiny_bert_nodropout_dir, data_dir):
    out = tmp_path / "runs"
    command = ["bash", str(REPO / "scripts" / "sweep_density.sh"), RECIPE, "0.001 0.01", "--",
               *tiny_run_overrides(tiny_bert_nodropout_dir, data_dir), f"output_dir={out}/d${{adapter.density}}"]
    result = subprocess.run(command, capture_output=True, text=True, env=bare_env(), cwd=tmp_path, timeout=600, check=False)
    logs = "".join(p.read_text() for p in out.glob("*.log")) if out.exists() else ""
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "No module named" not in logs
    for density in ("0.001", "0.01"):
        assert json.loads((out / f"d{density}" / "all_results.json").read_text())["train_steps"] == 1


def test_scripts_without_sparta_anywhere_say_how_to_install(tmp_path):
    """A copy of the scripts with no .venv beside them, and no sparta on PATH: one line naming setup.sh."""
    scripts = tmp_path / "clone" / "scripts"
    shutil.copytree(REPO / "scripts", scripts)
    for name in ("sweep_density.sh", "compare_methods.sh", "glue_table.sh"):
        args = {"sweep_density.sh": [RECIPE, "0.01"], "compare_methods.sh": [RECIPE], "glue_table.sh": [str(tmp_path)]}[name]
        result = subprocess.run(["bash", str(scripts / name), *args], capture_output=True, text=True,
                                env=bare_env(SPARTA_DATA_DIR=str(tmp_path)), cwd=tmp_path, timeout=60, check=False)
        assert result.returncode == 2, (name, result.stderr)
        assert "no Python with sparta installed" in result.stderr and "scripts/setup.sh" in result.stderr, (name, result.stderr)


def test_glue_table_prints_its_table_without_an_activated_venv(tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts" / "glue_table.sh"), str(tmp_path)], capture_output=True, text=True,
                            env=bare_env(TABLE_ONLY="1", SPARTA_DATA_DIR=str(tmp_path)), cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "| sst2 | not run |" in result.stdout


def test_setup_says_what_it_is_doing(tmp_path):
    """setup.sh keeps pip quiet but prints a line per step (it was silent for 85 s). A stand-in
    .venv/bin/python records the pip calls instead of installing anything."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "scripts", clone / "scripts")
    fake = clone / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/pip_calls\n')
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(clone / "scripts" / "setup.sh"), "--dev"], capture_output=True, text=True,
                            env=bare_env(), cwd=tmp_path, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("[setup ")]
    calls = (tmp_path / "pip_calls").read_text().splitlines()
    assert len(calls) == 4 and all(" -q " in call for call in calls)  # torch, sparta, the models, peft-sparta
    assert len(steps) == 6, result.stdout  # the venv, four installs, done
    assert "torch" in steps[1] and "extras" in steps[2] and "models" in steps[3] and "done" in steps[5]
    cpu = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"  # the README's CPU-only install: two pip arguments
    subprocess.run(["bash", str(clone / "scripts" / "setup.sh")], capture_output=True, env=bare_env(TORCH_SPEC=cpu), cwd=tmp_path,
                   timeout=60, check=True)
    assert (tmp_path / "pip_calls").read_text().splitlines()[4].endswith(" -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")


def test_every_shipped_recipe_is_valid(data_dir, monkeypatch):
    """configs/*.yaml pass `sparta validate` (model folder, data files, targets; a Hub model's recipe,
    which needs the internet, is parsed only) and a tune recipe's study plans, so a recipe the README
    or BENCHMARKS.md names never fails on its first line."""
    from typer.testing import CliRunner

    from sparta_cli.cli import app
    from sparta_cli.config import load_recipe
    from sparta_cli.tune.settings import plan_study

    monkeypatch.setenv("SPARTA_DATA_DIR", str(data_dir))
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        if not load_recipe(recipe, []).model.name_or_path.startswith("pkg:"):
            continue  # from the Hub
        result = CliRunner().invoke(app, ["validate", str(recipe)])
        assert result.exit_code == 0, (recipe.name, result.output, result.exception)
        if "tune:" in recipe.read_text():
            plan, _ = plan_study(recipe, [])
            assert plan.trials >= 20 and plan.metric, recipe.name


def _paper_table():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_table", REPO / "scripts" / "paper_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_paper_table_widens_a_sweep_whose_best_rate_sits_at_an_edge(tmp_path):
    """The table's chosen rates must be bracketed: a best at an edge adds a half-decade beyond it (twice at most),
    read from the checked-in records alone (no run folder needed)."""
    table = _paper_table()
    out, record = tmp_path / "runs", tmp_path / "record"
    method = table.Method("lora", [], (1e-4, 1e-3, 1e-2), seeds=1)

    def finish(lr: float, accuracy: float) -> None:
        path = table.record_path(record, table.sweep_run(method, "rte", out, lr, 1), out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"all_results": {"eval_accuracy": accuracy}}))

    assert table.widened(method, "rte", out, record) is None  # nothing has run
    finish(1e-4, 0.5)
    finish(1e-3, 0.6)
    assert table.widened(method, "rte", out, record) is None  # the sweep is unfinished
    finish(1e-2, 0.7)
    assert abs(table.widened(method, "rte", out, record) - 1e-2 * 10 ** 0.5) < 1e-12
    method.rates = (*method.rates, 1e-2 * 10 ** 0.5)
    finish(method.rates[-1], 0.65)
    assert table.widened(method, "rte", out, record) is None  # bracketed now
    assert table.best_rate(method, "rte", out, record) == 1e-2
    method.rates = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    finish(1e-5, 0.9)
    finish(1e-1, 0.1)
    assert table.widened(method, "rte", out, record) is None  # two widenings already: stop


def test_paper_table_takes_smollm2s_rate_from_minilms_finished_sweeps(tmp_path):
    """SmolLM2's one rate per method is its `auto` rate times the factor MiniLM's sweeps chose over theirs
    (geometric mean over the tasks), and only once every one of those sweeps is bracketed: the factor, and
    the run folder its rate names, must not move between restarts of the driver."""
    table = _paper_table()
    out, record = tmp_path / "runs", tmp_path / "record"
    grid = (1e-3 / 10 ** 0.5, 1e-3, 1e-3 * 10 ** 0.5)
    plans = [(task, None, [], [table.Method("lora", [], grid, seeds=1)], "MiniLM") for task in ("rte", "mrpc")]

    def finish(task: str, lr: float, score: float) -> None:
        path = table.record_path(record, table.sweep_run(plans[0][3][0], task, out, lr, 1), out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"all_results": {"eval_accuracy": score, "eval_combined_score": score}}))

    for lr, score in zip(grid, (0.5, 0.7, 0.6)):
        finish("rte", lr, score)  # RTE chose the centre
    assert table.lesson("lora", plans, out, record) is None  # MRPC's sweep has not run
    for lr, score in zip(grid, (0.5, 0.6, 0.7)):
        finish("mrpc", lr, score)  # MRPC's best sits at the top edge: a widening must run first
    assert table.lesson("lora", plans, out, record) is None
    finish("mrpc", grid[-1] * 10 ** 0.5, 0.65)  # bracketed: MRPC chose half a decade above the centre
    assert abs(table.lesson("lora", plans, out, record) - 10 ** 0.25) < 1e-12  # sqrt(1 x 10^0.5)
    assert table.lesson("sparta-x1", plans, out, record) is None  # a method MiniLM did not sweep


def test_paper_table_lists_sparta_optima_with_their_run_lengths_for_the_refit(tmp_path):
    """The refit of `auto` takes each finished SpaRTA sweep's (density, optimizer steps, chosen rate), read
    from the records alone; LoRA's sweeps and unfinished ones are not points."""
    table = _paper_table()
    out, record = tmp_path / "runs", tmp_path / "record"
    plans = []
    for task, steps in (("rte", 213), ("mrpc", 312)):
        methods = [table.sparta_method(m, 0.04, 3, 1) for m in (1.0, 4.0)] + [table.Method("lora", [], (1e-3, 3e-3, 1e-2), 1)]
        plans.append((task, None, [], methods, "MiniLM"))
        for method in methods[:2] + ([methods[2]] if task == "rte" else []):
            for lr, score in zip(method.rates, (0.5, 0.7, 0.6)):  # each sweep chooses its centre
                path = table.record_path(record, table.sweep_run(method, task, out, lr, 1), out)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"all_results": {"eval_accuracy": score, "eval_combined_score": score, "train_steps": steps}}))
    points = table.sparta_optima(plans, out, record)
    assert [(t, m, round(d, 6), s) for t, m, d, s, _ in points] == [
        ("rte", "sparta-x1", 0.04, 213), ("rte", "sparta-x4", 0.16, 213), ("mrpc", "sparta-x1", 0.04, 312), ("mrpc", "sparta-x4", 0.16, 312)]
    assert all(lr == table.rates("sparta", d, 1)[0] for _, _, d, _, lr in points)
    # rates at the 63-step rule whatever the length: the fit finds the rule's exponent and no length term
    c, a, b = table.fit_length_rule([(d, s, lr) for _, _, d, s, lr in points])
    assert (c, a, abs(b)) == pytest.approx((2.5e-3, 0.6, 0.0), abs=1e-9)
    assert "fit over 4 sweeps: lr* = 0.0025 * density^-0.60" in "\n".join(table.rate_fit(points))
    assert "no fit yet: 3 sweeps finished" in "\n".join(table.rate_fit(points[:3]))  # it would pass through them exactly
