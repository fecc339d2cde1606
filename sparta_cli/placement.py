"""Where a training run's model lives, behind one object: whole on every process under Accelerate
(one process, or DDP over several), or FSDP2-sharded across them (`training.sharding: fsdp`,
`sharding.ShardedModel`). The training loop asks its `Placement` for everything that differs
between the two (loading the model, preparing it, clipping, writing weights after a load, the
whole tensors and optimizer state a checkpoint holds, the parts each rank keeps on resume, the
adapter's tensors to save), so the loop itself never branches on sharding.

Checkpoints and adapter files have one format whatever the placement: what one process training
the whole model would write (docs/scaling.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sparta_cli.checkpoint import TrainerState, load_best, load_checkpoint, save_checkpoint
from sparta_cli.errors import RunFailure, SpartaError
from sparta_cli.models import LoadedModel, load_model, load_skeleton
from sparta_cli.sharding import (
    GatheredOptimizer,
    ShardedModel,
    broadcast_json,
    check_launch,
    clip_grad_norm_,
    shard_adapter,
    start_process_group,
)

if TYPE_CHECKING:
    from sparta_cli.config import Recipe
    from sparta_cli.tasks import Task
    from sparta_cli.tuners.base import Adapter


def mixed_precision(recipe: Recipe, model_dtype: torch.dtype) -> str:
    """bf16 autocast where the hardware has it, and always when the weights are half precision
    (the fp32 head then needs autocast to meet the body's activations)."""
    choice = recipe.training.mixed_precision
    if choice != "auto":
        return choice
    if model_dtype == torch.float16:
        return "fp16"
    if model_dtype == torch.bfloat16 or (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return "bf16"
    return "no"


def load_trained_model(recipe: Recipe, task: Task) -> LoadedModel:
    """The model to train (a classifier, or the causal LM for SFT: `models.load_model`). Under FSDP
    with several processes only rank 0 reads the weights; the others build a skeleton that `place`
    fills with their parts alone (rank 0's load error, if any, is raised on every rank, so none waits
    for weights that never come)."""
    rank, world = start_process_group() if recipe.training.sharding == "fsdp" else (0, 1)
    loaded = None
    if rank == 0:
        try:
            loaded = load_model(recipe.model, task)
        except SpartaError as exc:
            if world > 1:  # the others wait for what rank 0 loaded: tell them why nothing comes
                broadcast_json({"error": str(exc)})
            raise
    if world == 1:
        return loaded
    shape = broadcast_json({"dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                            "head_modules": loaded.head_modules} if rank == 0 else None)
    if "error" in shape:
        raise SpartaError(shape["error"])
    if rank > 0:
        loaded = load_skeleton(recipe.model, task, dtype=getattr(torch, shape["dtype"]), head_modules=shape["head_modules"])
    return loaded


class Placement:
    """The model whole on every process, under Accelerate (DDP when several): checkpoints and the
    adapter file take its tensors as they are."""

    def __init__(self, adapter: Adapter, accelerator) -> None:
        self.adapter, self.accelerator = adapter, accelerator

    def prepare(self, optimizer: torch.optim.Optimizer, loader) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        """The model to run, the optimizer and the training loader, prepared by Accelerate (DDP, devices)."""
        return self.accelerator.prepare(self.adapter.model, optimizer, loader)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> None:
        self.accelerator.clip_grad_norm_(params, max_norm)

    def write_weights(self) -> None:
        """After trainable tensors were loaded in place (resume, best adapter): SpaRTA's weights follow its deltas."""
        self.adapter.write_weights()

    def save_checkpoint(self, run_dir: Path, state: TrainerState, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                        keep: int | None, recipe: dict[str, Any], best: dict[str, torch.Tensor] | None,
                        masks: dict[str, str]) -> Path:
        """`checkpoint.save_checkpoint` of the whole adapter and optimizer (every rank calls it)."""
        return save_checkpoint(run_dir, state, trainable, optimizer, scheduler, self.accelerator, keep, recipe, best=best, masks=masks)

    def load_checkpoint(self, path: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                        masks: dict[str, str]) -> TrainerState:
        """Restore a checkpoint into this process's tensors, optimizer, scheduler and RNG; the weights follow."""
        state = load_checkpoint(path, trainable, optimizer, scheduler, self.accelerator, masks)
        self.write_weights()
        return state

    def load_best(self, path: Path, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The best evaluation's tensors a checkpoint kept, as this process holds them (None when it kept none)."""
        return load_best(path)

    def check_in_sync(self, trainable: dict[str, torch.Tensor]) -> None:
        """Every process must end with the same tensors; a mismatch means a broken setup, not a result."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return
        checksum = torch.stack([t.detach().double().sum() for t in trainable.values()]).sum().to(accelerator.device)
        gathered = accelerator.gather(checksum.reshape(1))
        if not torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=0):
            raise RunFailure("trainable parameters differ across processes: check that every rank runs the same recipe and sparta version")

    def adapter_tensors(self) -> dict[str, torch.Tensor] | None:
        """What the method's `save_weights` writes, when it must be gathered first (None: the adapter reads its own)."""
        return None


class ShardedPlacement(Placement):
    """FSDP2 over the model (`training.sharding: fsdp`): each rank holds its shards; checkpoints and
    the adapter file hold the whole tensors, gathered (every rank takes part, rank 0 keeps them), and
    a resume keeps each rank's parts of what it reads."""

    def __init__(self, adapter: Adapter, accelerator, sharded: ShardedModel) -> None:
        super().__init__(adapter, accelerator)
        self.sharded = sharded

    def prepare(self, optimizer: torch.optim.Optimizer, loader) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        """FSDP2 already wraps the model: Accelerate must not add DDP."""
        optimizer, loader = self.accelerator.prepare(optimizer, loader)
        return self.adapter.model, optimizer, loader

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> None:
        clip_grad_norm_(params, max_norm, self.sharded.group)

    def write_weights(self) -> None:
        """SpaRTA's weights follow its deltas, and the next forward gathers the loaded shards."""
        self.sharded.write_weights()

    def save_checkpoint(self, run_dir: Path, state: TrainerState, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                        keep: int | None, recipe: dict[str, Any], best: dict[str, torch.Tensor] | None,
                        masks: dict[str, str]) -> Path:
        """The whole adapter and optimizer, as one process would save them (every rank gathers, rank 0 keeps)."""
        tensors = self.sharded.gather_all(trainable)
        gathered = GatheredOptimizer.for_saving(self.sharded, optimizer)
        best = self.sharded.gather_all(trainable, best) if best is not None else None
        return save_checkpoint(run_dir, state, tensors, gathered, scheduler, self.accelerator, keep, recipe, best=best, masks=masks)

    def load_checkpoint(self, path: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                        masks: dict[str, str]) -> TrainerState:
        """Every rank reads the whole checkpoint into CPU tensors (no gather) and keeps its parts."""
        whole = self.sharded.whole_like(trainable)
        state = load_checkpoint(path, whole, GatheredOptimizer(self.sharded, optimizer), scheduler, self.accelerator, masks)
        self.sharded.load_full(trainable, whole)  # writes the weights too
        return state

    def load_best(self, path: Path, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        best = load_best(path)
        return self.sharded.local_parts(trainable, best) if best is not None else None  # saved whole; each rank keeps its parts

    def check_in_sync(self, trainable: dict[str, torch.Tensor]) -> None:
        """Each rank holds other parts, and gathered tensors agree by construction: nothing to compare."""

    def adapter_tensors(self) -> dict[str, torch.Tensor] | None:
        return self.adapter.tuner.gathered_for_save(self.adapter, self.sharded)  # a collective: every rank calls it


def place(adapter: Adapter, accelerator, sharding: str) -> Placement:
    """The placement `training.sharding` asks for, after refusing the launches that do not work;
    under FSDP the model is sharded here (docs/scaling.md), and for SpaRTA `adapter.sparta` becomes
    the row-owned one."""
    check_launch(adapter.tuner, sharding, accelerator.distributed_type.name, accelerator.mixed_precision)
    if sharding == "fsdp":
        return ShardedPlacement(adapter, accelerator, shard_adapter(adapter, accelerator.mixed_precision))
    return Placement(adapter, accelerator)
