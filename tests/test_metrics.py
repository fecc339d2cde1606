"""Each metric on a small example worked out by hand, and checked against scikit-learn / scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from sparta_cli.config import TaskConfig
from sparta_cli.errors import SpartaError
from sparta_cli.metrics import compute_metrics
from sparta_cli.tasks import Task, resolve_task


def task(name: str) -> Task:
    return resolve_task(TaskConfig(name=name))


def test_accuracy_sst2() -> None:
    predictions = np.array([0, 1, 1, 0, 1])
    labels = np.array([0, 1, 0, 0, 0])
    # right at positions 0, 1, 3 -> 3 / 5
    scores = compute_metrics(task("sst2"), predictions, labels)
    assert scores == {"accuracy": pytest.approx(0.6)}
    assert scores["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert task("sst2").main_metric in scores


def test_matthews_cola() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0])
    predictions = np.array([1, 1, 0, 0, 0, 1])
    # TP=2 (0,1) FN=1 (2) TN=2 (3,4) FP=1 (5)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 3/9
    scores = compute_metrics(task("cola"), predictions, labels)
    assert scores["matthews_correlation"] == pytest.approx(1 / 3)
    assert scores["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, predictions))
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert task("cola").main_metric == "matthews_correlation"


@pytest.mark.parametrize("name", ["mrpc", "qqp"])
def test_f1_and_combined_score(name: str) -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    predictions = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    # TP=2 FN=1 FP=1 TN=4: accuracy = 6/8 = 0.75
    # precision = 2/3, recall = 2/3 -> F1 = 2/3; combined = (0.75 + 2/3) / 2 = 0.708333...
    scores = compute_metrics(task(name), predictions, labels)
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["combined_score"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert scores["f1"] == pytest.approx(f1_score(labels, predictions))
    assert task(name).main_metric == "combined_score"


def test_f1_is_for_class_one() -> None:
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 0, 0, 1])
    # class 1: TP=1 FN=1 FP=0 -> precision 1, recall 1/2, F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    # (class 0 would give precision 2/3, recall 1 -> F1 0.8)
    assert compute_metrics(task("mrpc"), predictions, labels)["f1"] == pytest.approx(2 / 3)


def test_stsb_regression() -> None:
    predictions = np.array([1.0, 2.0, 3.0, 4.0])
    labels = np.array([2.0, 5.0, 4.0, 9.0])
    # Pearson: means 2.5 and 5; dx = -1.5 -0.5 0.5 1.5, dy = -3 0 -1 4
    #   sum dx*dy = 4.5 + 0 - 0.5 + 6 = 10; sum dx^2 = 5; sum dy^2 = 9 + 0 + 1 + 16 = 26
    #   r = 10 / sqrt(5 * 26) = 10 / sqrt(130) = 0.877058...
    # Spearman: ranks 1 2 3 4 vs 1 3 2 4, d = 0 -1 1 0, sum d^2 = 2
    #   rho = 1 - 6 * 2 / (4 * (16 - 1)) = 1 - 12/60 = 0.8
    scores = compute_metrics(task("stsb"), predictions, labels)
    assert scores["pearson"] == pytest.approx(10 / math.sqrt(130))
    assert scores["spearmanr"] == pytest.approx(0.8)
    assert scores["combined_score"] == pytest.approx((10 / math.sqrt(130) + 0.8) / 2)
    assert scores["pearson"] == pytest.approx(pearsonr(predictions, labels)[0])
    assert scores["spearmanr"] == pytest.approx(spearmanr(predictions, labels)[0])
    assert set(scores) == {"pearson", "spearmanr", "combined_score"}


def test_regression_accepts_a_column_of_outputs() -> None:
    predictions = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    scores = compute_metrics(task("stsb"), predictions, np.array([1.0, 2.0, 3.0]))
    assert scores["pearson"] == pytest.approx(1.0)


def test_mnli_is_plain_accuracy() -> None:
    # 2 of 3 right; the _mm suffix is the caller's
    scores = compute_metrics(task("mnli"), np.array([0, 1, 2]), np.array([0, 1, 1]))
    assert scores == {"accuracy": pytest.approx(2 / 3)}


def test_mmlu_by_category_and_subject() -> None:
    subjects = ["abstract_algebra", "abstract_algebra", "anatomy", "philosophy", "sociology", "virology"]
    # categories:   STEM               STEM                other      humanities    social sci.  other
    labels = np.array([0, 1, 2, 3, 0, 1])
    predictions = np.array([0, 0, 2, 3, 1, 0])
    # right:          y  n  y  y  n  n  -> overall 3/6
    # STEM 1/2, other (anatomy y, virology n) 1/2, humanities 1/1, social sciences 0/1
    scores = compute_metrics(task("mmlu"), predictions, labels, subjects)
    assert scores == pytest.approx({
        "accuracy": 0.5,
        "accuracy_STEM": 0.5,
        "accuracy_other": 0.5,
        "accuracy_humanities": 1.0,
        "accuracy_social_sciences": 0.0,
        "accuracy_subject_abstract_algebra": 0.5,
        "accuracy_subject_anatomy": 1.0,
        "accuracy_subject_philosophy": 1.0,
        "accuracy_subject_sociology": 0.0,
        "accuracy_subject_virology": 0.0,
    })
    assert compute_metrics(task("mmlu"), predictions, labels) == {"accuracy": pytest.approx(0.5)}


def test_custom_classification_is_accuracy(tmp_path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,x\nb,y\n")
    custom = resolve_task(TaskConfig(type="classification", train_file=str(train), text_fields=["text"]))
    # 1 of 2 right
    assert compute_metrics(custom, np.array([0, 0]), np.array([0, 1])) == {"accuracy": 0.5}


def test_unlabelled_split_is_refused() -> None:
    with pytest.raises(SpartaError, match="unlabelled test split"):
        compute_metrics(task("sst2"), np.array([0, 1]), np.array([-1, -1]))


def test_values_are_plain_floats() -> None:
    scores = compute_metrics(task("mrpc"), np.array([1, 0]), np.array([1, 1]))
    assert all(type(value) is float for value in scores.values())
