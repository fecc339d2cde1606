"""Reading the files tasks come from (GLUE's TSVs, IMDB's and MMLU's CSVs, your own CSV, TSV and
JSONL), with every problem a one-line error naming the file, the line and the fix.

A path is opened only when it is a regular file: a FIFO or a device is named as such and never read
(reading one blocks or never ends). Files are UTF-8 (a BOM is dropped). A CSV field may be as long
as the file (Python's csv module stops at 128 KiB); `data.max_length` decides what the model sees.

Labels: a cell is text, one spelling per class (JSON's 1 and 1.0, a CSV's "1.0", are all "1"). A
label that is a plain integer (ASCII digits, an optional minus) is a class number and sorts as one;
anything else (`1e3`, `٣`, `1_000`) is a label name, compared as written. A regression label is a
finite number written in ASCII (`2.5`, `1e-3`; not `nan`, `inf` or `٣`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import describe, input_file, read_text
from sparta_cli.tasks.base import Task

PLAIN_INTEGER = re.compile(r"-?[0-9]+")
PLAIN_NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
CSV_FIELD_LIMIT_MAX = 2**31 - 1  # csv.field_size_limit takes a C long: 32 bits on Windows


def csv_reader(text: str, **options: Any) -> Any:
    """A csv.reader over `text` that takes fields as long as the text itself."""
    csv.field_size_limit(max(csv.field_size_limit(), min(len(text) + 1, CSV_FIELD_LIMIT_MAX)))
    return csv.reader(io.StringIO(text, newline=""), **options)


def no_rows(path: Path) -> SpartaError:
    return SpartaError(f"{path} has no data rows: use a complete copy of the file")


def local_folder(data_dir: Path, candidates: Sequence[Path], what: str) -> Path:
    """The first of `candidates` that is a folder, or a one-line error saying where it looked."""
    if not data_dir.is_dir():
        state = f"is {describe(data_dir.stat().st_mode)}" if data_dir.exists() else "does not exist"
        raise SpartaError(f"data dir {data_dir} {state}: fix data.dir or $SPARTA_DATA_DIR")
    for folder in candidates:
        if folder.is_dir():
            return folder
    looked = " and ".join(str(folder) for folder in candidates)
    raise SpartaError(
        f"{what} not found: looked for {looked}; set data.dir or $SPARTA_DATA_DIR to the folder that holds it, "
        "or unset both to download from the Hugging Face Hub"
    )


def require_file(path: Path, fix: str) -> Path:
    """A data dir's file (GLUE's dev.tsv, IMDB's train.csv, ...), a regular file."""
    return input_file(path, f"{path} not found: {fix}", fix)


# ---------------------------------------------------------------- tables


def read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Column names and (line number, record) pairs of a CSV, TSV (GLUE-style, no quoting) or JSONL file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise SpartaError(f"{path}: unknown file type `{suffix}`: use .csv, .tsv or .jsonl")
    text = read_text(path)
    if suffix == ".jsonl":
        return _jsonl_records(path, text)
    reader = csv_reader(text, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else csv_reader(text)
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
        raise no_rows(path)
    return header, rows


def json_kind(value: Any) -> str:
    """What a decoded JSON value is, in the file's terms, for a one-line error."""
    return {dict: "JSON object", list: "list", str: "string", bool: "true/false", int: "number", float: "number",
            type(None): "null value"}.get(type(value), type(value).__name__)


def parse_json_text(text: str) -> Any:
    """json.loads, with every way a text fails (bad syntax, a number past Python's digit limit, nesting
    past the interpreter's depth) as a ValueError whose text is the reason, for a one-line error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg) from None
    except ValueError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None
    except RecursionError:
        raise ValueError("nested too deeply to read") from None


def holds_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds text with an unpaired UTF-16 surrogate (JSON's `\\ud800` escape,
    or a command-line argument's undecodable bytes): text that no tokenizer or encoder takes."""
    values = [value]
    while values:  # no recursion: a decoded value may nest nearly as deep as the interpreter allows
        item = values.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            values += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            values += item
    return False


NOT_UNICODE = "holds text that is not valid Unicode (an unpaired \\ud800-\\udfff surrogate)"


def _jsonl_records(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = parse_json_text(line)
        except ValueError as exc:
            raise SpartaError(f"{path} line {number}: invalid JSON ({exc}): fix that line") from None
        if not isinstance(record, dict):
            raise SpartaError(f"{path} line {number}: holds a {json_kind(record)}, not a JSON object: write "
                              "one object per line, its fields named as the task reads them (e.g. {\"text\": ..., \"label\": ...}, "
                              "or {\"messages\": [...]} for SFT)")
        if holds_lone_surrogate(record):
            raise SpartaError(f"{path} line {number}: {NOT_UNICODE}: fix that line")
        rows.append((number, record))
    if not rows:
        raise no_rows(path)
    return list(rows[0][1]), rows


def require_columns(path: Path, header: Sequence[str], names: Sequence[str], setting: str) -> None:
    for name in names:
        if name not in header:
            raise SpartaError(
                f"{path} has no column `{name}` (it has: {', '.join(header)}): fix {setting} or the file"
            )


def table_columns(task: Task, path: Path, label_field: str, keys: Mapping[str, int] | None,
                  required: bool) -> dict[str, list[Any]]:
    """Text and label columns of a table; a test file may leave the label column out (all -1)."""
    header, rows = read_table(path)
    require_columns(path, header, task.text_fields, "task.text_fields")
    if required:
        require_columns(path, header, (label_field,), "task.label_field")
    parse = label_parser(task, path, keys, required)
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


# ---------------------------------------------------------------- labels


def label_text(value: Any, path: Path, line: int) -> str:
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
    return re.sub(r"^(-?[0-9]+)\.0+$", r"\1", text)


def sorted_labels(found: set[str]) -> tuple[str, ...]:
    """Class order: numerically when every label is a plain integer (so 0..10 keep order), else as text."""
    if all(PLAIN_INTEGER.fullmatch(text) for text in found):
        return tuple(sorted(found, key=int))
    return tuple(sorted(found))


def label_parser(task: Task, path: Path, keys: Mapping[str, int] | None, required: bool) -> Callable[[Any, int], float]:
    """Turns a label cell into a class id (via `keys`) or a float (regression); blanks are -1 unless required."""

    def parse(value: Any, line: int) -> float:
        text = label_text(value, path, line)
        if not text and not required:
            return -1
        if keys is None:
            if not PLAIN_NUMBER.fullmatch(text):
                raise SpartaError(
                    f"{path} line {line}: label {text!r} is not a number ({task.name} is a regression task): "
                    "fix or remove that row"
                )
            number = float(text)
            if not math.isfinite(number):
                raise SpartaError(f"{path} line {line}: label {text} is not a finite number: fix or remove that row")
            return number
        if text not in keys:
            raise SpartaError(
                f"{path} line {line}: label {text!r} is not one of {task.name}'s labels ({', '.join(keys)}): "
                "fix or remove that row"
            )
        return keys[text]

    return parse
