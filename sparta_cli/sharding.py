"""`training.sharding: fsdp` in `sparta train`: FSDP2 (`fully_shard`) over any method's model.

FSDP2 shards every weight it manages by rows (Shard(0) DTensors); this module shards the model
(one group per transformer block, the heads, then the root), checks the launch, and gives the
checkpoint and adapter code the tensors and optimizer state one process would hold, so their files
keep today's format whatever the world size. A method may shard some tensors itself, beside FSDP
(`Tuner.shard`: SpaRTA's deltas, by the same rows, in `tuners/sparta/sharded.py`); `ShardedModel`
asks those `OwnedShards` how to gather and split their parts, and knows nothing of the method.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from sparta_cli.dtensors import full_tensor, local_tensor, reshard
from sparta_cli.errors import RunFailure, SpartaError
from sparta_cli.tuners.base import MeshRank

if TYPE_CHECKING:
    from sparta_cli.tuners.base import Adapter, OwnedShards, Tuner

ACCELERATE_SHARDING = ("FSDP", "DEEPSPEED")


def check_launch(tuner: Tuner, sharding: str, distributed_type: str, mixed_precision: str) -> None:
    """Refuse, in one line, the sharded setups that do not work; the method's tuner says whether
    accelerate's FSDP / DeepSpeed plugins can train it (sparta's own FSDP2 sharding trains them all)."""
    if distributed_type in ACCELERATE_SHARDING and not tuner.shardable:
        raise SpartaError(f"accelerate's FSDP / DeepSpeed ZeRO-3 plugins do not work with adapter.method={tuner.name} (they would "
                          "flatten the weights under its layers): launch with torchrun and set training.sharding=fsdp "
                          "(see docs/scaling.md)")
    if sharding != "fsdp":
        return
    if distributed_type in ACCELERATE_SHARDING:
        raise SpartaError("training.sharding=fsdp shards the model itself: launch with torchrun (or accelerate launch "
                          "without an FSDP / DeepSpeed config), not both")
    if not dist.is_available() or not dist.is_initialized():
        raise SpartaError("training.sharding=fsdp needs several processes: launch with "
                          "`torchrun --nproc_per_node N -m sparta_cli train RECIPE`")
    if mixed_precision == "fp16":
        raise SpartaError("training.sharding=fsdp runs bf16 or fp32, not fp16 (no loss scaling across shards): "
                          "set training.mixed_precision=bf16")


def start_process_group() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch, its process group started before the model loads:
    under FSDP only rank 0 reads the weights and the others build a skeleton (`models.load_skeleton`)
    that `shard` fills from rank 0. Accelerate then uses this group. (0, 1) outside torchrun."""
    if not dist.is_initialized():
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return 0, 1
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # the others wait for rank 0 to read the whole model: allow it an hour, not NCCL's ten minutes
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size()


def broadcast_json(value: Any, group: dist.ProcessGroup | None = None) -> Any:
    """Rank 0's `value` on every rank, sent as JSON bytes (nothing is unpickled)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    data = json.dumps(value).encode() if dist.get_rank(group) == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(size, src=src, group=group)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src, group=group)
    return json.loads(bytes(payload.cpu().tolist()).decode())


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks Hugging Face marks as not to be split (decoder/encoder layers): one
    FSDP group each, the usual choice for overlap and peak memory."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


@dataclass
class ShardedModel:
    """A model under FSDP2, with the conversions between this rank's parts and whole tensors that
    checkpoints and adapter files need. Every method that gathers is a collective: all ranks call it."""

    model: nn.Module
    group: Any  # the process group of the FSDP mesh
    owned: OwnedShards | None = None  # what the method shards itself (`Tuner.shard`), if anything

    def _owns(self, tensor: torch.Tensor) -> bool:
        return self.owned is not None and self.owned.owns(tensor)

    @property
    def writes(self) -> bool:
        """Rank 0 of the mesh: the one that writes checkpoints and adapter files, so the one that keeps
        what `gather` assembles."""
        return dist.get_rank(self.group) == 0

    def gather(self, param: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor | None:
        """The whole tensor of a trainable parameter, or of a state tensor shaped like it (an AdamW
        moment, a kept best copy): owned deltas gathered to all k entries, DTensor shards to the whole
        tensor. Rank 0 keeps it, on CPU; the other ranks take part and get None, so none of them ever
        holds more than its shards and one whole tensor (a `full` model and its AdamW state, gathered
        on every GPU, would not fit beside the shards)."""
        value = param.detach() if value is None else value
        whole = self.owned.gather(param, value) if self._owns(param) else full_tensor(value)
        return whole.cpu() if self.writes else None

    def gather_all(self, params: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor | None]:
        """`gather` for every named parameter (or for `values` shaped like them)."""
        return {name: self.gather(param, None if values is None else values[name]) for name, param in params.items()}

    def whole_like(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Uninitialised whole-shaped CPU tensors for `params`, for every rank to read a checkpoint into
        (no collective; `load_full` then keeps this rank's parts)."""
        return {name: torch.empty(self._whole_shape(param), dtype=param.dtype) for name, param in params.items()}

    def _whole_shape(self, param: torch.Tensor) -> torch.Size:
        return self.owned.whole_shape(param) if self._owns(param) else param.shape  # a DTensor's shape is the whole one

    def local_part(self, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole tensor shaped like `param`, in memory of its own (the inverse
        of `gather`; no collective)."""
        part = self._part(full, param)
        return part if hasattr(part, "to_local") else part.clone()

    def _part(self, whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's part of `whole`, for a tensor shaped like `like`: the method's own part of one of
        its owned tensors, the rows of an FSDP shard (a DTensor), or all of it."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if self._owns(like):
            return self.owned.part(like, whole)
        if isinstance(like, DTensor):
            return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return whole

    def local_parts(self, params: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.local_part(param, full[name]) for name, param in params.items()}

    @torch.no_grad()
    def load_full(self, params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
        """Copy whole tensors (as `gather` made them, e.g. a checkpoint's) into this rank's parts of `params`."""
        for name, param in params.items():
            part = self.local_part(param, tensors[name])
            local_tensor(param).copy_(local_tensor(part))
        self.write_weights()

    def write_weights(self) -> None:
        """After parameters were loaded in place: the next forward gathers them (and the weights follow
        the method's owned tensors again: SpaRTA's hold W0 + delta)."""
        if self.owned is not None:
            self.owned.write_weights()
        else:
            reshard(self.model)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()` as one process training the whole model would hold it, so a
        checkpoint has today's format; its per-entry tensors are None except on rank 0 (`gather`).
        The live state is untouched."""
        saved = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved["state"] = {index: {key: self.gather(params[index], value) if _shaped_like(value, params[index]) else value
                                  for key, value in entry.items()}
                          for index, entry in saved["state"].items()}
        return saved

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        """The inverse of `full_optimizer_state`: each rank keeps its parts of the per-entry state."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        local = {**saved, "state": {index: {key: self.local_part(params[index], value) if torch.is_tensor(value) and value.dim() else value
                                            for key, value in entry.items()}
                                    for index, entry in saved["state"].items()}}
        optimizer.load_state_dict(local)

    @torch.no_grad()
    def receive_from_rank0(self, sent: dict[str, torch.Tensor] | None, device: torch.device) -> None:
        """Fill every rank's parts from rank 0's whole tensors (`sent`, by name; None elsewhere), one
        broadcast per tensor: a rank that built a skeleton (meta) is allocated first, and never holds
        more than its shards plus one whole tensor. What the method computes on every rank (SpaRTA's
        indices) is not sent."""
        rank = dist.get_rank(self.group)
        if any(t.is_meta for t in _tensors(self.model).values()):
            real = {name: b for name, b in self.model.named_buffers() if not b.is_meta}  # built on every rank (SpaRTA's indices)
            self.model.to_empty(device=device)
            for name, buffer in real.items():
                module, _, leaf = name.rpartition(".")
                self.model.get_submodule(module)._buffers[leaf] = buffer
        incoming = self._incoming()
        plan = [[name, list(shape), str(local.dtype)] for name, local, shape in incoming]
        theirs = broadcast_json(plan, self.group)
        if theirs != plan:
            ours, first = next(((a, b) for a, b in zip(plan, theirs) if a != b), (plan[len(theirs):] or [None], theirs[len(plan):] or [None]))
            raise RunFailure(f"rank {rank} built another model than rank 0 ({ours} here, {first} there): every rank "
                             "must run the same recipe, sparta and transformers version")
        src = dist.get_global_rank(self.group, 0)
        for name, local, shape in incoming:
            whole = sent[name].to(device, local.dtype) if rank == 0 else torch.empty(shape, dtype=local.dtype, device=device)
            dist.broadcast(whole, src=src, group=self.group)
            local_tensor(local).copy_(local_tensor(self._part(whole, local)))

    def _incoming(self) -> list[tuple[str, torch.Tensor, torch.Size]]:
        """(name, this rank's tensor, whole shape) of everything rank 0 sends: all but what the method
        computes on every rank."""
        owned = self.owned
        return [(name, local, self._whole_shape(local)) for name, local in _tensors(self.model).items()
                if owned is None or not owned.computed(local)]

    def full_state_dict(self, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """`module.state_dict()` (default: the sharded model's) with every shard gathered, on CPU:
        what `save_pretrained` of a fully trained or PEFT model writes. Rank 0 gets it; the others
        take part in each gather, keep nothing, and get an empty dict."""
        gathered = {name: self.gather(value) for name, value in (module or self.model).state_dict().items()}
        return {name: whole for name, whole in gathered.items() if whole is not None}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (shared ones once), the same order on every rank."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _shaped_like(value, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape


def shard(model: nn.Module, *, own: Callable[[MeshRank], OwnedShards | None] | None = None,
          blocks: Iterable[nn.Module] | None = None, mesh=None, mp_policy=None, reshard_after_forward: bool = True) -> ShardedModel:
    """`fully_shard` the blocks (default: `default_blocks`), then the root. `own`, when given, first
    shards what the method shards itself (`Tuner.shard`), which FSDP then leaves alone (`ignored_params`).

    When some rank holds a skeleton (meta tensors: it did not read the weights), rank 0 holds the
    loaded model and sends each rank its parts once everything is sharded (`receive_from_rank0`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise SpartaError("FSDP2 sharding here supports a 1-D mesh (full sharding); hybrid sharding (HSDP) is not supported yet")
    group = mesh.get_group()
    rank = dist.get_rank(group)
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device(mesh.device_type)
    meta = any(t.is_meta for t in _tensors(model).values())
    if meta and rank == 0:
        raise SpartaError("rank 0 must hold the loaded model when the others hold skeletons: it sends them their parts")
    skeletons = torch.tensor([int(meta)], device=device)
    dist.all_reduce(skeletons, group=group)
    receiving = bool(skeletons.item())
    sent = _tensors(model) if receiving and rank == 0 else None  # rank 0's whole tensors, kept until sent
    owned = own(MeshRank(rank, dist.get_world_size(group), group, device)) if own is not None else None
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy(),
                   ignored_params=owned.ignored_params() if owned is not None else None)
    for block in default_blocks(model) if blocks is None else blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    sharded = ShardedModel(model, group, owned)
    if receiving:
        sharded.receive_from_rank0(sent, device)
        del sent
    if owned is not None:
        owned.check_layout()
        owned.write_weights()
    return sharded


def shard_adapter(adapter: Adapter, mixed_precision: str) -> ShardedModel:
    """FSDP2 over the adapter's model (one group per transformer block, each head alone, then the
    root), what its method shards itself sharded by its tuner (`Tuner.shard`).

    bf16 is FSDP's MixedPrecisionPolicy (weights all-gathered in bf16, gradients reduced in fp32),
    standing in for autocast: the fp32 shards (SpaRTA's deltas, LoRA's factors, full's weights) stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16" else None
    heads = [adapter.base.get_submodule(name) for name in adapter.head_modules]
    return shard(adapter.base, own=partial(adapter.tuner.shard, adapter), blocks=default_blocks(adapter.base) + heads, mp_policy=policy)


class GatheredOptimizer:
    """An optimizer seen as one process would hold it, for `save_checkpoint` / `load_checkpoint`:
    `for_saving` gathers its state (a collective: every rank builds it; rank 0 holds it whole and
    writes it); for loading, each rank keeps its parts of the whole state it reads."""

    def __init__(self, sharded: ShardedModel, optimizer: torch.optim.Optimizer, saved: dict | None = None) -> None:
        self.sharded, self.optimizer, self.saved = sharded, optimizer, saved

    @classmethod
    def for_saving(cls, sharded: ShardedModel, optimizer: torch.optim.Optimizer) -> GatheredOptimizer:
        return cls(sharded, optimizer, sharded.full_optimizer_state(optimizer))

    def state_dict(self) -> dict:
        if self.saved is None:
            raise RuntimeError("GatheredOptimizer.state_dict needs GatheredOptimizer.for_saving on every rank first")
        return self.saved

    def load_state_dict(self, saved: dict) -> None:
        self.sharded.load_full_optimizer_state(self.optimizer, saved)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """torch's clip_grad_norm_ over gradients that are disjoint shards across ranks: owned delta
    gradients (plain tensors) and FSDP's Shard(0) DTensor gradients. One all-reduce of a scalar."""
    grads = [local_tensor(param.grad) for param in params if param.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for grad in grads:
        total += grad.double().pow(2).sum()
    dist.all_reduce(total, group=group)
    norm = total.sqrt().float()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.dtype))
    return norm
