"""The run folder, one home for it: the names of what a run writes, the one reader of a run
(`Run`: eval, predict, merge, export, report and tune read runs through it), and its config.yaml.

A finished run folder holds config.yaml (the resolved recipe and how it ran), the adapter config
(adapter_config.json, or sparta_config.json for a run that is itself a transformers checkpoint:
transformers would read an adapter_config.json beside config.json as a PEFT adapter), the weights
(adapter_model.safetensors; PEFT's own files under peft/ for LoRA/DoRA; save_pretrained's files for
`full`), the logs and results, and the resumable checkpoints (checkpoint-N/). These names are a
format: run folders written by earlier versions must keep loading (tests/test_run_fixtures.py).
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparta_cli import __version__
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import parse_yaml, read_json, write_text, write_yaml
from sparta_cli.runs.layout import (  # the names and the adapter files as stored, for every caller here
    ADAPTER_FILE,
    ALL_RESULTS,
    BEST_FILE,
    CHAT_TEMPLATE_FILE,
    CHECKPOINT_CONFIG_FILE,
    CHECKPOINT_DIR,
    CHECKPOINT_FILE_PATTERNS,
    CONFIG_FILE,
    CONFIG_YAML,
    EVAL_RESULTS,
    EVAL_RESULTS_PREFIX,
    EVAL_RESULTS_SUFFIX,
    MASKS_FILE,
    OPTIMIZER_STATE,
    OPTIMIZER_TENSORS,
    PEFT_DIR,
    RECIPE_FILE,
    RUN_MARKERS,
    SCHEDULER_STATE,
    STATE_FILE,
    TENSORBOARD_DIR,
    TENSORS_FILE,
    TRAIN_RESULTS,
    TRAINED_PREFIX,
    TRAINER_LOG,
    TRAINING_LOSS_PNG,
    WANDB_DIR,
    causal_lm_architecture,
    checkpoint_dir_name,
    eval_results_name,
    has_checkpoints,
    read_adapter_config,
    read_adapter_tensors,
    rng_file,
    run_config_path,
    run_entry_patterns,
)

__all__ = [
    "ADAPTER_FILE", "ALL_RESULTS", "BEST_FILE", "CHAT_TEMPLATE_FILE", "CHECKPOINT_CONFIG_FILE", "CHECKPOINT_DIR",
    "CHECKPOINT_FILE_PATTERNS", "CONFIG_FILE", "CONFIG_YAML", "EVAL_RESULTS", "EVAL_RESULTS_PREFIX",
    "EVAL_RESULTS_SUFFIX", "MASKS_FILE", "OPTIMIZER_STATE", "OPTIMIZER_TENSORS", "PEFT_DIR", "RECIPE_FILE",
    "RUN_MARKERS", "Run", "SCHEDULER_STATE", "STATE_FILE", "TENSORBOARD_DIR", "TENSORS_FILE", "TRAINED_PREFIX",
    "TRAINER_LOG", "TRAINING_LOSS_PNG", "TRAIN_RESULTS", "WANDB_DIR", "causal_lm_architecture", "check_recorded_recipe",
    "checkpoint_dir_name", "eval_results_name", "has_checkpoints", "kept_chat_template", "kept_template_copy", "read_adapter_config",
    "read_adapter_tensors", "read_recipe_record", "read_run", "read_started_run", "rng_file", "run_config_path", "run_entry_patterns",
    "split_adapter_tensors", "truncate_log", "versions", "write_run_config",
]

if TYPE_CHECKING:
    import torch

    from sparta_cli.config import Recipe

def read_recipe_record(run_dir: Path) -> dict[str, Any] | None:
    """config.yaml as the run wrote it (the resolved recipe and its `run` record); None without one."""
    import yaml

    path = run_dir / CONFIG_YAML
    if not path.is_file():
        return None
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpartaError(f"{path} is not valid YAML ({str(exc).splitlines()[0]}): the file is damaged; rerun the run") from None
    required = ("model", "adapter", "task", "seed")  # what every recorded recipe holds, as written
    missing = list(required) if not isinstance(data, dict) else [key for key in required if key not in data]
    if missing:  # report, eval, predict and serve read it: the fix names no one command
        raise SpartaError(f"{path} has no {', '.join(f'`{key}`' for key in missing)}: it is not a sparta run's config.yaml, "
                          "or the file is damaged; give a sparta run directory, or rerun the run")
    return check_recorded_recipe(path, data, "the file is damaged; rerun the run")


def check_recorded_recipe(path: Path, data: dict[str, Any], damaged: str) -> dict[str, Any]:
    """`data`, a recipe as sparta recorded it (a run's config.yaml, a checkpoint's recipe.json), if what it
    holds has the shapes sparta writes (sections are mappings, the seed an integer, model.name_or_path
    text); else SpartaError naming `path`, then `damaged` (what that means, and the fix)."""
    for key in ("model", "adapter", "task", "data", "training", "logging", "seed"):
        kind = int if key == "seed" else dict
        value = data.get(key)
        if key in data and (not isinstance(value, kind) or isinstance(value, bool)):
            found = "null" if value is None else type(value).__name__
            raise SpartaError(f"{path}: `{key}` is {found}, not {'a mapping' if kind is dict else 'an integer'}: {damaged}")
    if "model" in data and not isinstance(data["model"].get("name_or_path"), str):
        raise SpartaError(f"{path}: model.name_or_path is not text: {damaged}")
    return data


def kept_template_copy(run_dir: Path, recorded: str | None) -> Path | None:
    """The copy of its task.chat_template (`recorded`) an SFT run kept (CHAT_TEMPLATE_FILE); None when it kept none."""
    kept = Path(run_dir) / CHAT_TEMPLATE_FILE
    return kept if recorded and kept.is_file() else None


def kept_chat_template(run_dir: Path, recorded: str | None) -> str | None:
    """The template file an SFT run trained with: the copy it kept, else, for a run from before runs kept
    one, its recorded task.chat_template (a relative path starts at the current folder)."""
    kept = kept_template_copy(run_dir, recorded)
    return str(kept) if kept else recorded


@dataclass(frozen=True)
class Run:
    """A run folder as sparta wrote it: the adapter config and weights of a finished run, and the
    recipe (config.yaml) and results (all_results.json) of any run that started."""

    path: Path
    config: dict[str, Any]  # the adapter config (adapter_config.json / sparta_config.json); {} before the run finished
    indices: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> sorted flat indices into its weight
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> fp32 deltas at those indices
    trained: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> value (the head; all of them for `full`)
    recipe: dict[str, Any] | None = None  # config.yaml, read for a run that may not have finished (read_started_run)
    results: dict[str, Any] | None = None  # all_results.json; None: not finished (failed, or still running)

    @property
    def method(self) -> str:
        return str(self.config["method"] if "method" in self.config else self.recipe["adapter"]["method"])

    @property
    def base(self) -> dict[str, Any]:
        """The base model the adapter config records (name_or_path, gguf_file, revision, model_type, ...)."""
        return self.config.get("base_model") or {}

    @property
    def causal_lm(self) -> bool:
        """An SFT run: a causal LM that writes answers (its base's recorded architecture), not a classifier."""
        return causal_lm_architecture([self.base.get("architecture") or ""])

    @property
    def base_name(self) -> str:
        gguf = self.base.get("gguf_file")
        return f"{self.base.get('name_or_path')}" + (f" ({gguf})" if gguf else "")

    @property
    def model(self) -> str:
        """The base model as the recipe names it."""
        return str(self.recipe["model"]["name_or_path"])

    @property
    def seed(self) -> int:
        return int(self.recipe["seed"])

    @property
    def trainable_params(self) -> int | None:
        count = self.config.get("trainable_params", ((self.recipe or {}).get("run") or {}).get("trainable_params"))
        return int(count) if count is not None else None


def split_adapter_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ...]:
    """adapter_model.safetensors' entries as (indices, fp32 deltas) by module and trained tensors by parameter name."""
    indices = {key.removesuffix(".indices"): value for key, value in tensors.items() if key.endswith(".indices")}
    deltas = {module: tensors[f"{module}.delta"].float() for module in indices}
    trained = {key.removeprefix(TRAINED_PREFIX): value for key, value in tensors.items() if key.startswith(TRAINED_PREFIX)}
    return indices, deltas, trained


def _optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def read_run(run_dir: str | Path, *, tensors: bool = True) -> Run:
    """A finished run (eval, predict, merge, export): its adapter config, checked, and with `tensors`
    its saved deltas and trained tensors (none for a run that keeps another library's format).
    Its recipe is not read: eval builds one from config.yaml (config.read_yaml says what is wrong with it)."""
    from sparta_cli.tuners import get_tuner  # the method reads and checks its own tensors (tuners/ import only names from here)

    run_dir = Path(run_dir)
    config = read_adapter_config(run_dir)
    weights = get_tuner(config["method"]).read_tensors(run_dir) if tensors else {}
    return Run(run_dir, config, *split_adapter_tensors(weights), results=_optional_json(run_dir / ALL_RESULTS))


def read_started_run(run_dir: str | Path) -> Run:
    """Any run that wrote its config.yaml (report, tune): finished or not; no weights read."""
    run_dir = Path(run_dir)
    recorded = run_config_path(run_dir)
    recipe = read_recipe_record(run_dir)
    if recipe is None:
        raise SpartaError(f"{run_dir} has no {CONFIG_YAML}: the run stopped before it started training (see its log)")
    return Run(run_dir, read_json(recorded) if recorded is not None else {}, recipe=recipe, results=_optional_json(run_dir / ALL_RESULTS))


# ---------------------------------------------------------------- writing config.yaml and the logs


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
    `drop` names; a line cut short by a kill is dropped too. A line that is not an object, or whose step
    is not a number, was not written by sparta: it stops the resume, named, rather than being lost."""
    if not path.is_file():
        return
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("step", 0) if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise SpartaError(f"{path} line {number} is not a training log record: the file is damaged; "
                              "delete that line, then resume again")
        if int(step) <= last_step and not drop(record):
            kept.append(line + "\n")
    write_text(path, "".join(kept))
