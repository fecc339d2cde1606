"""Every task states its kind, and data, metrics and model selection ask the kind (issue 21): a new
kind is a TaskKind subclass, with nothing else to change."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sparta_cli.config import TaskConfig
from sparta_cli.errors import SpartaError
from sparta_cli.metrics import compute_metrics, selectable_metrics
from sparta_cli.tasks import CLASSIFICATION, LM_CHOICE, REGRESSION, Task, check_trainable, resolve_task
from sparta_cli.tasks.base import features
from sparta_cli.tasks.kinds import Classification


@pytest.mark.parametrize(("task_cfg", "kind"), [
    (TaskConfig(name="sst2"), CLASSIFICATION),
    (TaskConfig(name="STS-B"), REGRESSION),
    (TaskConfig(name="mnli"), CLASSIFICATION),
    (TaskConfig(name="imdb"), CLASSIFICATION),
    (TaskConfig(name="mmlu"), CLASSIFICATION),
    (TaskConfig(name="mmlu", head="lm"), LM_CHOICE),
    (TaskConfig(name="mmlu", head="lm", shots=5), LM_CHOICE),
])
def test_each_task_states_its_kind(task_cfg, kind):
    task = resolve_task(task_cfg)
    assert task.kind is kind
    assert task.is_regression is (kind is REGRESSION)


def test_custom_tasks_take_their_kind_from_task_type(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,1\nb,0\n", encoding="utf-8")
    for kind_name, kind in (("classification", CLASSIFICATION), ("regression", REGRESSION)):
        assert resolve_task(TaskConfig(type=kind_name, train_file=str(path), text_fields=["text"])).kind is kind


def test_what_each_kind_decides():
    assert (CLASSIFICATION.head, CLASSIFICATION.trainable, CLASSIFICATION.problem_type) == ("classifier", True, "single_label_classification")
    assert (REGRESSION.head, REGRESSION.trainable, REGRESSION.problem_type) == ("classifier", True, "regression")
    assert (LM_CHOICE.head, LM_CHOICE.trainable) == ("lm", False)
    assert features(resolve_task(TaskConfig(name="stsb")))["label"].dtype == "float32"
    assert features(resolve_task(TaskConfig(name="sst2")))["label"].dtype == "int64"


def test_the_lm_head_scores_multiple_choice_only():
    with pytest.raises(SpartaError, match=r"task.head=lm scores multiple choice \(mmlu\) only; sst2 needs task.head=classifier"):
        resolve_task(TaskConfig(name="sst2", head="lm"))
    with pytest.raises(SpartaError, match="nothing to train"):
        check_trainable(TaskConfig(name="mmlu", head="lm"))
    check_trainable(TaskConfig(name="mmlu"))


class _Agreement(Classification):
    """A kind of its own: one made-up metric, to show that nothing outside the kind tells kinds apart."""

    name = "agreement"

    def scores(self, task, predictions, labels, subjects):
        return {"agreement": float((predictions == labels).sum())}

    def metric_names(self, task):
        return ("agreement",)


def test_a_new_kind_is_asked_not_told_apart():
    task: Task = replace(resolve_task(TaskConfig(name="sst2")), kind=_Agreement())
    assert compute_metrics(task, np.array([1, 0, 1]), np.array([1, 1, 1])) == {"agreement": 2.0}
    assert selectable_metrics(task) == ("agreement", "loss")
