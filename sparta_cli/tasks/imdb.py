"""IMDB: `<dir>/imdb/{train,test}.csv` (text,label with 0 = neg, 1 = pos) or the Hub's
stanfordnlp/imdb. IMDB has no dev set: `validation` means `test`."""

from __future__ import annotations

from pathlib import Path

import datasets

from sparta_cli.config import TaskConfig
from sparta_cli.tasks.base import Task, as_dataset
from sparta_cli.tasks.files import local_folder, require_file, table_columns
from sparta_cli.tasks.hub import hub_split
from sparta_cli.tasks.kinds import CLASSIFICATION

NAMES: tuple[str, ...] = ("imdb",)

_HUB = "stanfordnlp/imdb"


def task(key: str, task_cfg: TaskConfig) -> Task:
    return Task("imdb", CLASSIFICATION, ("text",), ("neg", "pos"), "accuracy", ("test",), splits=("train", "test"),
                source="imdb", aliases={"validation": "test"})


def check(task: Task, split: str, data_dir: Path | None) -> None:
    if data_dir is not None:
        _path(split, data_dir)


def read(task: Task, task_cfg: TaskConfig, split: str, data_dir: Path | None) -> datasets.Dataset:
    if data_dir is None:
        return hub_split(task, _HUB, None, split)
    return as_dataset(task, table_columns(task, _path(split, data_dir), "label", {"0": 0, "1": 1}, required=True))


def _path(split: str, data_dir: Path) -> Path:
    folder = local_folder(data_dir, (data_dir / "imdb",), "IMDB folder imdb/")
    return require_file(folder / f"{split}.csv", "copy the IMDB train.csv/test.csv (text,label) there")
