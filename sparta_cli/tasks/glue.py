"""GLUE: its nine tasks read from GLUE's own TSVs (`<dir>/<GlueName>/` or `<dir>/glue/<GlueName>/`,
SST-2, CoLA, MNLI, ...) or from the Hub's nyu-mll/glue. MNLI's evaluation splits are its matched and
mismatched halves (`validation`/`test` mean matched; metrics of mismatched end in `_mm`); GLUE's own
files call the validation split dev (dev.tsv), so `dev` is an alias."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from sparta_cli.config import TaskConfig
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import read_text
from sparta_cli.tasks.base import Task, as_dataset
from sparta_cli.tasks.files import label_parser, local_folder, no_rows, require_file
from sparta_cli.tasks.hub import hub_split
from sparta_cli.tasks.kinds import CLASSIFICATION, REGRESSION


@dataclass(frozen=True)
class _Glue:
    """Where GLUE keeps a task's columns: by position, as GLUE's own processors read them."""

    folder: str
    text_fields: tuple[str, ...]  # the Hub's column names
    text_cols: tuple[int, ...]
    label_col: int
    test_cols: tuple[int, ...]  # test files have their own layout and always a header
    label_names: tuple[str, ...] | None  # None: regression (STS-B's scores)
    named_labels: bool  # the file holds label names (entailment) rather than ids (0/1)
    main_metric: str
    header: bool = True


_GLUE: dict[str, _Glue] = {
    "cola": _Glue("CoLA", ("sentence",), (3,), 1, (1,), ("unacceptable", "acceptable"), False,
                  "matthews_correlation", header=False),
    "sst2": _Glue("SST-2", ("sentence",), (0,), 1, (1,), ("negative", "positive"), False, "accuracy"),
    "mrpc": _Glue("MRPC", ("sentence1", "sentence2"), (3, 4), 0, (3, 4), ("not_equivalent", "equivalent"), False,
                  "combined_score"),
    "qqp": _Glue("QQP", ("question1", "question2"), (3, 4), 5, (1, 2), ("not_duplicate", "duplicate"), False,
                 "combined_score"),
    "stsb": _Glue("STS-B", ("sentence1", "sentence2"), (7, 8), 9, (7, 8), None, False, "combined_score"),
    "mnli": _Glue("MNLI", ("premise", "hypothesis"), (8, 9), -1, (8, 9), ("entailment", "neutral", "contradiction"),
                  True, "accuracy"),
    "qnli": _Glue("QNLI", ("question", "sentence"), (1, 2), -1, (1, 2), ("entailment", "not_entailment"), True,
                  "accuracy"),
    "rte": _Glue("RTE", ("sentence1", "sentence2"), (1, 2), 3, (1, 2), ("entailment", "not_entailment"), True,
                 "accuracy"),
    "wnli": _Glue("WNLI", ("sentence1", "sentence2"), (1, 2), 3, (1, 2), ("not_entailment", "entailment"), False,
                  "accuracy"),
}

NAMES: tuple[str, ...] = tuple(_GLUE)

_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "test": "test.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}

_MNLI_SPLITS = ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")

_HUB = "nyu-mll/glue"


def task(key: str, task_cfg: TaskConfig) -> Task:
    spec = _GLUE[key]
    mnli = key == "mnli"
    return Task(
        name=key,
        kind=REGRESSION if spec.label_names is None else CLASSIFICATION,
        text_fields=spec.text_fields,
        label_names=spec.label_names,
        main_metric=spec.main_metric,
        eval_splits=_MNLI_SPLITS[1:3] if mnli else ("validation",),
        metric_suffixes={"validation_mismatched": "_mm"} if mnli else {},
        splits=_MNLI_SPLITS if mnli else ("train", "validation", "test"),
        source="glue",
        aliases={"validation": "validation_matched", "test": "test_matched", "dev": "validation_matched",
                 "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"} if mnli else {"dev": "validation"},
    )


def check(task: Task, split: str, data_dir: Path | None) -> None:
    if data_dir is not None:
        _path(task, split, data_dir)


def read(task: Task, task_cfg: TaskConfig, split: str, data_dir: Path | None) -> datasets.Dataset:
    if data_dir is None:
        return hub_split(task, _HUB, task.name, split)
    return as_dataset(task, _columns(task, split, data_dir))


def _path(task: Task, split: str, data_dir: Path) -> Path:
    spec = _GLUE[task.name]
    folder = local_folder(data_dir, (data_dir / spec.folder, data_dir / "glue" / spec.folder), f"GLUE folder {spec.folder}/")
    return require_file(
        folder / _FILES[split],
        f"copy GLUE's {_FILES[split]} into {folder}, or unset data.dir and $SPARTA_DATA_DIR "
        f"to download {task.name} from the Hugging Face Hub",
    )


def _columns(task: Task, split: str, data_dir: Path) -> dict[str, list[Any]]:
    spec = _GLUE[task.name]
    path = _path(task, split, data_dir)
    test = split.startswith("test")
    cols = spec.test_cols if test else spec.text_cols
    needed = _fields_needed(spec, test)
    parse = label_parser(task, path, _label_keys(spec), required=True)
    columns: dict[str, list[Any]] = {name: [] for name in spec.text_fields}
    labels: list[float] = []
    # GLUE quotes nothing, and sentences hold quote characters: split on tabs, never parse CSV quoting.
    lines = read_text(path).split("\n")
    first = 1 if spec.header or test else 0
    for number, line in enumerate(lines[first:], first + 1):
        line = line.rstrip("\r")
        if not line:
            continue
        cells = line.split("\t")
        if len(cells) < needed:
            raise SpartaError(
                f"{path} line {number}: {len(cells)} tab-separated fields, GLUE's {spec.folder} layout needs "
                f"at least {needed}: fix or remove that line"
            )
        for name, col in zip(spec.text_fields, cols):
            columns[name].append(cells[col])
        labels.append(-1 if test else parse(cells[spec.label_col], number))
    if not labels:
        raise no_rows(path)
    columns["label"] = labels
    return columns


def _label_keys(spec: _Glue) -> dict[str, int] | None:
    """Label cell -> class id: names for the NLI tasks, digits for the rest, None for STS-B's scores."""
    if spec.label_names is None:
        return None
    if spec.named_labels:
        return {name: i for i, name in enumerate(spec.label_names)}
    return {str(i): i for i in range(len(spec.label_names))}


def _fields_needed(spec: _Glue, test: bool) -> int:
    """Fields a row must have; a label read at position -1 must lie beyond the text columns."""
    if test:
        return max(spec.test_cols) + 1
    if spec.label_col < 0:
        return max(spec.text_cols) + 2
    return max(*spec.text_cols, spec.label_col) + 1
