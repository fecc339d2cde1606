"""Model selection on held-out training rows: the split, the best step's adapter, early stopping,
the test_ scores, and the evaluation callback `sparta tune` builds on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparta_cli.cli import app
from sparta_cli.config import build_recipe
from sparta_cli.data import validation_indices
from sparta_cli.errors import SpartaError
from sparta_cli.train import train


def _recipe(model_dir: Path, data_dir: Path, out: Path, **training):
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"density": 0.1, "targets": ["v", "o"]},
        "task": {"name": "sst2"},
        "data": {"dir": str(data_dir), "max_length": 32, "max_train_samples": 96, "max_eval_samples": 64, "validation_size": 32},
        "training": {"max_steps": 24, "batch_size": 8, "lr": 0.05, "scheduler": "constant", "eval_every": 4, "log_every": 4,
                     "best_metric": "loss", **training},
        "seed": 3,
        "output_dir": str(out),
    }
    return build_recipe(raw)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]


def test_validation_rows_are_deterministic_disjoint_and_sized():
    train_rows, held = validation_indices(100, 0.2, seed=5)
    assert len(held) == 20 and len(train_rows) == 80
    assert set(train_rows).isdisjoint(held) and set(train_rows) | set(held) == set(range(100))
    assert validation_indices(100, 0.2, seed=5) == (train_rows, held)
    assert validation_indices(100, 0.2, seed=6)[1] != held
    assert len(validation_indices(100, 7, seed=5)[1]) == 7
    with pytest.raises(SpartaError, match="validation_size"):
        validation_indices(10, 10, seed=0)


def test_selection_keys_need_a_validation_set(tmp_path):
    raw = {"model": {"name_or_path": "x"}, "task": {"name": "sst2"}, "training": {"early_stopping_patience": 2, "eval_every": 5}}
    with pytest.raises(SpartaError, match="data.validation_size"):
        build_recipe(raw)
    with pytest.raises(SpartaError, match="whole number"):
        build_recipe({**raw, "training": {}, "data": {"validation_size": 2.5}})


def test_the_best_step_is_kept_scored_on_test_and_stops_early(tmp_path, tiny_bert_nodropout_dir, data_dir):
    # measured (seed 3): held-out loss 0.709, 0.691, 0.678, 0.677 (step 16), 0.686 (step 20): patience 1 stops at 20
    run = train(_recipe(tiny_bert_nodropout_dir, data_dir, tmp_path / "selected", early_stopping_patience=1))
    results = json.loads((run / "all_results.json").read_text())
    evaluations = [r for r in _log(run) if "eval_loss" in r]
    best = min(evaluations, key=lambda r: r["eval_loss"])
    assert results["best_step"] == best["step"] < evaluations[-1]["step"], "the case must have a better earlier step"
    assert results["eval_loss"] == best["eval_loss"] and results["eval_num_examples"] == 32
    assert results["train_steps"] == evaluations[-1]["step"] < 24, "early stopping did not stop"
    assert evaluations[-1]["step"] - best["step"] == 4  # patience 1: one evaluation without improvement
    assert {"test_accuracy", "test_loss"} <= set(results) and results["test_num_examples"] == 64
    for metric, key in (("test_accuracy", "test_accuracy"), ("accuracy", "eval_accuracy")):  # report plots either
        report = CliRunner().invoke(app, ["report", str(run), "--metric", metric, "--output", str(tmp_path / metric)])
        assert report.exit_code == 0, report.output
        row = next(csv.DictReader((tmp_path / metric / "report.csv").open()))
        assert row["metric"] == metric and float(row["mean"]) == pytest.approx(results[key], abs=1e-12)

    # stopped after the checkpoint of the best step (a callback raising at the next evaluation), a
    # resumed run restores the best tensors and the count of evaluations since, and ends the same
    def stop_at_20(step: int, metrics: dict[str, float]) -> None:
        if step == 20:
            raise KeyboardInterrupt

    stopped = _recipe(tiny_bert_nodropout_dir, data_dir, tmp_path / "stopped", early_stopping_patience=1, save_every=4)
    with pytest.raises(KeyboardInterrupt):
        train(stopped, on_evaluate=stop_at_20)
    resumed = json.loads((train(stopped, resume=True) / "all_results.json").read_text())
    assert {k: v for k, v in resumed.items() if not k.startswith("train_")} == {k: v for k, v in results.items() if not k.startswith("train_")}
    assert [r["step"] for r in _log(tmp_path / "stopped") if "eval_loss" in r] == [r["step"] for r in evaluations]

    # the saved adapter is the best step's: the same recipe trained to exactly that step (constant lr, no
    # dropout, same held-out rows and data order) scores the same on the evaluation split
    short = train(_recipe(tiny_bert_nodropout_dir, data_dir, tmp_path / "short", max_steps=best["step"], eval_every=None,
                          best_metric=None))
    reference = json.loads((short / "all_results.json").read_text())
    assert reference["best_step"] == best["step"]
    assert results["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-6)
    assert results["test_accuracy"] == reference["test_accuracy"]


def test_a_raising_callback_stops_the_run_and_propagates(tmp_path, tiny_bert_nodropout_dir, data_dir):
    class Pruned(Exception):
        pass

    seen = []

    def on_evaluate(step: int, metrics: dict[str, float]) -> None:
        seen.append((step, sorted(metrics)))
        raise Pruned("stop here")

    out = tmp_path / "pruned"
    with pytest.raises(Pruned, match="stop here"):
        train(_recipe(tiny_bert_nodropout_dir, data_dir, out), on_evaluate=on_evaluate)
    assert seen == [(4, ["eval_accuracy", "eval_loss", "eval_num_examples"])]
    assert not (out / "all_results.json").exists()
    assert max(r["step"] for r in _log(out)) == 4, "training went on after the callback raised"


def test_an_early_stop_between_log_steps_still_logs_its_last_losses(tmp_path, tiny_bert_nodropout_dir, data_dir):
    # the same run as above stops at step 20 (patience 1); with log_every 3 step 20 is no log step
    run = train(_recipe(tiny_bert_nodropout_dir, data_dir, tmp_path / "run", early_stopping_patience=1, log_every=3))
    assert [r["step"] for r in _log(run) if "loss" in r] == [3, 6, 9, 12, 15, 18, 20]
