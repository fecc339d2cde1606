"""Your own data: `task.type` (classification or regression) with `task.train_file`,
`validation_file` and `test_file` (CSV, TSV or JSONL; files.py says how they are read). A
classification task's labels are the sorted distinct labels of its training file (of its validation
file when it has none); a test file may leave the label column out."""

from __future__ import annotations

from pathlib import Path

import datasets

from sparta_cli.config import TaskConfig, user_path
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import input_file
from sparta_cli.tasks.base import Task, as_dataset
from sparta_cli.tasks.files import label_text, read_table, require_columns, sorted_labels, table_columns
from sparta_cli.tasks.kinds import CLASSIFICATION, REGRESSION

NAMES: tuple[str, ...] = ()  # chosen by task.type, never by name


def task(key: str, task_cfg: TaskConfig) -> Task:
    fields = tuple(task_cfg.text_fields or ())
    if len(fields) not in (1, 2):
        raise SpartaError(f"task.text_fields has {len(fields)} columns: give one or two, e.g. [sentence1, sentence2]")
    files = {
        split: path
        for split, path in (("train", task_cfg.train_file), ("validation", task_cfg.validation_file),
                            ("test", task_cfg.test_file))
        if path
    }
    regression = task_cfg.type == "regression"
    labels_from = "train" if "train" in files else "validation"
    return Task(
        name=task_cfg.label,
        kind=REGRESSION if regression else CLASSIFICATION,
        text_fields=fields,
        label_names=None if regression else _discover_labels(task_cfg, labels_from, files[labels_from]),
        main_metric="combined_score" if regression else "accuracy",
        eval_splits=("validation",) if "validation" in files else (),
        splits=tuple(files),
        source="custom",
        files=files,
    )


def check(task: Task, split: str, data_dir: Path | None) -> None:
    split_path(split, task.files[split])


def read(task: Task, task_cfg: TaskConfig, split: str, data_dir: Path | None) -> datasets.Dataset:
    path = split_path(split, task.files[split])
    keys = None if task.label_names is None else {name: i for i, name in enumerate(task.label_names)}
    return as_dataset(task, table_columns(task, path, task_cfg.label_field, keys, required=split != "test"))


def _discover_labels(task_cfg: TaskConfig, split: str, given: str) -> tuple[str, ...]:
    path = split_path(split, given)
    header, rows = read_table(path)
    require_columns(path, header, tuple(task_cfg.text_fields or ()), "task.text_fields")
    require_columns(path, header, (task_cfg.label_field,), "task.label_field")
    found: set[str] = set()
    for line, record in rows:
        text = label_text(record.get(task_cfg.label_field), path, line)
        if not text:
            raise SpartaError(f"{path} line {line}: the label is empty: fill it in or remove that row")
        found.add(text)
    if len(found) < 2:
        raise SpartaError(
            f"{path} has {len(found)} distinct label(s) in column `{task_cfg.label_field}`: classification "
            "needs at least two; check task.label_field or use task.type: regression"
        )
    return sorted_labels(found)


def split_path(split: str, given: str, types: str = "CSV, TSV or JSONL") -> Path:
    """The file `task.<split>_file` names, a regular file (`types`: the kinds of file it may be, for the message)."""
    path = user_path(given, f"task.{split}_file")
    return input_file(
        path, f"task.{split}_file {path} not found (relative paths start at the current folder {Path.cwd()}): fix the path, "
              f"in the recipe or as task.{split}_file=PATH on the command line (a run's config.yaml keeps the path it was given)",
        f"give the path of a {types} file", setting=f"task.{split}_file ",
    )
