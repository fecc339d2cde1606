"""Scores for a split's predictions, named as GLUE reports them so results compare with papers.

The task's `main_metric` decides what is added to accuracy: `matthews_correlation` (CoLA),
`combined_score` = mean of accuracy and F1 of class 1 (MRPC, QQP). Regression gets Pearson,
Spearman and their mean as `combined_score`. Given `subjects` (MMLU), accuracy is also broken
down by hendrycks category (`accuracy_STEM`, `accuracy_social_sciences`, ...) and by subject
(`accuracy_subject_<subject>`). Split suffixes such as MNLI's `_mm` are the caller's to add.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from sparta_cli.errors import SpartaError
from sparta_cli.tasks import MMLU_CATEGORIES, Task


def compute_metrics(
    task: Task, predictions: np.ndarray, labels: np.ndarray, subjects: Sequence[str] | None = None
) -> dict[str, float]:
    """Metric name -> value for class ids (or floats, for regression) against the gold labels."""
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if task.is_regression:
        return _regression(predictions.astype(np.float64), labels.astype(np.float64))
    if (labels < 0).any():
        raise SpartaError(
            f"{task.name}: the labels include -1 (an unlabelled test split): score a labelled split such as validation"
        )
    scores = {"accuracy": float(accuracy_score(labels, predictions))}
    if task.main_metric == "matthews_correlation":
        scores["matthews_correlation"] = float(matthews_corrcoef(labels, predictions))
    if task.main_metric == "combined_score":
        scores["f1"] = float(f1_score(labels, predictions, pos_label=1, zero_division=0))
        scores["combined_score"] = (scores["accuracy"] + scores["f1"]) / 2
    if subjects is not None:
        scores.update(_by_subject(predictions == labels, np.asarray(subjects)))
    return scores


def selectable_metrics(task: Task) -> tuple[str, ...]:
    """The metrics `compute_metrics` reports for every split of `task`, plus the loss: what a
    run can select its best evaluation by."""
    if task.is_regression:
        names = ("pearson", "spearmanr", "combined_score")
    else:
        extra = {"matthews_correlation": ("matthews_correlation",), "combined_score": ("f1", "combined_score")}
        names = ("accuracy", *extra.get(task.main_metric, ()))
    return (*names, "loss")


def lower_is_better(metric: str) -> bool:
    return metric == "loss"


def _regression(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pearson = float(pearsonr(predictions, labels)[0])
    spearman = float(spearmanr(predictions, labels)[0])
    return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2}


def _by_subject(correct: np.ndarray, subjects: np.ndarray) -> dict[str, float]:
    """Accuracy per MMLU category (over its questions, as hendrycks does) and per subject."""
    categories = np.array([MMLU_CATEGORIES.get(str(subject), "") for subject in subjects])
    scores = {
        f"accuracy_{category.replace(' ', '_')}": float(correct[categories == category].mean())
        for category in sorted(set(categories) - {""})
    }
    for subject in sorted(set(subjects.tolist())):
        scores[f"accuracy_subject_{subject}"] = float(correct[subjects == subject].mean())
    return scores
