"""Experiment trackers (TensorBoard, Weights & Biases) through Accelerate; off unless the recipe's
`logging:` section turns them on.

The training loop passes `accelerator_kwargs(...)` to `Accelerator(...)`, calls `start_trackers`
once the run directory is ready, sends each trainer_log record through `log_record`, and
`accelerator.end_training()` closes the trackers. TensorBoard writes under run_dir/tensorboard/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparta_cli.config import Recipe
from sparta_cli.errors import SpartaError
from sparta_cli.runs import TENSORBOARD_DIR

PROJECT = "sparta"


def enabled_trackers(recipe: Recipe) -> list[str]:
    """Accelerate's names of the trackers the recipe turns on, checked to be installed."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    wanted = [("tensorboard", recipe.logging.tensorboard, is_tensorboard_available, "tensorboard"),
              ("wandb", recipe.logging.wandb, is_wandb_available, "wandb")]
    for name, on, available, package in wanted:
        if on and not available():
            raise SpartaError(f"logging.{name} is on but {package} is not installed: pip install {package}, or set logging.{name}=false")
    return [name for name, on, _, _ in wanted if on]


def accelerator_kwargs(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """`log_with` and `project_config` for `Accelerator(...)`; empty when no tracker is on."""
    from accelerate.utils import ProjectConfiguration

    trackers = enabled_trackers(recipe)
    if not trackers:
        return {}
    return {"log_with": trackers,
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / TENSORBOARD_DIR))}


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The recipe as `adapter.density: 0.01` pairs: trackers' hyperparameter tables take only scalars."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def start_trackers(accelerator, recipe: Recipe, run_dir: Path) -> None:
    """Open the trackers (main process only) with the recipe as the run's hyperparameters."""
    if not accelerator.log_with:
        return
    init_kwargs = {"wandb": {"name": Path(run_dir).name, "dir": str(run_dir), "group": recipe.task.label}}
    accelerator.init_trackers(PROJECT, config=flat_config(recipe.to_dict()), init_kwargs=init_kwargs)


def log_record(accelerator, record: dict[str, Any]) -> None:
    """A trainer_log record (`step` plus numbers) as one tracker step."""
    if accelerator.log_with:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
