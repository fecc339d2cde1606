"""Checks every saved adapter passes before any of it is used (eval, merge, export, resume).

Pure functions over what was read from disk: a damaged, edited or foreign adapter is refused
with one line naming the file and the problem, never applied (negative indices would wrap
around, an index past the matrix would write elsewhere, NaN deltas would score and merge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparta_cli.errors import SpartaError


class _BaseModelRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    name_or_path: str


class _TaskRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    num_labels: int = Field(ge=1)


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


def check_adapter_config(config: Any, path: Path) -> None:
    if not isinstance(config, dict):
        raise SpartaError(f"{path} is not an adapter config (a JSON object): the file is damaged; retrain or restore it")
    try:
        AdapterConfigFile.model_validate(config)
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


def check_adapter_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> None:
    """Indices strictly increasing (so unique), inside their matrix; one finite value per index;
    the modules, their sizes and the density the config declares."""
    from sparta_cli.tuners import get_tuner
    from sparta_cli.tuners.base import TRAINED_PREFIX  # here, not above: tuners.base imports this module
    from sparta_cli.tuners.sparta.mask import num_selected

    def refuse(problem: str) -> SpartaError:
        return SpartaError(f"{path}: {problem}: the adapter is damaged or was edited; retrain or restore it")

    shapes = {name: tuple(shape) for name, shape in (config.get("target_shapes") or {}).items()}
    modules = {key.removesuffix(".indices") for key in tensors if key.endswith(".indices")}
    for key, value in tensors.items():
        if not (key.startswith(TRAINED_PREFIX) or key.endswith((".indices", ".delta"))):
            raise refuse(f"unknown tensor `{key}`")
        if key.endswith(".delta") and key.removesuffix(".delta") not in modules:
            raise refuse(f"`{key}` has no indices")
        if key.startswith(TRAINED_PREFIX) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise refuse(f"`{key}` holds inf or NaN")
    if sorted(modules) != sorted(shapes):
        extra = sorted(set(modules) - set(shapes)) or sorted(set(shapes) - set(modules))
        raise refuse(f"the tensors and adapter_config.json's target_shapes name different modules (e.g. `{extra[0]}`)")
    density = config.get("density") if get_tuner(config["method"]).applies("density") else None
    for module in sorted(modules):
        indices, delta = tensors[f"{module}.indices"], tensors.get(f"{module}.delta")
        numel = shapes[module][0] * shapes[module][1]
        if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
            raise refuse(f"`{module}.indices` is not a flat integer tensor")
        if delta is None or delta.dim() != 1 or delta.numel() != indices.numel() or not delta.is_floating_point():
            raise refuse(f"`{module}` needs one floating delta per index ({indices.numel()} indices)")
        if indices.numel():
            flat = indices.long()
            if int(flat[0]) < 0 or int(flat[-1]) >= numel or (flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all())):
                raise refuse(f"`{module}.indices` must be strictly increasing within [0, {numel}) for its {list(shapes[module])} "
                             f"matrix (negative, out of range, repeated or unsorted entries)")
        if not bool(torch.isfinite(delta).all()):
            raise refuse(f"`{module}.delta` holds inf or NaN")
        if density is not None and indices.numel() != num_selected(numel, density):
            raise refuse(f"`{module}` has {indices.numel()} entries but density {density} of {numel} is "
                         f"{num_selected(numel, density)}")
