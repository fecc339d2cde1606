"""FSDP2's DTensors seen as plain tensors: the conversions that code outside sharding.py needs
(saving a sharded adapter, rewriting sharded weights), kept apart so it need not import sharding."""

from __future__ import annotations

import torch
from torch import nn


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor: FSDP's DTensor shards gathered (a collective), plain tensors as they are."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its storage: writing to it writes the shard); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def reshard(model: nn.Module) -> None:
    """Free every group's gathered weights, so the next forward all-gathers the shards again: FSDP
    keeps the root's after a forward without backward (an evaluation), which would hide a load."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
