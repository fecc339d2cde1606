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
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparta_cli import FORMAT_VERSION, __version__
from sparta_cli.adapter_checks import check_adapter_config, check_adapter_tensors
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import parse_yaml, read_json, write_text, write_yaml

if TYPE_CHECKING:
    import torch

    from sparta_cli.config import Recipe

# ---------------------------------------------------------------- what a run folder holds

CONFIG_YAML = "config.yaml"  # the resolved recipe plus its `run` record
TRAINER_LOG = "trainer_log.jsonl"
TRAIN_RESULTS = "train_results.json"
EVAL_RESULTS = "eval_results.json"
ALL_RESULTS = "all_results.json"  # written last: the run finished
TRAINING_LOSS_PNG = "training_loss.png"
ADAPTER_FILE = "adapter_model.safetensors"  # deltas (`<module>.indices` / `.delta`) and `trained.<name>` tensors
CONFIG_FILE = "adapter_config.json"
# A run folder that is itself a transformers checkpoint (`full`) records the run here instead:
# transformers reads any adapter_config.json next to config.json as a PEFT adapter to load.
CHECKPOINT_CONFIG_FILE = "sparta_config.json"
PEFT_DIR = "peft"  # LoRA/DoRA runs keep PEFT's own adapter files here
TRAINED_PREFIX = "trained."  # fully trained parameters (the head; everything for `full`)
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
# `sparta eval RUN` writes its scores beside the run: eval_results_<task>_<split>.json
EVAL_RESULTS_PREFIX, EVAL_RESULTS_SUFFIX = "eval_results_", ".json"
# save_pretrained's model and tokenizer files, which a `full` run's folder holds (as regular expressions)
CHECKPOINT_FILE_PATTERNS = (
    r"config\.json", r"generation_config\.json", r"model(-\d+-of-\d+)?\.safetensors", r"model\.safetensors\.index\.json",
    r"tokenizer(_config)?\.json", r"special_tokens_map\.json", r"added_tokens\.json", r"vocab\.(txt|json)", r"merges\.txt",
    r"(tokenizer|spiece|sentencepiece\.bpe)\.model", r"chat_template\.(jinja|json)",
)
# A folder is a run folder when it holds one of these (a run killed early has only config.yaml or a log).
RUN_MARKERS = (CONFIG_YAML, CONFIG_FILE, CHECKPOINT_CONFIG_FILE, TRAINER_LOG, ALL_RESULTS)

# A training checkpoint, checkpoint-<step>/ (checkpoint.py writes and reads it):
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"  # param groups and non-tensor state
SCHEDULER_STATE = "scheduler.json"
MASKS_FILE = "masks.json"  # sha256 of every SpaRTA layer's indices
BEST_FILE = "best_trainable.safetensors"  # the best evaluation's tensors, when a validation set selects
RECIPE_FILE = "recipe.json"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step}"


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def eval_results_name(task: str, split: str) -> str:
    return f"{EVAL_RESULTS_PREFIX}{task}_{split}{EVAL_RESULTS_SUFFIX}"


def run_entry_patterns() -> list[str]:
    """Every entry a sparta run writes into its folder, as regular expressions (outputs.RUN_ENTRIES)."""
    names = (CONFIG_YAML, CONFIG_FILE, CHECKPOINT_CONFIG_FILE, ADAPTER_FILE, TRAINER_LOG, TRAIN_RESULTS, EVAL_RESULTS,
             ALL_RESULTS, TRAINING_LOSS_PNG, PEFT_DIR, TENSORBOARD_DIR, WANDB_DIR)
    return [*map(re.escape, names), re.escape(EVAL_RESULTS_PREFIX) + ".+" + re.escape(EVAL_RESULTS_SUFFIX),
            CHECKPOINT_DIR.pattern.strip("^$"), *CHECKPOINT_FILE_PATTERNS]


def has_checkpoints(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(CHECKPOINT_DIR.match(entry.name) for entry in run_dir.iterdir())


# ---------------------------------------------------------------- reading a run


def run_config_path(run_dir: Path) -> Path | None:
    """The finished run's adapter config (adapter_config.json, or sparta_config.json for a
    run that is a checkpoint), or None when there is none."""
    return next((run_dir / name for name in (CONFIG_FILE, CHECKPOINT_CONFIG_FILE) if (run_dir / name).is_file()), None)


def read_adapter_config(run_dir: Path) -> dict[str, Any]:
    if not run_dir.exists():
        raise SpartaError(f"{run_dir} does not exist: give the folder of a run that `sparta train` wrote (check for a typo)")
    if not run_dir.is_dir():
        raise SpartaError(f"{run_dir} is a file: give the folder of a run that `sparta train` wrote")
    path = run_config_path(run_dir)
    if path is None:
        hint = " (it holds checkpoints: finish it with `sparta train RECIPE --resume`)" if has_checkpoints(run_dir) else ""
        raise SpartaError(f"{run_dir} has no {CONFIG_FILE}: not a finished sparta run{hint}")
    config = read_json(path)
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SpartaError(
            f"{path} has format version {version}, newer than this sparta understands ({FORMAT_VERSION}): upgrade sparta"
        )
    check_adapter_config(config, path)
    return config


def read_adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = run_dir / ADAPTER_FILE
    if not path.is_file():
        raise SpartaError(f"{run_dir} has no {ADAPTER_FILE}: not a finished sparta run")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SpartaError(f"{path} is truncated or corrupted ({str(exc).splitlines()[0]}): retrain or restore the file") from None
    check_adapter_tensors(tensors, read_adapter_config(run_dir), path)  # the one read path: eval, merge, export
    return tensors


def keeps_weights_elsewhere(run_dir: Path) -> bool:
    """A run whose weights are not in adapter_model.safetensors: PEFT's own adapter (peft/), or a
    folder that is itself a whole checkpoint (sparta_config.json)."""
    return not (run_dir / ADAPTER_FILE).is_file() and ((run_dir / PEFT_DIR).is_dir() or (run_dir / CHECKPOINT_CONFIG_FILE).is_file())


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
    if not isinstance(data, dict) or not {"model", "adapter", "task"} <= set(data):
        raise SpartaError(f"{path} is not a sparta run config: point `sparta report` at sparta run directories")
    return data


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
    run_dir = Path(run_dir)
    config = read_adapter_config(run_dir)
    weights = read_adapter_tensors(run_dir) if tensors and not keeps_weights_elsewhere(run_dir) else {}
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
