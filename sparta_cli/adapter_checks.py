"""Checks every saved adapter's config passes before any of it is used (eval, merge, export, resume).

Pure functions over what was read from disk: a damaged, edited or foreign adapter is refused
with one line naming the file and the problem, never applied. What each method's tensors must
satisfy is its tuner's check (`Tuner.check_tensors`; SpaRTA's: tuners/sparta/checks.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparta_cli.errors import SpartaError


class _BaseModelRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    name_or_path: str


class _TaskRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    num_labels: int = Field(ge=1)


class _SftTaskRecord(BaseModel):
    """An SFT run's task (tasks/kinds.py SFT.recorded): a causal LM, no label count."""

    model_config = ConfigDict(extra="allow")
    name: str
    kind: Literal["sft"]
    chat: bool | None = None  # prompts through the chat template (absent in runs written before it was recorded)


class AdapterConfigFile(BaseModel):
    """adapter_config.json: the keys sparta reads (a newer sparta may add others)."""

    model_config = ConfigDict(extra="allow")
    format_version: int
    method: str
    head_modules: list[str]
    target_shapes: dict[str, tuple[int, int]] = Field(default_factory=dict)
    base_model: _BaseModelRecord | None = None  # what `sparta train` records; a hand-made adapter may lack it
    task: _TaskRecord | None = None
    density: float | None = Field(None, gt=0.0, le=1.0)
    trainable_params: int | None = Field(None, ge=0)


class SftAdapterConfigFile(AdapterConfigFile):
    task: _SftTaskRecord


def check_adapter_config(config: Any, path: Path) -> None:
    if not isinstance(config, dict):
        raise SpartaError(f"{path} is not an adapter config (a JSON object): the file is damaged; retrain or restore it")
    task = config.get("task")
    record = SftAdapterConfigFile if isinstance(task, dict) and task.get("kind") == "sft" else AdapterConfigFile
    try:
        record.model_validate(config)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "missing":
            raise SpartaError(f"{path} lacks `{where}`: the file was edited or is damaged; retrain or restore it") from None
        raise SpartaError(f"{path}: `{where}` = {str(error.get('input'))[:60]!r} ({error['msg']}): the file was edited or is "
                          "damaged; retrain or restore it") from None
    for name, (rows, cols) in config.get("target_shapes", {}).items():
        if rows < 1 or cols < 1:
            raise SpartaError(f"{path}: target `{name}` has shape {[rows, cols]}: the file is damaged; retrain or restore it")


def damaged(path: Path, problem: str) -> SpartaError:
    """The one-line refusal of an adapter file that fails a check (each method's `Tuner.check_tensors`)."""
    return SpartaError(f"{path}: {problem}: the adapter is damaged or was edited; retrain or restore it")
