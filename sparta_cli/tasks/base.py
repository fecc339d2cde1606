"""What every task is, whatever family its data comes from: `Task`, the `TaskKind` interface it
states, and the `Family` interface each data source implements (glue.py, imdb.py, mmlu.py, custom.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import datasets
import pyarrow as pa

from sparta_cli.config import TaskConfig
from sparta_cli.errors import SpartaError

if TYPE_CHECKING:  # torch only types the scorers; importing it here would slow `sparta validate`
    import torch

# Turns a batch into per-example predictions and per-example losses (None where there is no loss).
Scorer = Callable[["torch.nn.Module", dict[str, "torch.Tensor"]], tuple["torch.Tensor", "torch.Tensor | None"]]


class TaskKind:
    """What a kind of task decides for data, training, evaluation and prediction: the type of its
    label column, how rows become model inputs, which head scores a batch, and the metrics.
    The kinds are in kinds.py; everything outside `tasks/` asks `task.kind` instead of telling
    kinds apart."""

    name: ClassVar[str]
    head: ClassVar[str]  # "classifier": a head sparta adds and trains; "lm": the model's own next-token head
    trainable: ClassVar[bool] = True  # `sparta train` has something to fit
    label_dtype: ClassVar[str] = "int64"  # the Arrow type of the `label` column
    problem_type: ClassVar[str | None] = None  # transformers' problem_type of the classification head
    # the loss is over the tokens of sequences (SFT), not one label a row: rows are tokenised by sft/,
    # training weights each micro-batch by its supervised tokens, and a split's scorer gives each row's
    # summed loss and supervised tokens
    token_level: ClassVar[bool] = False

    def train_loss(self, model: Any, batch: dict[str, Any], rows: int | None = None) -> tuple[Any, Any]:
        """(the summed loss to train on, what it sums over): a row-level kind's summed row losses and its
        row count, a token-level kind's summed token loss and its supervised tokens. Only the batch's first
        `rows` rows count (None: all): an even-batches loader completes a process's last batch with rows
        it repeats (Accelerate, `Trainer.real_rows`); they go forward and backward with the others, with no
        weight. The trainer makes a step's gradient the mean over everything its micro-batches sum over."""
        raise NotImplementedError(f"{self.name} tasks are not trained")

    def encode(self, tokenizer: Any, texts: Sequence[list[str]], max_length: int) -> dict[str, list]:
        """Model inputs of a batch of rows (`texts`: one list per text field), cut at `max_length`,
        and `overlong`: which rows were longer."""
        lengths = [len(ids) for ids in tokenizer(*texts, truncation=False)["input_ids"]]
        out = tokenizer(*texts, truncation=True, max_length=max_length)
        out["overlong"] = [n > max_length for n in lengths]
        return out

    def scorer(self, task: Task, tokenizer: Any) -> Scorer:
        raise NotImplementedError

    def recorded(self, task: Task, task_cfg: TaskConfig, rendering: Any = None) -> dict[str, Any]:
        """What a run's adapter_config.json records of its task (`task`): what loading it back needs.
        `rendering`: how a token-level kind's training rows became text (sft.Rendering)."""
        return {"name": task.name, "label_names": list(task.label_names) if task.label_names else None,
                "num_labels": task.num_labels, "is_regression": task.is_regression}

    def scores(self, task: Task, predictions: Any, labels: Any, subjects: Sequence[str] | None) -> dict[str, float]:
        """Metric name -> value of one split's predictions against its labels."""
        raise NotImplementedError

    def metric_names(self, task: Task) -> tuple[str, ...]:
        """The metrics `scores` reports for every split of `task`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task kind {self.name}>"


@dataclass(frozen=True)
class Task:
    """What the rest of the program needs to know about a task, wherever its data lives."""

    name: str
    kind: TaskKind
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None: regression (one output)
    main_metric: str
    eval_splits: tuple[str, ...]
    metric_suffixes: dict[str, str] = field(default_factory=dict)
    splits: tuple[str, ...] = ("train", "validation", "test")
    source: str = "custom"  # the family that reads it: "glue", "imdb", "mmlu", "custom" or "sft"
    aliases: dict[str, str] = field(default_factory=dict)  # other accepted split name -> split
    files: dict[str, str] = field(default_factory=dict)  # custom: split -> path as the recipe gives it
    subject_categories: Mapping[str, str] = field(default_factory=dict)  # MMLU: subject -> category, for metrics
    based_on: str | None = None  # sft of a built-in task (sst2, mmlu): the task whose rows it renders as chat

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.kind.problem_type == "regression"


class Family(Protocol):
    """A source of tasks: a module that knows some task names (or, custom.py, the recipe's own files),
    where their splits live and how to read them. Registered by `Task.source` in tasks/__init__.py."""

    NAMES: tuple[str, ...]

    def task(self, key: str, task_cfg: TaskConfig) -> Task: ...

    def check(self, task: Task, split: str, data_dir: Path | None) -> None: ...

    def read(self, task: Task, task_cfg: TaskConfig, split: str, data_dir: Path | None) -> datasets.Dataset: ...


def normalise(name: str) -> str:
    """`SST-2`, `sts_b` and `STSB` all name the same task."""
    return name.lower().replace("-", "").replace("_", "")


def canonical_split(task: Task, split: str) -> str:
    """The split `split` names (an alias resolved), or a one-line error listing the task's splits."""
    split = task.aliases.get(split, split)
    if split in task.splits:
        return split
    if task.files and split in ("train", "validation", "test"):  # a task of the recipe's own files
        raise SpartaError(f"task {task.name} has no {split} split: set task.{split}_file")
    raise SpartaError(f"task {task.name} has no `{split}` split: use one of {', '.join(task.splits)}")


def features(task: Task, extra: Sequence[str] = ()) -> datasets.Features:
    """The columns of a split: the text fields (and `extra` string columns), then `label`."""
    columns = {name: datasets.Value("string") for name in (*task.text_fields, *extra)}
    columns["label"] = datasets.Value(task.kind.label_dtype)
    return datasets.Features(columns)


def as_dataset(task: Task, columns: dict[str, list[Any]]) -> datasets.Dataset:
    """Columns read from files as a Dataset typed like the Hub's."""
    types = features(task, [name for name in columns if name not in (*task.text_fields, "label")])
    # Straight to Arrow: from_dict(features=...) encodes cell by cell, seconds for SST-2.
    table = pa.Table.from_pydict(columns, schema=types.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=types))
