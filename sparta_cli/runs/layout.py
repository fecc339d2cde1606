"""What a run folder holds, by name, and its adapter files read as stored: the part of runs/ that
the tuners import (they save and load these files), so the reader of a run (runs/__init__.py) may
ask a run's tuner to check what it read without an import cycle."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparta_cli import FORMAT_VERSION
from sparta_cli.adapter_checks import check_adapter_config
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import read_json

if TYPE_CHECKING:
    import torch

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
# The task.chat_template an SFT run trained with, kept in the run: eval, generate, serve and merge read it
# whatever folder they run in. transformers' own name, so a `full` run's tokenizer saves the same file.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
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


def causal_lm_architecture(architectures: list[str] | tuple[str, ...]) -> bool:
    """Whether recorded architecture names (a run's base, a checkpoint's config.json) are a causal LM
    that writes text (an SFT run or its merge), not a classifier."""
    return any(str(name).endswith("ForCausalLM") for name in architectures)
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
    return tensors  # as stored: read_run has the run's method check them (Tuner.read_tensors)
