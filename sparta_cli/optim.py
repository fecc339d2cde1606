"""The optimizer `sparta train` (and scripts/bench_step.py) builds: state for the trainable parameters only.

`training.optimizer: auto` takes the fastest correct choice for the device: fused AdamW on
CUDA (one kernel for all tensors), torch's default AdamW elsewhere. What a method does after each step
(SpaRTA: its dense weights follow the deltas) is registered by its tuner, so every choice trains what the
forward sees.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sparta_cli.tuners.base import Adapter

OPTIMIZERS = ("adamw", "adamw_fused", "sgd")


def resolve_optimizer(name: str, device: torch.device | str) -> str:
    """`auto` -> adamw_fused on CUDA, adamw elsewhere; an explicit name is kept."""
    if name != "auto":
        return name
    return "adamw_fused" if torch.device(device).type == "cuda" else "adamw"


def make_optimizer(groups: Iterable[dict[str, Any]], name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """One of OPTIMIZERS over parameter groups (each group may carry its own lr)."""
    groups = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)  # torch picks foreach on CUDA
    if name == "adamw_fused":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def build_optimizer(adapter: Adapter, name: str, lr: float, head_lr: float | None, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer over an adapter's trainable parameters (the head at `head_lr`), with
    the method's own work after every step registered (`Tuner.follow_steps_of`)."""
    head, body = [], []
    for param_name, param in adapter.trainable():
        (head if any(f"{m}." in f"{param_name}." for m in adapter.head_modules) else body).append(param)
    optimizer = make_optimizer([{"params": body, "lr": lr}, {"params": head, "lr": head_lr or lr}], name, lr, weight_decay)
    adapter.follow_steps_of(optimizer)
    return optimizer
