"""Checks that need no weights, run before any command loads a model: the model folder and its
config.json, the data folder, the adapter's targets and data.max_length against the model's learned
positions (on a skeleton of the model built from config.json on the meta device), the trackers
the recipe turns on, and for SFT every row and the chat template (with the tokenizer alone).
`sparta validate` runs them all; `train` and `eval` run them first, so a typo fails in a second
instead of after the load."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sparta_cli.config import Recipe
from sparta_cli.errors import SpartaError

if TYPE_CHECKING:
    from sparta_cli.tasks import Task


def check_data_dir(recipe: Recipe) -> Path | None:
    """`data.dir` (or $SPARTA_DATA_DIR) exists when given; None means the Hub."""
    folder = recipe.data_dir()
    if folder is None or recipe.task.from_files:  # a custom task names its own files
        return folder
    setting = "data.dir" if recipe.data.dir else "$SPARTA_DATA_DIR"
    if not folder.exists():
        raise SpartaError(f"data dir {folder} ({setting}) does not exist: point {setting} at the data root (glue/, imdb/, mmlu/) "
                          "or unset it to read from the Hub")
    if not folder.is_dir():
        raise SpartaError(f"data dir {folder} ({setting}) is a file: point {setting} at the data root folder (glue/, imdb/, mmlu/)")
    return folder


def check_against_config(recipe: Recipe, source: str, task: Task, *, targets: bool = True) -> None:
    """Checks against a skeleton of the model built from its config.json on the meta device (no weights):
    adapter.targets exist in it (and SpaRTA's adapter.budget fits them: resolved here to its density,
    which `sparta validate` prints), and data.max_length fits its learned positions (models.fit_max_length).
    Says nothing for a Hub name (no config.json here to read offline) or a GGUF file (its config is in
    the weights): the checks after the load cover those."""
    if recipe.model.gguf_file or not (Path(source) / "config.json").is_file():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from sparta_cli.models import fit_max_length, lm_heads
    from sparta_cli.targets import resolve_targets

    auto = AutoModelForCausalLM if task.kind.head == "lm" else AutoModelForSequenceClassification
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
        with torch.device("meta"):
            skeleton = auto.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except (ValueError, OSError, KeyError):
        return  # the model load names these (an architecture without a classifier, a damaged config)
    fit_max_length(recipe, skeleton)
    if targets:
        lm_heads(skeleton, task, recipe.adapter.method)  # a tied LM head for `head` is refused here, not after the load
    chosen = recipe.adapter.recorded()["targets"]  # null for a method without targets
    if targets and chosen is not None:
        resolve_targets(skeleton, chosen)
        recipe.resolve_adapter(skeleton)  # a budget's density, and the rate auto gives it


def preflight(recipe: Recipe, *, targets: bool = True, splits: Sequence[str] | None = None) -> str:
    """Every check that needs no weights; returns the model's folder or Hub name. `splits`: the
    ones the command reads (default: train, when the task trains, and the task's evaluation splits)."""
    from sparta_cli.models import check_model_source
    from sparta_cli.tasks import check_split_files, resolve_task
    from sparta_cli.trackers import enabled_trackers

    source = check_model_source(recipe.model)
    data_dir = check_data_dir(recipe)
    task = resolve_task(recipe.task)
    if splits is None:  # a task only scored (MMLU by the LM head) reads no training rows
        trained = ("train",) if task.kind.trainable else ()
        splits = [s for s in (*trained, *task.eval_splits) if s in task.splits or s in task.aliases]
    check_split_files(task, recipe.task, splits, data_dir)
    enabled_trackers(recipe)
    check_against_config(recipe, source, task, targets=targets)
    if task.kind.token_level:
        check_sft_rows(recipe, task, source, splits)
    return source


def check_heldout_rows(recipe: Recipe, source: str) -> None:
    """A classification recipe's `data.validation_size` against the training rows it tokenizes to (SFT's are
    counted by check_sft_rows): `sparta validate` says what training would refuse after the model load.
    Tokenizing fills the cache the training that follows reads."""
    from sparta_cli.data import tokenize_split, validation_indices
    from sparta_cli.models import load_tokenizer
    from sparta_cli.tasks import resolve_task

    task = resolve_task(recipe.task)
    if recipe.data.validation_size is None or task.kind.token_level:
        return
    tokenizer = load_tokenizer(recipe.model, source)
    rows = len(tokenize_split(task, "train", tokenizer, recipe, recipe.data.max_train_samples, recipe.seed).dataset)
    validation_indices(rows, recipe.data.validation_size, recipe.seed)


def check_sft_rows(recipe: Recipe, task: Task, source: str, splits: Sequence[str]) -> None:
    """Every row of the splits read and validated, and the rows the command uses rendered with the chat
    template and tokenised (`data.tokenize_split`, which verifies each answer's span and caches what it
    makes, so the command that follows reuses it), with the tokenizer alone. Once per launch (rank 0)."""
    if os.environ.get("RANK", "0") != "0":
        return
    from sparta_cli.data import tokenize_split, validation_indices
    from sparta_cli.generation import generation_sets
    from sparta_cli.models import load_tokenizer

    tokenizer = load_tokenizer(recipe.model, source)
    for split in splits:
        if split == "train":
            rows = len(tokenize_split(task, split, tokenizer, recipe, recipe.data.max_train_samples, recipe.seed).dataset)
            if recipe.data.validation_size is not None:  # what training holds out of them, or its one-line refusal
                validation_indices(rows, recipe.data.validation_size, recipe.seed)
        else:
            tokenize_split(task, split, tokenizer, recipe, recipe.data.max_eval_samples)
    # task.generation_metrics: the prompts the evaluations generate from (text rows have none)
    generation_sets(task, recipe, tokenizer, [split for split in splits if split != "train"])
