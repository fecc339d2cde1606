"""Training checkpoints that resume exactly: trainable tensors, optimizer, scheduler,
every rank's RNG states and the data position, written atomically.

Only the trainable tensors are saved (deltas and head, O(k)), never the frozen model.
A checkpoint is built under a temporary folder name and renamed when complete, so a
kill at any moment leaves the previous checkpoint or the new one, never a broken one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import read_json, write_json, write_safetensors

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainable.safetensors"
BEST_FILE = "best_trainable.safetensors"  # the best evaluation's tensors, when a validation set selects
_NAME = re.compile(r"^checkpoint-(\d+)$")


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
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: TrainerState, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    accelerator, keep: int | None, recipe: dict[str, Any], best: dict[str, torch.Tensor] | None = None) -> Path:
    """Every rank writes its RNG state into the temporary folder; the main process writes the rest and renames it."""
    final = run_dir / f"checkpoint-{state.step}"
    tmp = run_dir / f".checkpoint-{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        write_safetensors(tmp / TENSORS_FILE, {name: t.detach().cpu().contiguous() for name, t in trainable.items()})
        if best is not None:
            write_safetensors(tmp / BEST_FILE, {name: t.contiguous() for name, t in best.items()})
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        write_json(tmp / "recipe.json", recipe)
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


def load_checkpoint(path: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler, accelerator) -> TrainerState:
    """Restore tensors, optimizer, scheduler and this rank's RNG; return the loop position."""
    from safetensors.torch import load_file

    state = TrainerState(**read_json(path / STATE_FILE))
    if state.world_size != accelerator.num_processes:
        raise SpartaError(
            f"{path} was written by {state.world_size} process(es) but this run has {accelerator.num_processes}: "
            f"resume with the same number of processes"
        )
    saved = load_file(str(path / TENSORS_FILE))
    missing = sorted(set(trainable) - set(saved))
    if missing:
        raise SpartaError(f"{path} lacks trainable tensor {missing[0]}: the recipe changed since it was written; resume with the same recipe")
    with torch.no_grad():
        for name, tensor in trainable.items():
            tensor.copy_(saved[name])
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(torch.load(path / f"rng_state_{accelerator.process_index}.pt", weights_only=False))
    return state


def load_best(path: Path) -> dict[str, torch.Tensor] | None:
    """The best evaluation's tensors a checkpoint kept (None when it kept none)."""
    from safetensors.torch import load_file

    return load_file(str(path / BEST_FILE)) if (path / BEST_FILE).is_file() else None
