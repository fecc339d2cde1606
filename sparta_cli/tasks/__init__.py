"""Tasks: which benchmark or user files a recipe names, what kind of task it is, and how its splits are read.

A `Task` states its kind (`task.kind`, kinds.py): CLASSIFICATION, REGRESSION, LM_CHOICE (MMLU
scored through the LM head) or SFT_KIND (`task.type: sft`: a causal LM trained on answers' tokens). Data, training, evaluation and prediction ask the kind (its label
type, scorer, metrics, whether it trains) rather than telling tasks apart.

A split always comes back as a `datasets.Dataset` with the task's text columns (strings)
and `label` (class id, or float for regression; -1 on every row of an unlabelled test
split), plus `subject` for MMLU, whether it was read from a local copy or the Hub.

Each family of tasks is one module (glue.py, imdb.py, mmlu.py, custom.py: your own files, sft.py: SFT
files or a built-in task as chat; its splits are `where`/`row` columns, `sft_rows` reads them), registered
below by `Task.source`; files.py reads the files. Local copies (`data.dir` or `$SPARTA_DATA_DIR`)
may point at the data root or at the GLUE folder itself; with no directory the same data comes from
the Hugging Face Hub. Split names follow the Hub; each family's module lists its aliases.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import datasets

from sparta_cli.config import TaskConfig
from sparta_cli.errors import SpartaError
from sparta_cli.tasks import custom, glue, imdb, mmlu, sft
from sparta_cli.tasks.base import Family, Scorer, Task, TaskKind, canonical_split, normalise
from sparta_cli.tasks.kinds import CLASSIFICATION, LM_CHOICE, REGRESSION, SFT_KIND
from sparta_cli.tasks.mmlu import MMLU_CATEGORIES, MMLU_CHOICES, format_mmlu_prompt, mmlu_prompt_with_shots
from sparta_cli.tasks.sft import rows as sft_rows

__all__ = [
    "CLASSIFICATION", "KNOWN_TASKS", "LM_CHOICE", "MMLU_CATEGORIES", "MMLU_CHOICES", "REGRESSION", "SFT_KIND", "Scorer",
    "Task", "TaskKind", "canonical_split", "check_split_files", "check_trainable", "format_mmlu_prompt", "load_split",
    "mmlu_prompt_with_shots", "normalise", "resolve_task", "sft_rows", "split_names",
]

FAMILIES: dict[str, Family] = {"glue": glue, "imdb": imdb, "mmlu": mmlu, "custom": custom, "sft": sft}

KNOWN_TASKS: tuple[str, ...] = tuple(name for family in FAMILIES.values() for name in family.NAMES)


def resolve_task(task_cfg: TaskConfig) -> Task:
    """The Task a recipe's `task:` section names; custom tasks read their training file for the labels."""
    if task_cfg.type == "sft":
        task = sft.task("", task_cfg)
    else:
        task = custom.task("", task_cfg) if task_cfg.type is not None else _named_task(str(task_cfg.name), task_cfg)
    if task_cfg.shots and task.kind is not LM_CHOICE:
        raise SpartaError(
            f"task.shots = {task_cfg.shots} only applies to mmlu with task.head: lm: "
            "set task.shots to 0 (or task.head to lm for mmlu)"
        )
    if _scored_by_lm_head(task_cfg) and task.kind is not LM_CHOICE:
        raise SpartaError(f"task.head=lm scores multiple choice (mmlu) only; {task.name} needs task.head=classifier")
    if task_cfg.train_split:
        train_split = canonical_split(task, task_cfg.train_split)
        if train_split in task.eval_splits:
            raise SpartaError(
                f"task.train_split = {task_cfg.train_split} is also {task.name}'s evaluation split: "
                f"train on another split (one of {', '.join(s for s in task.splits if s not in task.eval_splits)})"
            )
        # "train" names the split a run trains on, wherever it is read
        task = replace(task, aliases={**task.aliases, "train": train_split})
    return task


def _scored_by_lm_head(task_cfg: TaskConfig) -> bool:
    """`task.head: lm` asks for the LM_CHOICE kind: the model's own head scores, nothing is trained."""
    return task_cfg.head == LM_CHOICE.head


def check_trainable(task_cfg: TaskConfig) -> None:
    """`sparta train` fits a classification head; `task.head: lm` (LM_CHOICE) only scores (with `sparta eval`).
    Read from the recipe alone, before any file is: `sparta train` says so first."""
    if _scored_by_lm_head(task_cfg) and not LM_CHOICE.trainable:
        raise SpartaError(
            "task.head: lm scores a model with its own next-token logits and has nothing to train: "
            "train with task.head: classifier, or score a base model with `sparta eval MODEL --task mmlu task.head=lm`"
        )


def _named_task(name: str, task_cfg: TaskConfig) -> Task:
    key = normalise(name)
    for family in FAMILIES.values():
        if key in family.NAMES:
            return family.task(key, task_cfg)
    close = difflib.get_close_matches(key, KNOWN_TASKS, n=1, cutoff=0.4)
    hint = f"did you mean `{close[0]}`? " if close else ""
    raise SpartaError(
        f"unknown task `{name}`: {hint}known tasks are {', '.join(KNOWN_TASKS)}; "
        "for your own data set task.type, task.train_file and task.text_fields"
    )


def split_names(task: Task) -> tuple[str, ...]:
    """Splits that exist for the task (without aliases)."""
    return task.splits


def check_split_files(task: Task, task_cfg: TaskConfig, splits: Sequence[str], data_dir: Path | None) -> None:
    """The files the splits are read from exist (the same lookups as load_split, without reading
    them), so a missing GLUE folder fails before a model loads. The Hub is not checked offline."""
    for split in splits:
        FAMILIES[task.source].check(task, canonical_split(task, split), data_dir)


def load_split(task: Task, task_cfg: TaskConfig, split: str, data_dir: Path | None) -> datasets.Dataset:
    """One split as a Dataset of the task's text columns and `label` (-1 where a test split has none)."""
    return FAMILIES[task.source].read(task, task_cfg, canonical_split(task, split), data_dir)
