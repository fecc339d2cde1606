"""MMLU (hendrycks' 57 subjects): `<dir>/mmlu/{dev,val,test}/<subject>_<split>.csv` (the train split:
`<dir>/mmlu/auxiliary_train/*.csv`) or the Hub's cais/mmlu. `val` means `validation`.

Prompts: with `task.head: classifier` (kind CLASSIFICATION) a row is the question and its lettered
choices ending in "Answer:". With `task.head: lm` (kind LM_CHOICE, scored by the model's own
next-token logits over the letters) the prompt gets hendrycks' header line and, on
`validation`/`test`, the first `task.shots` dev questions of the same subject as worked examples
(dev rows are the shot pool and the auxiliary train set has no subjects, so those splits never get shots).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from sparta_cli.config import TaskConfig
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import read_text
from sparta_cli.tasks.base import Task, as_dataset
from sparta_cli.tasks.files import csv_reader, local_folder, no_rows, require_file
from sparta_cli.tasks.hub import from_hub
from sparta_cli.tasks.kinds import CLASSIFICATION, LM_CHOICE

NAMES: tuple[str, ...] = ("mmlu",)

MMLU_CHOICES: tuple[str, ...] = ("A", "B", "C", "D")

# hendrycks' categories.py, subcategory folded into its category (18 STEM, 13 humanities,
# 12 social sciences, 14 other).
MMLU_CATEGORIES: dict[str, str] = {
    "abstract_algebra": "STEM",
    "anatomy": "other",
    "astronomy": "STEM",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "STEM",
    "college_chemistry": "STEM",
    "college_computer_science": "STEM",
    "college_mathematics": "STEM",
    "college_medicine": "other",
    "college_physics": "STEM",
    "computer_security": "STEM",
    "conceptual_physics": "STEM",
    "econometrics": "social sciences",
    "electrical_engineering": "STEM",
    "elementary_mathematics": "STEM",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "STEM",
    "high_school_chemistry": "STEM",
    "high_school_computer_science": "STEM",
    "high_school_european_history": "humanities",
    "high_school_geography": "social sciences",
    "high_school_government_and_politics": "social sciences",
    "high_school_macroeconomics": "social sciences",
    "high_school_mathematics": "STEM",
    "high_school_microeconomics": "social sciences",
    "high_school_physics": "STEM",
    "high_school_psychology": "social sciences",
    "high_school_statistics": "STEM",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "STEM",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social sciences",
    "public_relations": "social sciences",
    "security_studies": "social sciences",
    "sociology": "social sciences",
    "us_foreign_policy": "social sciences",
    "virology": "other",
    "world_religions": "humanities",
}

# split -> (local folder under mmlu/, Hub split of cais/mmlu)
_SPLITS = {
    "train": ("auxiliary_train", "auxiliary_train"),
    "dev": ("dev", "dev"),
    "validation": ("val", "validation"),
    "test": ("test", "test"),
}

_HUB = ("cais/mmlu", "all")


def task(key: str, task_cfg: TaskConfig) -> Task:
    return Task("mmlu", LM_CHOICE if task_cfg.head == LM_CHOICE.head else CLASSIFICATION, ("prompt",), MMLU_CHOICES, "accuracy",
                ("validation",), splits=tuple(_SPLITS), source="mmlu", aliases={"val": "validation"},
                subject_categories=MMLU_CATEGORIES)


def check(task: Task, split: str, data_dir: Path | None) -> None:
    if data_dir is not None:
        for _ in _split_files(split, data_dir):
            pass


def read(task: Task, task_cfg: TaskConfig, split: str, data_dir: Path | None) -> datasets.Dataset:
    return as_dataset(task, _columns(task, task_cfg, split, data_dir))


def format_mmlu_prompt(question: str, choices: Sequence[str], answer: int | None = None) -> str:
    """One question as hendrycks' `format_example` writes it; `answer` (0..3) fills in a worked example."""
    lines = [question, *(f"{letter}. {choice}" for letter, choice in zip(MMLU_CHOICES, choices))]
    prompt = "\n".join(lines) + "\nAnswer:"
    return prompt if answer is None else f"{prompt} {MMLU_CHOICES[answer]}"


def mmlu_prompt_with_shots(row: Mapping[str, Any], shots_rows: Sequence[Mapping[str, Any]]) -> str:
    """hendrycks' k-shot prompt: header, the worked `shots_rows`, then `row` ending in "Answer:".

    Rows use the Hub's cais/mmlu fields: question, choices (4 strings), answer (0..3), subject.
    """
    subject = str(row["subject"]).replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    shots = "".join(
        format_mmlu_prompt(shot["question"], shot["choices"], shot["answer"]) + "\n\n" for shot in shots_rows
    )
    return header + shots + format_mmlu_prompt(row["question"], row["choices"])


def _columns(task: Task, task_cfg: TaskConfig, split: str, data_dir: Path | None) -> dict[str, list[Any]]:
    rows = _rows(split, data_dir)
    lm = task.kind is LM_CHOICE
    pool: dict[str, list[dict[str, Any]]] = {}
    if lm and task_cfg.shots and split in ("validation", "test"):
        for shot in _rows("dev", data_dir):
            pool.setdefault(shot["subject"], []).append(shot)

    def prompt(row: dict[str, Any]) -> str:
        if lm and row["subject"] in MMLU_CATEGORIES:
            return mmlu_prompt_with_shots(row, pool.get(row["subject"], [])[: task_cfg.shots])
        return format_mmlu_prompt(row["question"], row["choices"])

    return {
        "prompt": [prompt(row) for row in rows],
        "subject": [row["subject"] for row in rows],
        "label": [row["answer"] for row in rows],
    }


def _rows(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
    """Rows with the Hub's fields (question, choices, answer, subject), local or downloaded."""
    if data_dir is None:
        return from_hub(*_HUB, _SPLITS[split][1]).select_columns(["question", "choices", "answer", "subject"]).to_list()
    return [row for subject, path in _split_files(split, data_dir) for row in _file(path, subject)]


def _split_files(split: str, data_dir: Path) -> Iterator[tuple[str, Path]]:
    """(subject, CSV) of a local split, each checked to be there as it comes: hendrycks' layout, one CSV
    a subject (auxiliary_train's files are its sources, each read as its own subject)."""
    folder_name = _SPLITS[split][0]
    root = local_folder(data_dir, (data_dir / "mmlu",), "MMLU folder mmlu/")
    folder = root / folder_name
    if split == "train":
        if not folder.is_dir():
            raise SpartaError(
                f"{folder} not found: this MMLU copy has no train split; copy hendrycks' auxiliary_train/ "
                "CSVs there, or unset data.dir and $SPARTA_DATA_DIR to use the Hub"
            )
        files = [(path.stem, path) for path in sorted(folder.glob("*.csv"))]
        if not files:
            raise SpartaError(f"{folder} holds no .csv files: copy hendrycks' auxiliary_train/ CSVs there")
    else:
        files = [(subject, folder / f"{subject}_{folder_name}.csv") for subject in sorted(MMLU_CATEGORIES)]
    for subject, path in files:
        yield subject, require_file(path, f"copy hendrycks' {folder_name}/ files (all 57 subjects) into {folder}")


def _file(path: Path, subject: str) -> list[dict[str, Any]]:
    reader = csv_reader(read_text(path))
    rows = []
    for cells in reader:
        if not cells:
            continue
        if len(cells) != 6 or cells[5].strip() not in MMLU_CHOICES:
            raise SpartaError(
                f"{path} line {reader.line_num}: expected question,A,B,C,D,answer with answer one of A-D: "
                "fix that row"
            )
        rows.append({
            "question": cells[0],
            "choices": cells[1:5],
            "answer": MMLU_CHOICES.index(cells[5].strip()),
            "subject": subject,
        })
    if not rows:
        raise no_rows(path)
    return rows
