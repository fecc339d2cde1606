"""Trackers through Accelerate: off by default; TensorBoard event files readable offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, import_or_require
from typer.testing import CliRunner

from sparta_cli.cli import app
from sparta_cli.config import build_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.trackers import TENSORBOARD_DIR, accelerator_kwargs, flat_config, log_record, start_trackers

import_or_require("tensorboard", allow_module_level=True)


def recipe(*overrides: str):
    return build_recipe({"model": {"name_or_path": "tiny"}, "task": {"name": "sst2"}}, list(overrides))


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of `tag` from the run's TensorBoard event files, read without a server."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = []
    for events in sorted((run_dir / TENSORBOARD_DIR).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            found += [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return found


def test_trackers_are_off_by_default(tmp_path):
    assert accelerator_kwargs(recipe(), tmp_path) == {}


def test_a_missing_tracker_package_is_named(tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(SpartaError, match="pip install wandb, or set logging.wandb=false"):
        accelerator_kwargs(recipe("logging.wandb=true"), tmp_path)


def test_tensorboard_records_are_readable_offline(tmp_path):
    from accelerate import Accelerator

    chosen = recipe("logging.tensorboard=true")
    accelerator = Accelerator(**accelerator_kwargs(chosen, tmp_path))
    start_trackers(accelerator, chosen, tmp_path)
    for step in (1, 2, 3):
        log_record(accelerator, {"step": step, "loss": 1.0 / step, "lr": 0.1})
    log_record(accelerator, {"step": 3, "eval_accuracy": 0.75})
    accelerator.end_training()
    assert [s for s, _ in scalars(tmp_path, "loss")] == [1, 2, 3]
    assert [v for _, v in scalars(tmp_path, "loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert scalars(tmp_path, "eval_accuracy") == [(3, 0.75)]
    assert not scalars(tmp_path, "step")


def test_flat_config_holds_only_scalars():
    flat = flat_config(recipe().to_dict())
    assert flat["adapter.density"] == 0.01 and flat["adapter.targets"] == "['v', 'o']" and flat["model.gguf_file"] == "None"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_training_with_tensorboard_writes_its_losses(tmp_path, data_dir, minilm_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(REPO / "configs" / "quickstart.yaml"), f"output_dir={out}", f"data.dir={data_dir}",
                                      "data.max_train_samples=32", "data.max_eval_samples=32", "data.max_length=32",
                                      "training.max_steps=2", "training.batch_size=16", "training.log_every=1",
                                      "training.eval_every=null", "logging.tensorboard=true"])
    assert result.exit_code == 0, result.output
    assert [s for s, _ in scalars(out, "loss")] == [1, 2]
    assert [s for s, _ in scalars(out, "eval_accuracy")] == [2]
