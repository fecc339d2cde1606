"""SFT rows in the formats TRL names, read from CSV / TSV / JSONL / Parquet and validated row by row.

  chat               {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
  prompt_completion  {"prompt": "...", "completion": "..."}, or both as message lists (the completion
                     holding the assistant's turns)
  text               {"text": "..."}

A file holds one format; `format` may be left out when the fields say which. Every row is checked
here, before a tokenizer or a model loads, so a bad row is a one-line error naming the file, the
line and the fix. In a CSV a `messages` cell holds the list as JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sparta_cli.errors import SpartaError
from sparta_cli.tasks.files import NOT_UNICODE, holds_lone_surrogate, json_kind, no_rows, parse_json_text, read_table

Format = Literal["chat", "prompt_completion", "text"]
FORMATS: tuple[str, ...] = ("chat", "prompt_completion", "text")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
_FIELDS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


@dataclass(frozen=True)
class SftRow:
    """One validated row, in the two shapes tokenisation needs.

    A conversation (`messages` set): chat rows, and prompt_completion rows given as message lists, whose
    first `prompt_messages` messages are the prompt and are never supervised. Plain text (`messages`
    None): `prompt` then `completion`, concatenated; a text row is a completion with an empty prompt.
    `where` ("file line N") lets a later error, from the chat template say, point at the row.
    """

    where: str
    messages: tuple[dict[str, str], ...] | None = None
    prompt_messages: int = 0
    prompt: str = ""
    completion: str = ""


@dataclass(frozen=True)
class SftData:
    format: str  # one of FORMATS
    rows: tuple[SftRow, ...]

    @property
    def conversational(self) -> bool:
        """Whether the rows need a chat template."""
        return bool(self.rows) and self.rows[0].messages is not None


@dataclass(frozen=True)
class Rendering:
    """How a split's rows became text: what a run records of its training rows, so that `sparta generate`
    and `sparta serve` render a prompt as training rendered it."""

    format: str  # one of FORMATS, as the rows were read (declared, or told by their fields)
    chat: bool  # through the chat template (chat rows, prompt_completion message lists); else plain text

    @classmethod
    def of(cls, rows: Sequence[SftRow], declared: str | None = None) -> Rendering:
        """The rendering of a file's rows (one format a file: `parse_records`): the `declared` format
        (task.format), else the one their shape tells; a prompt_completion row with an empty prompt reads
        as a text row then, and trains the same (on the whole text)."""
        first = rows[0]
        if first.messages is not None:
            return cls(declared or ("prompt_completion" if first.prompt_messages else "chat"), chat=True)
        return cls(declared or ("prompt_completion" if first.prompt else "text"), chat=False)


def read_sft_file(path: Path, format: Format | None = None) -> SftData:
    """Every row of a CSV / TSV / JSONL / Parquet file, validated; `format` None: read from the fields."""
    return parse_records(((f"{path} {place}", record) for place, record in _records(path)), format, str(path))


def parse_records(records: Iterable[tuple[str, Mapping[str, Any]]], format: Format | None = None,
                  source: str = "the data") -> SftData:
    """Validated rows from (where, record) pairs: a file's rows, or records a built-in task made.

    One format for all rows: the declared one, else the first row's; a row of another is an error."""
    if format is not None and format not in FORMATS:
        raise SpartaError(f"task.format {format!r} is not one of {', '.join(FORMATS)}: fix task.format")
    rows: list[SftRow] = []
    first: tuple[str, str] | None = None  # (kind, where) of the first row, kind telling strings from message lists
    for where, record in records:
        row_format = format or _detect(record, where)
        row = _parse(record, row_format, where)
        kind = row_format if row_format != "prompt_completion" else f"prompt_completion with {_prompt_kind(row)}"
        if first is None:
            first = (kind, where)
        elif kind != first[0]:
            raise SpartaError(f"{where}: this row is {kind} but {first[1]} is {first[0]}: one format per file; "
                              "convert the odd rows or split the file")
        rows.append(row)
    if first is None:
        raise SpartaError(f"{source} has no data rows: use a complete copy of the file")
    return SftData(format=format or first[0].split(" ")[0], rows=tuple(rows))


def read_prompt_file(path: Path, chat: bool | None) -> list[SftRow]:
    """The rows of a file to generate from (`sparta generate --file`), validated; see `parse_prompts`."""
    return parse_prompts(((f"{path} {place}", record) for place, record in _records(path)), chat, str(path))


def parse_prompts(records: Iterable[tuple[str, Mapping[str, Any]]], chat: bool | None, source: str = "the prompts") -> list[SftRow]:
    """Rows to generate from, each a prompt only (`prompt_messages` covers every message):

      {"prompt": "..."}          a user turn when `chat` (the model has a chat template), else the text as is
      {"prompt": [messages]}     a conversation ending in a user turn
      {"messages": [messages]}   the same; a final assistant turn (a reference answer) is left out

    Other fields (`completion`, ids) are ignored, so an SFT validation file generates as it is. A text
    prompt is kept in `prompt` also when it became a user turn. `chat` None: not known yet (the rows
    checked before the model loads), so conversations pass."""
    rows = []
    for where, record in records:
        if "messages" in record and "prompt" in record:
            raise SpartaError(f"{where}: the row has both `messages` and `prompt`: keep one")
        if holds_lone_surrogate(record):  # --prompt's undecodable bytes; a file's rows were checked as read
            raise SpartaError(f"{where}: {NOT_UNICODE}: fix the text")
        field = "messages" if "messages" in record else "prompt"
        value = record.get(field)
        if value is None:
            fields = ", ".join(f"`{name}`" for name in record) or "none"
            raise SpartaError(f"{where}: no `prompt` or `messages` to generate from (it has: {fields}): "
                              'write {"prompt": "..."} or {"messages": [...]} rows')
        if field == "prompt" and isinstance(value, str):
            if not value.strip():
                raise SpartaError(f"{where}: `prompt` is empty: write the prompt or remove that row")
            if not chat:
                rows.append(SftRow(where, prompt=value))
                continue
            messages: tuple[dict[str, str], ...] = ({"role": "user", "content": value},)
        else:
            if chat is False:
                raise SpartaError(f"{where}: `{field}` is a conversation, but this model gives prompts as plain text (it has no chat "
                                  'template, or its run trained on plain text): write {"prompt": "..."} rows')
            messages = _messages(_decode_json(value, where), field, where)
            if field == "messages" and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        _check_prompt(messages, field, where)
        rows.append(SftRow(where, messages=messages, prompt_messages=len(messages), prompt=value if isinstance(value, str) else ""))
    if not rows:
        raise SpartaError(f"{source} has no rows: write one prompt a line")
    return rows


def _check_prompt(messages: Sequence[Mapping[str, str]], field: str, where: str) -> None:
    roles = [message["role"] for message in messages if message["role"] != "system"]
    if not roles or roles[0] != "user" or roles[-1] != "user":
        raise SpartaError(f"{where}: `{field}` must open with a user turn (after an optional system message) and end with "
                          "the user turn to answer: fix that row")


def _prompt_kind(row: SftRow) -> str:
    return "message lists" if row.messages is not None else "strings"


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise SpartaError(f"{path} not found (relative paths start at the current folder {Path.cwd()}): fix the path")
    if path.suffix.lower() not in _SUFFIXES:
        raise SpartaError(f"{path}: unknown file type `{path.suffix}`: use {', '.join(_SUFFIXES[:-1])} or {_SUFFIXES[-1]}")
    if path.suffix.lower() == ".parquet":
        return _parquet_records(path)
    _, rows = read_table(path)
    return [(f"line {line}", record) for line, record in rows]


def _parquet_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise SpartaError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0]}): use a complete copy of the file") from None
    records = table.to_pylist()
    if not records:
        raise no_rows(path)
    return [(f"row {number}", record) for number, record in enumerate(records, 1)]


def _detect(record: Mapping[str, Any], where: str) -> str:
    present = [name for name, fields in _FIELDS.items() if any(field in record for field in fields)]
    if len(present) == 1:
        return present[0]
    fields = ", ".join(f"`{name}`" for name in record) or "none"
    if not present:
        raise SpartaError(f"{where}: no `messages`, `prompt`/`completion` or `text` field (it has: {fields}): "
                          "name the columns as TRL's dataset formats do, or fix that row")
    raise SpartaError(f"{where}: fields of more than one format ({fields}): set task.format to {' or '.join(present)}")


def _parse(record: Mapping[str, Any], format: str, where: str) -> SftRow:
    missing = [field for field in _FIELDS[format] if record.get(field) is None]
    if missing:
        fields = ", ".join(f"`{name}`" for name in record if record[name] is not None) or "none"
        state = "null" if missing[0] in record else "missing"  # `{"text": null}` has the field, empty
        raise SpartaError(f"{where}: a {format} row needs `{'` and `'.join(_FIELDS[format])}` but `{missing[0]}` is {state} "
                          f"(it has: {fields}): fix that row, or task.format")
    if format == "chat":
        messages = _messages(_decode_json(record["messages"], where), "messages", where)
        _check_conversation(messages, where)
        return SftRow(where, messages=messages)
    if format == "text":
        text = _text(record["text"], "text", where)
        if not text.strip():
            raise SpartaError(f"{where}: `text` is empty: remove that row")
        return SftRow(where, completion=text)
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise SpartaError(f"{where}: `completion` is empty, so there is no answer to train on: write it or remove that row")
        return SftRow(where, prompt=prompt, completion=completion)
    if isinstance(prompt, str) or isinstance(completion, str):
        raise SpartaError(f"{where}: `prompt` and `completion` must both be text or both be message lists: fix that row")
    prompt_messages = _messages(prompt, "prompt", where)
    completion_messages = _messages(completion, "completion", where)
    for number, message in enumerate(completion_messages, 1):
        if message["role"] != "assistant":
            raise SpartaError(f"{where}: completion message {number} has role `{message['role']}`; a completion holds only "
                              "the assistant's turns: move it into `prompt`")
    messages = prompt_messages + completion_messages
    _check_conversation(messages, where)
    return SftRow(where, messages=messages, prompt_messages=len(prompt_messages))


def _decode_json(value: Any, where: str) -> Any:
    """A CSV cell holds the message list as JSON text."""
    if not isinstance(value, str):
        return value
    try:
        decoded = parse_json_text(value)
    except ValueError as exc:
        raise SpartaError(f"{where}: `messages` is text but not JSON ({exc}); write it as a JSON list of "
                          '{"role": ..., "content": ...} objects') from None
    if holds_lone_surrogate(decoded):
        raise SpartaError(f"{where}: `messages` {NOT_UNICODE}: fix that row")
    return decoded


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise SpartaError(f"{where}: `{field}` is a {json_kind(value)}, not text: fix that row")
    return value


def _messages(value: Any, field: str, where: str) -> tuple[dict[str, str], ...]:
    shape = 'a list of {"role": ..., "content": ...} objects'
    if not isinstance(value, (list, tuple)) or not value:
        what = "an empty list" if isinstance(value, (list, tuple)) else f"a {json_kind(value)}"
        raise SpartaError(f"{where}: `{field}` is {what}, not {shape}: fix that row")
    messages = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise SpartaError(f"{where}: {field} item {number} is not a {{\"role\": ..., \"content\": ...}} object; "
                              f"`{field}` must be {shape}: fix that row")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise SpartaError(f"{where}: {field} item {number} has role {json.dumps(role)[:40]}; roles are "
                              f"{', '.join(ROLES)}: fix that row")
        if not isinstance(content, str):
            raise SpartaError(f"{where}: {field} item {number} ({role}) has content that is a {json_kind(content)}, not text: "
                              "fix that row")
        messages.append({"role": role, "content": content})
    return tuple(messages)


def _check_conversation(messages: Sequence[Mapping[str, str]], where: str) -> None:
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise SpartaError(f"{where}: the conversation has no assistant turn, so nothing to train on: "
                          "add the assistant's answer or remove that row")
    first_turn = next(role for role in roles if role != "system")
    if first_turn != "user":
        raise SpartaError(f"{where}: the conversation opens with an assistant turn; it must start with a user turn "
                          "(after an optional system message): fix that row")
    for number, message in enumerate(messages, 1):
        if message["role"] == "assistant" and not message["content"].strip():
            raise SpartaError(f"{where}: message {number} (assistant) is empty, so there is no answer to train on: "
                              "write it or remove that row")
