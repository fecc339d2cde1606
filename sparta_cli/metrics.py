"""Scores for a split's predictions: the task's kind computes them (tasks/kinds.py names them as
GLUE reports them, so results compare with papers); this is the one door evaluation and model
selection go through. Split suffixes such as MNLI's `_mm` are the caller's to add.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparta_cli.tasks import Task


def compute_metrics(
    task: Task, predictions: np.ndarray, labels: np.ndarray, subjects: Sequence[str] | None = None
) -> dict[str, float]:
    """Metric name -> value for class ids (or floats, for regression) against the gold labels;
    given `subjects` (MMLU), accuracy by category and by subject too."""
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    return task.kind.scores(task, predictions, labels, subjects)


def selectable_metrics(task: Task) -> tuple[str, ...]:
    """The metrics `compute_metrics` reports for every split of `task`, plus the loss: what a
    run can select its best evaluation by."""
    return tuple(dict.fromkeys((*task.kind.metric_names(task), "loss")))


LOWER_IS_BETTER = ("loss", "perplexity")


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER
