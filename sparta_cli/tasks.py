"""Tasks: which benchmark or user files a recipe names, and how their splits are read.

A split always comes back as a `datasets.Dataset` with the task's text columns (strings)
and `label` (class id, or float for regression; -1 on every row of an unlabelled test
split), plus `subject` for MMLU, whether it was read from a local copy or the Hub.

Local copies (`data.dir` or `$SPARTA_DATA_DIR`) may point at the data root or at the
GLUE folder itself:
  GLUE  <dir>/<GlueName>/ or <dir>/glue/<GlueName>/   (SST-2, CoLA, MNLI, ...) as GLUE ships it
  IMDB  <dir>/imdb/{train,test}.csv                    (text,label with 0 = neg, 1 = pos)
  MMLU  <dir>/mmlu/{dev,val,test}/<subject>_<split>.csv (hendrycks layout; train split:
        <dir>/mmlu/auxiliary_train/*.csv)
With no directory the same data comes from the Hugging Face Hub.

Split names follow the Hub. Aliases: mnli `validation`/`test` mean the matched halves,
imdb `validation` means `test` (IMDB has no dev set), mmlu `val` means `validation`.

MMLU prompts: with `task.head: classifier` a row is the question and its lettered
choices ending in "Answer:". With `task.head: lm` the prompt gets hendrycks' header line
and, on `validation`/`test`, the first `task.shots` dev questions of the same subject
as worked examples (dev rows are the shot pool and the auxiliary train set has no
subjects, so those splits never get shots).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from sparta_cli.config import TaskConfig, user_path
from sparta_cli.errors import SpartaError


@dataclass(frozen=True)
class Task:
    """What the rest of the program needs to know about a task, wherever its data lives."""

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None: regression (one output)
    main_metric: str
    eval_splits: tuple[str, ...]
    metric_suffixes: dict[str, str] = field(default_factory=dict)
    splits: tuple[str, ...] = ("train", "validation", "test")
    source: str = "custom"  # "glue", "imdb", "mmlu" or "custom"
    aliases: dict[str, str] = field(default_factory=dict)  # other accepted split name -> split
    files: dict[str, str] = field(default_factory=dict)  # custom: split -> path as the recipe gives it

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


# ---------------------------------------------------------------- task table


@dataclass(frozen=True)
class _Glue:
    """Where GLUE keeps a task's columns: by position, as GLUE's own processors read them."""

    folder: str
    text_fields: tuple[str, ...]  # the Hub's column names
    text_cols: tuple[int, ...]
    label_col: int
    test_cols: tuple[int, ...]  # test files have their own layout and always a header
    label_names: tuple[str, ...] | None
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

_GLUE_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "test": "test.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}

_MNLI_SPLITS = ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")

KNOWN_TASKS: tuple[str, ...] = (*_GLUE, "imdb", "mmlu")

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
_MMLU_SPLITS = {
    "train": ("auxiliary_train", "auxiliary_train"),
    "dev": ("dev", "dev"),
    "validation": ("val", "validation"),
    "test": ("test", "test"),
}

_HUB_GLUE = "nyu-mll/glue"
_HUB_IMDB = "stanfordnlp/imdb"
_HUB_MMLU = ("cais/mmlu", "all")


# ---------------------------------------------------------------- resolving


def _normalise(name: str) -> str:
    """`SST-2`, `sts_b` and `STSB` all name the same task."""
    return name.lower().replace("-", "").replace("_", "")


def resolve_task(task_cfg: TaskConfig) -> Task:
    """The Task a recipe's `task:` section names; custom tasks read their training file for the labels."""
    if task_cfg.type is not None:
        task = _custom_task(task_cfg)
    else:
        task = _named_task(str(task_cfg.name))
    if task_cfg.shots and (task.source != "mmlu" or task_cfg.head != "lm"):
        raise SpartaError(
            f"task.shots = {task_cfg.shots} only applies to mmlu with task.head: lm: "
            "set task.shots to 0 (or task.head to lm for mmlu)"
        )
    if task_cfg.train_split:
        train_split = _canonical_split(task, task_cfg.train_split)
        if train_split in task.eval_splits:
            raise SpartaError(
                f"task.train_split = {task_cfg.train_split} is also {task.name}'s evaluation split: "
                f"train on another split (one of {', '.join(s for s in task.splits if s not in task.eval_splits)})"
            )
        # "train" names the split a run trains on, wherever it is read
        task = replace(task, aliases={**task.aliases, "train": train_split})
    return task


def check_trainable(task_cfg: TaskConfig) -> None:
    """`sparta train` fits a classification head; `task.head: lm` only scores (with `sparta eval`)."""
    if task_cfg.head == "lm":
        raise SpartaError(
            "task.head: lm scores a model with its own next-token logits and has nothing to train: "
            "train with task.head: classifier, or score a base model with `sparta eval MODEL --task mmlu task.head=lm`"
        )


def _named_task(name: str) -> Task:
    key = _normalise(name)
    if key in _GLUE:
        spec = _GLUE[key]
        mnli = key == "mnli"
        return Task(
            name=key,
            text_fields=spec.text_fields,
            label_names=spec.label_names,
            main_metric=spec.main_metric,
            eval_splits=_MNLI_SPLITS[1:3] if mnli else ("validation",),
            metric_suffixes={"validation_mismatched": "_mm"} if mnli else {},
            splits=_MNLI_SPLITS if mnli else ("train", "validation", "test"),
            source="glue",
            # GLUE's own files call the validation split dev (dev.tsv, dev_matched.tsv)
            aliases={"validation": "validation_matched", "test": "test_matched", "dev": "validation_matched",
                     "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"} if mnli else {"dev": "validation"},
        )
    if key == "imdb":
        return Task("imdb", ("text",), ("neg", "pos"), "accuracy", ("test",), splits=("train", "test"),
                    source="imdb", aliases={"validation": "test"})
    if key == "mmlu":
        return Task("mmlu", ("prompt",), MMLU_CHOICES, "accuracy", ("validation",),
                    splits=tuple(_MMLU_SPLITS), source="mmlu", aliases={"val": "validation"})
    close = difflib.get_close_matches(key, KNOWN_TASKS, n=1, cutoff=0.4)
    hint = f"did you mean `{close[0]}`? " if close else ""
    raise SpartaError(
        f"unknown task `{name}`: {hint}known tasks are {', '.join(KNOWN_TASKS)}; "
        "for your own data set task.type, task.train_file and task.text_fields"
    )


def _custom_task(task_cfg: TaskConfig) -> Task:
    fields = tuple(task_cfg.text_fields or ())
    if len(fields) not in (1, 2):
        raise SpartaError(f"task.text_fields has {len(fields)} columns: give one or two, e.g. [sentence1, sentence2]")
    files = {
        split: path
        for split, path in (("train", task_cfg.train_file), ("validation", task_cfg.validation_file),
                            ("test", task_cfg.test_file))
        if path
    }
    regression = task_cfg.type == "regression"
    labels_from = "train" if "train" in files else "validation"
    return Task(
        name=task_cfg.label,
        text_fields=fields,
        label_names=None if regression else _discover_labels(task_cfg, labels_from, files[labels_from]),
        main_metric="combined_score" if regression else "accuracy",
        eval_splits=("validation",) if "validation" in files else (),
        splits=tuple(files),
        source="custom",
        files=files,
    )


def _discover_labels(task_cfg: TaskConfig, split: str, given: str) -> tuple[str, ...]:
    """Sorted distinct labels of the training file (numerically when they are all integers, so 0..10 keep order)."""
    path = _custom_path(split, given)
    header, rows = _read_table(path)
    _require_columns(path, header, tuple(task_cfg.text_fields or ()), "task.text_fields")
    _require_columns(path, header, (task_cfg.label_field,), "task.label_field")
    found: set[str] = set()
    for line, record in rows:
        text = _label_text(record.get(task_cfg.label_field), path, line)
        if not text:
            raise SpartaError(f"{path} line {line}: the label is empty: fill it in or remove that row")
        found.add(text)
    if len(found) < 2:
        raise SpartaError(
            f"{path} has {len(found)} distinct label(s) in column `{task_cfg.label_field}`: classification "
            "needs at least two; check task.label_field or use task.type: regression"
        )
    numeric = all(text.lstrip("-").isdigit() for text in found)
    return tuple(sorted(found, key=int if numeric else None))


def split_names(task: Task) -> tuple[str, ...]:
    """Splits that exist for the task (without aliases)."""
    return task.splits


def _canonical_split(task: Task, split: str) -> str:
    split = task.aliases.get(split, split)
    if split in task.splits:
        return split
    if task.source == "custom" and split in ("train", "validation", "test"):
        raise SpartaError(f"task {task.name} has no {split} split: set task.{split}_file")
    raise SpartaError(f"task {task.name} has no `{split}` split: use one of {', '.join(task.splits)}")


# ---------------------------------------------------------------- loading


def check_split_files(task: Task, task_cfg: TaskConfig, splits: Sequence[str], data_dir: Path | None) -> None:
    """The files the splits are read from exist (the same lookups as load_split, without reading
    them), so a missing GLUE folder fails before a model loads. The Hub is not checked offline."""
    for split in splits:
        split = _canonical_split(task, split)
        if task.source == "custom":
            _custom_path(split, task.files[split])
        elif data_dir is None:
            continue
        elif task.source == "mmlu":
            _local_folder(data_dir, (data_dir / "mmlu",), "MMLU folder mmlu/")
        elif task.source == "glue":
            _glue_path(task, split, data_dir)
        else:
            _imdb_path(split, data_dir)


def load_split(task: Task, task_cfg: TaskConfig, split: str, data_dir: Path | None) -> datasets.Dataset:
    """One split as a Dataset of the task's text columns and `label` (-1 where a test split has none)."""
    split = _canonical_split(task, split)
    if task.source == "custom":
        columns = _custom_columns(task, task_cfg, split)
    elif task.source == "mmlu":
        columns = _mmlu_columns(task_cfg, split, data_dir)
    elif data_dir is None:
        return _hub_split(task, split)
    elif task.source == "glue":
        columns = _glue_columns(task, split, data_dir)
    else:
        columns = _imdb_columns(task, split, data_dir)
    features = _features(task)
    # Straight to Arrow: from_dict(features=...) encodes cell by cell, seconds for SST-2.
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def _features(task: Task) -> datasets.Features:
    columns = {name: datasets.Value("string") for name in task.text_fields}
    if task.source == "mmlu":
        columns["subject"] = datasets.Value("string")
    columns["label"] = datasets.Value("float32" if task.is_regression else "int64")
    return datasets.Features(columns)


def _hub_split(task: Task, split: str) -> datasets.Dataset:
    """GLUE or IMDB from the Hub, trimmed and typed like a local copy."""
    repo, config = (_HUB_GLUE, task.name) if task.source == "glue" else (_HUB_IMDB, None)
    dataset = _from_hub(repo, config, split)
    return dataset.select_columns([*task.text_fields, "label"]).cast(_features(task))


def _from_hub(repo: str, config: str | None, split: str) -> datasets.Dataset:
    what = f"{repo} ({config})" if config else repo
    try:
        return datasets.load_dataset(repo, config, split=split)
    except ConnectionError:
        raise SpartaError(
            f"cannot download {what} from the Hugging Face Hub: no internet: "
            "set data.dir or $SPARTA_DATA_DIR to a local copy"
        ) from None
    except (OSError, ValueError) as exc:  # missing repo or split, HTTP errors, a bad cache
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SpartaError(
            f"cannot load {what} split {split} from the Hugging Face Hub ({reason}): "
            "check your connection, or set data.dir or $SPARTA_DATA_DIR to a local copy"
        ) from None


def _local_folder(data_dir: Path, candidates: Sequence[Path], what: str) -> Path:
    if not data_dir.is_dir():
        raise SpartaError(f"data dir {data_dir} does not exist: fix data.dir or $SPARTA_DATA_DIR")
    for folder in candidates:
        if folder.is_dir():
            return folder
    looked = " and ".join(str(folder) for folder in candidates)
    raise SpartaError(
        f"{what} not found: looked for {looked}; set data.dir or $SPARTA_DATA_DIR to the folder that holds it, "
        "or unset both to download from the Hugging Face Hub"
    )


def _require_file(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise SpartaError(f"{path} not found: {fix}")
    return path


def _read_text(path: Path) -> str:
    """The whole file, a leading BOM dropped; bad bytes are reported by line so they can be found."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpartaError(f"{path} is not UTF-8 text (bad byte on line {line}): re-save the file as UTF-8") from None


def _no_rows(path: Path) -> SpartaError:
    return SpartaError(f"{path} has no data rows: use a complete copy of the file")


def _label_text(value: Any, path: Path, line: int) -> str:
    """A label cell as text, one spelling per class: JSON's 1 and 1.0 (or a CSV's "1.0") are both "1"."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise SpartaError(f"{path} line {line}: label {json.dumps(value)[:40]} is a {'list' if isinstance(value, list) else 'JSON object'}: "
                          "labels must be plain numbers or strings; fix that row")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SpartaError(f"{path} line {line}: label {value} is not a finite number: fix or remove that row")
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    return re.sub(r"^(-?\d+)\.0+$", r"\1", text)


def _label_parser(task: Task, path: Path, keys: Mapping[str, int] | None, required: bool) -> Callable[[Any, int], float]:
    """Turns a label cell into a class id (via `keys`) or a float (regression); blanks are -1 unless required."""

    def parse(value: Any, line: int) -> float:
        text = _label_text(value, path, line)
        if not text and not required:
            return -1
        if keys is None:
            try:
                return float(text)
            except ValueError:
                raise SpartaError(
                    f"{path} line {line}: label {text!r} is not a number ({task.name} is a regression task): "
                    "fix or remove that row"
                ) from None
        if text not in keys:
            raise SpartaError(
                f"{path} line {line}: label {text!r} is not one of {task.name}'s labels ({', '.join(keys)}): "
                "fix or remove that row"
            )
        return keys[text]

    return parse


# ---------------------------------------------------------------- GLUE


def _glue_path(task: Task, split: str, data_dir: Path) -> Path:
    spec = _GLUE[task.name]
    folder = _local_folder(data_dir, (data_dir / spec.folder, data_dir / "glue" / spec.folder),
                           f"GLUE folder {spec.folder}/")
    return _require_file(
        folder / _GLUE_FILES[split],
        f"copy GLUE's {_GLUE_FILES[split]} into {folder}, or unset data.dir and $SPARTA_DATA_DIR "
        f"to download {task.name} from the Hugging Face Hub",
    )


def _glue_columns(task: Task, split: str, data_dir: Path) -> dict[str, list[Any]]:
    spec = _GLUE[task.name]
    path = _glue_path(task, split, data_dir)
    test = split.startswith("test")
    cols = spec.test_cols if test else spec.text_cols
    needed = _fields_needed(spec, test)
    parse = _label_parser(task, path, _glue_label_keys(spec), required=True)
    columns: dict[str, list[Any]] = {name: [] for name in spec.text_fields}
    labels: list[float] = []
    # GLUE quotes nothing, and sentences hold quote characters: split on tabs, never parse CSV quoting.
    lines = _read_text(path).split("\n")
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
        raise _no_rows(path)
    columns["label"] = labels
    return columns


def _glue_label_keys(spec: _Glue) -> dict[str, int] | None:
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


# ---------------------------------------------------------------- tables: IMDB and custom files


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Column names and (line number, record) pairs of a CSV, TSV (GLUE-style, no quoting) or JSONL file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise SpartaError(f"{path}: unknown file type `{suffix}`: use .csv, .tsv or .jsonl")
    text = _read_text(path)
    if suffix == ".jsonl":
        return _jsonl_records(path, text)
    if suffix == ".tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        rows = []
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                raise SpartaError(
                    f"{path} line {reader.line_num}: {len(cells)} fields but the header has {len(header)}: "
                    "fix that row (TSV files are read without quoting)"
                )
            rows.append((reader.line_num, dict(zip(header, cells))))
    except csv.Error as exc:
        raise SpartaError(f"{path} line {reader.line_num}: malformed {suffix[1:].upper()} ({exc}): fix that row") from None
    if not rows:
        raise _no_rows(path)
    return header, rows


def _jsonl_records(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpartaError(f"{path} line {number}: invalid JSON ({exc.msg}): fix that line") from None
        if not isinstance(record, dict):
            raise SpartaError(f"{path} line {number}: expected a JSON object per line, e.g. {{\"text\": ..., \"label\": ...}}")
        rows.append((number, record))
    if not rows:
        raise _no_rows(path)
    return list(rows[0][1]), rows


def _require_columns(path: Path, header: Sequence[str], names: Sequence[str], setting: str) -> None:
    for name in names:
        if name not in header:
            raise SpartaError(
                f"{path} has no column `{name}` (it has: {', '.join(header)}): fix {setting} or the file"
            )


def _table_columns(task: Task, path: Path, label_field: str, keys: Mapping[str, int] | None,
                   required: bool) -> dict[str, list[Any]]:
    """Text and label columns of a table; a test file may leave the label column out (all -1)."""
    header, rows = _read_table(path)
    _require_columns(path, header, task.text_fields, "task.text_fields")
    if required:
        _require_columns(path, header, (label_field,), "task.label_field")
    parse = _label_parser(task, path, keys, required)
    columns: dict[str, list[Any]] = {name: [] for name in task.text_fields}
    labels: list[float] = []
    for line, record in rows:
        for name in task.text_fields:
            value = record.get(name)
            if value is None or isinstance(value, (dict, list)):
                raise SpartaError(f"{path} line {line}: `{name}` is missing or not text: fix that row")
            columns[name].append(value if isinstance(value, str) else str(value))
        labels.append(parse(record.get(label_field), line))
    columns["label"] = labels
    return columns


def _imdb_path(split: str, data_dir: Path) -> Path:
    folder = _local_folder(data_dir, (data_dir / "imdb",), "IMDB folder imdb/")
    return _require_file(folder / f"{split}.csv", "copy the IMDB train.csv/test.csv (text,label) there")


def _imdb_columns(task: Task, split: str, data_dir: Path) -> dict[str, list[Any]]:
    return _table_columns(task, _imdb_path(split, data_dir), "label", {"0": 0, "1": 1}, required=True)


def _custom_path(split: str, given: str) -> Path:
    path = user_path(given, f"task.{split}_file")
    if not path.is_file():
        raise SpartaError(
            f"task.{split}_file {path} not found (relative paths start at the current folder {Path.cwd()}): fix the path"
        )
    return path


def _custom_columns(task: Task, task_cfg: TaskConfig, split: str) -> dict[str, list[Any]]:
    path = _custom_path(split, task.files[split])
    keys = None if task.label_names is None else {name: i for i, name in enumerate(task.label_names)}
    return _table_columns(task, path, task_cfg.label_field, keys, required=split != "test")


# ---------------------------------------------------------------- MMLU


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


def _mmlu_columns(task_cfg: TaskConfig, split: str, data_dir: Path | None) -> dict[str, list[Any]]:
    rows = _mmlu_rows(split, data_dir)
    lm = task_cfg.head == "lm"
    pool: dict[str, list[dict[str, Any]]] = {}
    if lm and task_cfg.shots and split in ("validation", "test"):
        for shot in _mmlu_rows("dev", data_dir):
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


def _mmlu_rows(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
    """Rows with the Hub's fields (question, choices, answer, subject), local or downloaded."""
    folder_name, hub_split = _MMLU_SPLITS[split]
    if data_dir is None:
        return _from_hub(*_HUB_MMLU, hub_split).select_columns(["question", "choices", "answer", "subject"]).to_list()
    root = _local_folder(data_dir, (data_dir / "mmlu",), "MMLU folder mmlu/")
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
    rows: list[dict[str, Any]] = []
    for subject, path in files:
        _require_file(path, f"copy hendrycks' {folder_name}/ files (all 57 subjects) into {folder}")
        rows.extend(_mmlu_file(path, subject))
    return rows


def _mmlu_file(path: Path, subject: str) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
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
        raise _no_rows(path)
    return rows
