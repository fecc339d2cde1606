"""SFT tasks (`task.type: sft`, kind SFT): your own chat / prompt_completion / text files
(`task.train_file`, `validation_file`, `test_file`; CSV, TSV, JSONL or Parquet, read and validated by
sparta_cli/sft/formats.py), or a built-in task rendered as chat (`task.name: sst2` or `mmlu`): a
user turn of `task.instruction` and the row, and the answer as the assistant's turn (SST-2's label
name, MMLU's letter).

A split comes back as a Dataset of `where` (file and line, for errors) and `row` (the validated row
as JSON); `rows` turns it back into `SftRow`s for tokenisation (data.py), so a built-in task's rows
pass the same checks as a file's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets

import sparta_cli.tasks.glue as glue
import sparta_cli.tasks.mmlu as mmlu
from sparta_cli.config import TaskConfig
from sparta_cli.errors import SpartaError
from sparta_cli.tasks.base import Task, normalise
from sparta_cli.tasks.custom import split_path
from sparta_cli.tasks.kinds import SFT_KIND

_TYPES = "CSV, TSV, JSONL or Parquet"
NAMES: tuple[str, ...] = ()  # chosen by task.type: sft, never by name
BUILT_IN = {"sst2": glue, "mmlu": mmlu}  # the tasks that render as chat, and their families
INSTRUCTIONS = {
    "sst2": "Is the sentiment of this sentence positive or negative? Answer with one word.",
    "mmlu": "The following is a multiple choice question about {subject}. Answer with the letter of the correct choice.",
}


def task(key: str, task_cfg: TaskConfig) -> Task:
    if task_cfg.from_files:
        files = {split: path for split, path in (("train", task_cfg.train_file), ("validation", task_cfg.validation_file),
                                                 ("test", task_cfg.test_file)) if path}
        return Task(name=task_cfg.label, kind=SFT_KIND, text_fields=(), label_names=None, main_metric="loss",
                    eval_splits=("validation",) if "validation" in files else (), splits=tuple(files), source="sft", files=files)
    base = _base_task(task_cfg)
    return Task(name=base.name, kind=SFT_KIND, text_fields=(), label_names=None, main_metric="loss",
                eval_splits=base.eval_splits, metric_suffixes=base.metric_suffixes, splits=base.splits, source="sft",
                aliases=base.aliases, based_on=base.name)


def _base_task(task_cfg: TaskConfig) -> Task:
    key = normalise(str(task_cfg.name))
    if key not in BUILT_IN:
        raise SpartaError(f"task.type: sft reads task.train_file and task.validation_file, or renders a built-in task as chat "
                          f"({', '.join(BUILT_IN)}); `{task_cfg.name}` is neither: set the files, or task.name to one of those")
    return BUILT_IN[key].task(key, _as_classification(task_cfg))


def _as_classification(task_cfg: TaskConfig) -> TaskConfig:
    return TaskConfig(name=task_cfg.name, train_split=task_cfg.train_split)


def check(task: Task, split: str, data_dir: Path | None) -> None:
    if task.based_on is None:
        split_path(split, task.files[split], _TYPES)
    else:
        BUILT_IN[task.based_on].check(_base_for(task), split, data_dir)


def _base_for(task: Task) -> Task:
    return BUILT_IN[str(task.based_on)].task(str(task.based_on), TaskConfig(name=task.based_on))


def read(task: Task, task_cfg: TaskConfig, split: str, data_dir: Path | None) -> datasets.Dataset:
    """The split's rows, every one validated (sft.parse_records), as `where` and `row` (JSON) columns."""
    from sparta_cli.sft import parse_records, read_sft_file

    if task.based_on is None:
        data = read_sft_file(split_path(split, task.files[split], _TYPES), task_cfg.format)
    else:
        base = _base_for(task)
        records = chat_records(task, task_cfg, split, BUILT_IN[task.based_on].read(base, _as_classification(task_cfg), split, data_dir))
        data = parse_records(records, "chat", f"{task.name}/{split}")
    return datasets.Dataset.from_dict({
        "where": [row.where for row in data.rows],
        "row": [json.dumps({"messages": list(row.messages) if row.messages is not None else None, "prompt_messages": row.prompt_messages,
                            "prompt": row.prompt, "completion": row.completion}) for row in data.rows],
    })


def rows(dataset: datasets.Dataset) -> list[Any]:
    """The `SftRow`s of a split `read` returned (after any subsampling)."""
    from sparta_cli.sft import SftRow

    out = []
    for where, text in zip(dataset["where"], dataset["row"]):
        fields = json.loads(text)
        messages = tuple(fields["messages"]) if fields["messages"] is not None else None
        out.append(SftRow(where, messages=messages, prompt_messages=fields["prompt_messages"], prompt=fields["prompt"],
                          completion=fields["completion"]))
    return out


def chat_records(task: Task, task_cfg: TaskConfig, split: str, rows: datasets.Dataset) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """A built-in task's rows as chat: the user asks (`task.instruction`, then the row), the assistant
    answers with the label's name (SST-2) or letter (MMLU). `{subject}` in an instruction is MMLU's subject."""
    base = _base_for(task)
    instruction = task_cfg.instruction if task_cfg.instruction is not None else INSTRUCTIONS[str(task.based_on)]
    text_field = base.text_fields[0]
    subjects = rows["subject"] if "subject" in rows.column_names else [""] * len(rows)
    for number, (text, label, subject) in enumerate(zip(rows[text_field], rows["label"], subjects), 1):
        where = f"{task.name}/{split} row {number}"
        if label < 0:
            raise SpartaError(f"{where} has no label (an unlabelled test split): there is no answer to train on or score; "
                              "use a labelled split such as validation")
        ask = instruction.replace("{subject}", str(subject).replace("_", " "))
        yield where, {"messages": [{"role": "user", "content": f"{ask}\n\n{text}" if ask else text},
                                   {"role": "assistant", "content": (base.label_names or ())[label]}]}
