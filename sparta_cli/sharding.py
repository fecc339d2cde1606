"""`training.sharding: fsdp` in `sparta train`: what the loop needs to run SpaRTA under FSDP2.

The layer side (ownership, the reduce-scatter backward, gathering) is
`tuners/sparta/sharded.py`; this module checks the launch, shards the adapter's model and
gives the checkpoint code the tensors and optimizer state one process would hold, so
checkpoints and adapters keep today's format.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparta_cli.errors import SpartaError
from sparta_cli.tuners.base import Tuner
from sparta_cli.tuners.sparta.sharded import ShardedSparta

ACCELERATE_SHARDING = ("FSDP", "DEEPSPEED")


def check_launch(tuner: Tuner, sharding: str, distributed_type: str, mixed_precision: str, selecting: bool = False) -> None:
    """Refuse, in one line, the sharded setups that do not work (yet); the method's tuner says which
    sharding it trains under (accelerate's FSDP / DeepSpeed plugins, or sparta's own row sharding)."""
    method = tuner.name
    if distributed_type in ACCELERATE_SHARDING and not tuner.shardable:
        raise SpartaError(f"accelerate's FSDP / DeepSpeed ZeRO-3 plugins do not work with adapter.method={method} (they would "
                          "flatten the weights under its layers): launch with torchrun and set training.sharding=fsdp "
                          "(see docs/scaling.md)")
    if sharding != "fsdp":
        return
    if not tuner.row_sharded:
        raise SpartaError(f"training.sharding=fsdp supports adapter.method=sparta only so far, not {method}: "
                          "use training.sharding=none (DDP)")
    if not dist.is_available() or not dist.is_initialized():
        raise SpartaError("training.sharding=fsdp needs several processes: launch with "
                          "`torchrun --nproc_per_node N -m sparta_cli train RECIPE`")
    if selecting:
        raise SpartaError("training.sharding=fsdp does not keep the best evaluation's adapter yet: "
                          "drop data.validation_size, or train with training.sharding=none (DDP)")
    if mixed_precision == "fp16":
        raise SpartaError("training.sharding=fsdp runs bf16 or fp32, not fp16 (no loss scaling across shards): "
                          "set training.mixed_precision=bf16")


def shard_adapter(adapter, mixed_precision: str) -> ShardedSparta:
    """FSDP2 over the adapter's model (one group per transformer block, the head alone, then the
    root), SpaRTA deltas sharded by the same rows; `adapter.sparta` becomes the sharded one.

    bf16 is FSDP's MixedPrecisionPolicy (weights all-gathered in bf16, gradients reduced in fp32),
    standing in for autocast: the fp32 deltas and head stay fp32 in their shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from sparta_cli.tuners.sparta.sharded import default_blocks

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16" else None
    heads = [adapter.base.get_submodule(name) for name in adapter.head_modules]
    sharded = ShardedSparta.shard(adapter.sparta, blocks=default_blocks(adapter.base) + heads, mp_policy=policy)
    adapter.sparta = sharded
    return sharded


class GatheredOptimizer:
    """An optimizer seen as one process would hold it, for `save_checkpoint` / `load_checkpoint`:
    built on every rank (gathering is a collective), read or loaded by whoever needs it."""

    def __init__(self, sharded: ShardedSparta, optimizer: torch.optim.Optimizer) -> None:
        self.sharded, self.optimizer = sharded, optimizer
        self.saved = sharded.full_optimizer_state(optimizer)

    def state_dict(self) -> dict:
        return self.saved

    def load_state_dict(self, saved: dict) -> None:
        self.sharded.load_full_optimizer_state(self.optimizer, saved)


def gathered(sharded: ShardedSparta, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainable tensors as one process would hold them (a collective: every rank calls it)."""
    return {name: sharded.gather(param) for name, param in trainable.items()}

