"""Training checkpoints that resume exactly: trainable tensors, optimizer, scheduler,
every rank's RNG states, the data position and a digest of the SpaRTA masks, written atomically.

Nothing is pickled: tensors go to safetensors and everything else to JSON, so a checkpoint
from anywhere can be read without running code it brought. Only the trainable tensors are
saved (deltas and head, O(k)), never the frozen model. A checkpoint is built under a
temporary folder name and renamed when complete, so a kill at any moment leaves the
previous checkpoint or the new one, never a broken one; a damaged one (disk error, an
edit) is found by `usable_checkpoint`, which falls back to the one before it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import read_json, write_json, write_safetensors
from sparta_cli.runs import (
    BEST_FILE,
    CHECKPOINT_DIR,
    MASKS_FILE,
    OPTIMIZER_STATE,
    OPTIMIZER_TENSORS,
    RECIPE_FILE,
    SCHEDULER_STATE,
    STATE_FILE,
    TENSORS_FILE,
    check_recorded_recipe,
    checkpoint_dir_name,
    rng_file,
)


class ResumeStops(SpartaError):
    """A checkpoint problem every checkpoint of the run shares (pickle files, another number of
    processes): `--resume` stops instead of falling back to an older checkpoint."""


@dataclass
class TrainerState:
    """Where the loop is: enough to continue as if it had never stopped."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)
    seen: int = 0  # training examples seen, all processes
    tokens: int = 0  # non-pad training tokens seen, all processes
    loss_sum: float = 0.0  # sum of per-step losses, for train_loss
    elapsed: float = 0.0  # seconds of training before this session
    world_size: int = 1
    selection: dict[str, Any] | None = None  # best_step, best_metrics, evals_since_best (with a validation set)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders never match the name)."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and CHECKPOINT_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_DIR.match(p.name).group(1)))


# ---------------------------------------------------------------- RNG states without pickle


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states as tensors and JSON (python's and numpy's are plain numbers)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    info = {"python": [version, list(words), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, info


def _set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    version, words, gauss = info["python"]
    random.setstate((version, tuple(words), gauss))
    kind, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(key.startswith("cuda.") for key in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- optimizer state without pickle


def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state_dict as safetensors tensors (`state.<param>.<key>`) and JSON (the rest)."""
    tensors, scalars = {}, {}
    for param_id, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in info["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    # JSON has no tuples: give group settings (betas) back the tuples optimizers are built with
    groups = [{key: tuple(value) if isinstance(value, list) and key != "params" else value for key, value in group.items()}
              for group in info["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- saving


def save_checkpoint(run_dir: Path, state: TrainerState, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    accelerator, keep: int | None, recipe: dict[str, Any], best: dict[str, torch.Tensor] | None = None,
                    masks: dict[str, str] | None = None) -> Path:
    """Every rank writes its RNG state into the temporary folder; the main process writes the rest and renames it."""
    final = run_dir / checkpoint_dir_name(state.step)
    tmp = run_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng_tensors, rng_info = _rng_state()
    write_safetensors(tmp / rng_file(accelerator.process_index), rng_tensors, {"rng": json.dumps(rng_info)})
    if accelerator.is_main_process:
        write_safetensors(tmp / TENSORS_FILE, {name: t.detach().cpu().contiguous() for name, t in trainable.items()})
        if best is not None:
            write_safetensors(tmp / BEST_FILE, {name: t.contiguous() for name, t in best.items()})
        opt_tensors, opt_info = split_optimizer_state(optimizer.state_dict())
        write_safetensors(tmp / OPTIMIZER_TENSORS, opt_tensors)
        write_json(tmp / OPTIMIZER_STATE, opt_info)
        write_json(tmp / SCHEDULER_STATE, scheduler.state_dict())
        write_json(tmp / MASKS_FILE, masks or {})
        write_json(tmp / RECIPE_FILE, recipe)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, asdict(state))  # last: its presence marks the folder complete
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep:
            for old in checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------- reading, checked


def read_trainer_state(path: Path) -> TrainerState:
    """trainer_state.json with exactly TrainerState's keys, each of its type."""
    data = read_json(path)
    fields = {field.name: field for field in dataclasses.fields(TrainerState)}
    missing, extra = sorted(set(fields) - set(data)), sorted(set(data) - set(fields))
    if missing or extra:
        what = f"lacks `{missing[0]}`" if missing else f"has an unknown key `{extra[0]}`"
        raise SpartaError(f"{path} {what}: it was edited or written by another sparta version, so the checkpoint is damaged")
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(TrainerState).validate_python(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise SpartaError(f"{path}: `{where}` = {error.get('input')!r} ({error['msg']}): the checkpoint is damaged") from None


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise SpartaError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise SpartaError(f"{path} is truncated or corrupted ({str(exc).splitlines()[0]})") from None


def _json(path: Path) -> Any:
    if not path.is_file():
        raise SpartaError(f"{path} is missing: the checkpoint is incomplete")
    return read_json(path)


def read_checkpoint(path: Path, world_size: int) -> dict[str, Any]:
    """Every file of a checkpoint, parsed and checked; SpartaError naming the first bad file.

    A checkpoint from before sparta stopped pickling (optimizer.pt, rng_state_*.pt) is refused
    without being opened."""
    if (path / "optimizer.pt").exists() or any(path.glob("rng_state_*.pt")):
        raise ResumeStops(f"{path} holds pickle files (optimizer.pt), which sparta never loads because unpickling can run "
                          "code: it was written by an older sparta; --resume stops: retrain with --overwrite")
    state = read_trainer_state(path / STATE_FILE)
    if state.world_size != world_size:
        raise ResumeStops(f"{path} was written by {state.world_size} process(es) but this run has {world_size}: "
                          "--resume stops: resume with the same number of processes")
    tensors, _ = _load_safetensors(path / TENSORS_FILE)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SpartaError(f"{path / TENSORS_FILE}: `{name}` holds inf or NaN: the checkpoint is damaged")
    if (path / BEST_FILE).exists():
        _load_safetensors(path / BEST_FILE)
    optimizer_tensors, _ = _load_safetensors(path / OPTIMIZER_TENSORS)
    optimizer_info = _json(path / OPTIMIZER_STATE)
    if not isinstance(optimizer_info, dict) or not {"param_groups", "scalars"} <= set(optimizer_info):
        raise SpartaError(f"{path / OPTIMIZER_STATE} lacks param_groups or scalars: the checkpoint is damaged")
    rng = []
    for rank in range(world_size):
        rng_tensors, metadata = _load_safetensors(path / rng_file(rank))
        try:
            rng.append((rng_tensors, json.loads(metadata["rng"])))
        except (KeyError, ValueError):
            raise SpartaError(f"{path / rng_file(rank)} lacks its RNG record: the checkpoint is damaged") from None
    try:
        optimizer = join_optimizer_state(optimizer_tensors, optimizer_info)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SpartaError(f"{path / OPTIMIZER_TENSORS} or {OPTIMIZER_STATE} holds entries sparta does not write: "
                          "the checkpoint is damaged") from None
    recipe = check_recorded_recipe(path / RECIPE_FILE, _json(path / RECIPE_FILE), "the checkpoint is damaged")
    return {"state": state, "tensors": tensors, "optimizer": optimizer,
            "scheduler": _json(path / SCHEDULER_STATE), "masks": _json(path / MASKS_FILE), "recipe": recipe, "rng": rng}


def usable_checkpoint(run_dir: Path, world_size: int, warn) -> Path | None:
    """The newest checkpoint that reads back whole; each damaged newer one is named in a warning
    that says `--resume` falls back past it. None when there is no checkpoint; SpartaError naming
    the newest's damage, and that `--resume` stops, when none is usable."""
    problems = []
    found = checkpoints(run_dir)
    for index in reversed(range(len(found))):
        path, older = found[index], found[index - 1] if index else None
        try:
            read_checkpoint(path, world_size)
        except ResumeStops:
            raise
        except SpartaError as exc:
            after = f"--resume falls back past it, to {older.name}" if older is not None else "no older checkpoint to fall back to"
            warn(f"skipping {path}: {exc}; {after}")
            problems.append(str(exc))
            continue
        return path
    if problems:
        raise SpartaError(f"every checkpoint in {run_dir} is damaged (newest: {problems[0]}): --resume stops; "
                          "retrain with --overwrite")
    return None


def check_masks(path: Path, saved: dict[str, str], current: dict[str, str]) -> None:
    """The SpaRTA entries drawn now must be the ones the checkpoint trained (a torch upgrade between
    save and resume must never move the deltas to other entries silently)."""
    if saved == current:
        return
    differ = sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))
    raise SpartaError(f"{path} trained other SpaRTA entries than this run draws (e.g. in `{differ[0]}`): the mask changed "
                      "since it was written (another torch or sparta version?); --resume stops: resume with the versions in "
                      "config.yaml, or retrain with --overwrite")


def load_checkpoint(path: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler, accelerator,
                    masks: dict[str, str] | None = None) -> TrainerState:
    """Restore tensors, optimizer, scheduler and this rank's RNG; return the loop position."""
    saved = read_checkpoint(path, accelerator.num_processes)
    check_masks(path, saved["masks"], masks or {})
    tensors = saved["tensors"]
    for name, tensor in trainable.items():
        if name not in tensors:
            raise SpartaError(f"{path} lacks trainable tensor {name}: the recipe changed since it was written; --resume stops: "
                              "resume with the same recipe")
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise SpartaError(f"{path}: `{name}` is {list(tensors[name].shape)} there but {list(tensor.shape)} here: "
                              "--resume stops: resume with the same recipe and base model")
    with torch.no_grad():
        for name, tensor in trainable.items():
            tensor.copy_(tensors[name])
    try:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise SpartaError(f"{path}: the optimizer or scheduler state does not fit this run ({exc}): --resume stops: "
                          "resume with the same recipe") from None
    _set_rng_state(*saved["rng"][accelerator.process_index])
    return saved["state"]


def load_best(path: Path) -> dict[str, torch.Tensor] | None:
    """The best evaluation's tensors a checkpoint kept (None when it kept none)."""
    return _load_safetensors(path / BEST_FILE)[0] if (path / BEST_FILE).is_file() else None
