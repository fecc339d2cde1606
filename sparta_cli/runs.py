"""The run directory: what a run writes, and the checks before anything is written."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparta_cli import __version__
from sparta_cli.config import Recipe
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import sweep_leftovers, write_text, write_yaml
from sparta_cli.outputs import check_clearable_run_dir, check_not_locked, clear_run_dir, lock_run_dir, run_dir_is_empty

CONFIG_YAML = "config.yaml"
TRAINER_LOG = "trainer_log.jsonl"
TRAIN_RESULTS = "train_results.json"
EVAL_RESULTS = "eval_results.json"
ALL_RESULTS = "all_results.json"


def check_output_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty folder unless told to (`--overwrite`, `--resume`), a folder `--overwrite`
    may not clear, and one another process is training in; changes nothing, so it runs before the
    (slow) model load."""
    if path.exists() and not path.is_dir():
        raise SpartaError(f"output_dir {path} is a file: choose a folder name")
    check_not_locked(path)
    if resume or run_dir_is_empty(path):
        return
    if overwrite:
        check_clearable_run_dir(path)
        return
    has_checkpoints = any(path.glob("checkpoint-*"))
    extra = " or --resume to continue its checkpoints" if has_checkpoints else ""
    raise SpartaError(f"output_dir {path} is not empty: pass --overwrite to replace it{extra}, or set output_dir=...")


def prepare_output_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    """Create the folder and hold its lock for this process; sweep what killed writers left;
    with `--overwrite`, remove what the previous run wrote (and nothing else)."""
    check_output_dir(path, overwrite=overwrite, resume=resume)
    lock_run_dir(path)
    sweep_leftovers(path)
    if overwrite:
        clear_run_dir(path)


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    return {
        "sparta": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "accelerate": str(accelerate.__version__),
    }


def write_run_config(run_dir: Path, recipe: Recipe, extra: dict[str, Any]) -> None:
    """config.yaml: the resolved recipe plus everything needed to rerun it."""
    data = recipe.to_dict()
    data["run"] = {"command": " ".join(sys.argv), "versions": versions(), **extra}
    write_yaml(run_dir / CONFIG_YAML, data)


def truncate_log(path: Path, last_step: int, drop: Callable[[dict[str, Any]], bool] = lambda record: False) -> None:
    """Keep only log records up to `last_step` (a resumed run logs later steps again), less those
    `drop` names; a line cut short by a kill is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if int(record.get("step", 0)) <= last_step and not drop(record):
            kept.append(line + "\n")
    write_text(path, "".join(kept))
