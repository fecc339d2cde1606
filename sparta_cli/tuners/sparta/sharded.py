"""SpaRTA under FSDP2 (`fully_shard`): the deltas are sharded by the same rows as the weights.

FSDP2 shards every weight along dim 0: rank r holds rows [r*c, (r+1)*c) with c = ceil(out / W)
(`torch.chunk`'s split). Our indices are sorted flat row-major positions, so the entries that
fall in rank r's rows are one contiguous slice of the index array. Each rank keeps only that
slice's fp32 deltas, original values and (through the optimizer) their AdamW moments: adapter
state per rank is O(k / W). The global index array stays on every rank (4 bytes per entry),
because each rank's batch contributes a gradient to every entry.

- Forward: after every optimizer step and every load of deltas (`write_weights`, registered as
  an optimizer step post-hook, as for the unsharded layers), each rank writes W0 + delta into its
  own rows of the sharded weight; FSDP's next all-gather then carries the deltas, so the forward
  is the frozen model's own matmul.
- Backward: the custom autograd function receives the unsharded (gathered) weight from FSDP and
  returns the input gradient plus the k entries of g^T x from this rank's batch, laid out in
  rank-sized pieces (padded to the largest owned count) and reduce-scattered: one collective per
  layer of about k fp32 values, after which each rank holds the sum for its own entries only.
  Reduce-scatter rather than all-reduce: it moves half the bytes of an all-reduce, and only the
  owner needs the sum. The weight itself is frozen (requires_grad False), so FSDP never builds,
  stores or reduces a dense gradient for it.

`SpartaTuner.shard` makes the row-owned layers (`ShardedSparta.own_rows`) when `sharding.shard`
asks, and `ShardedSparta` is the `OwnedShards` that the method-agnostic `sharding.ShardedModel`
gathers and splits through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparta_cli import sharding
from sparta_cli.dtensors import reshard
from sparta_cli.errors import SpartaError
from sparta_cli.tuners.base import MeshRank
from sparta_cli.tuners.sparta.layer import SpartaLinear, WrappedLinear, autocast_input, sparse_weight_grad
from sparta_cli.tuners.sparta.model import SpartaModel, _set_submodule


def row_split(out_features: int, world: int) -> list[tuple[int, int]]:
    """The rows [first, end) each rank holds under FSDP2's dim-0 sharding (torch.chunk sizes)."""
    chunk = -(-out_features // world)
    return [(min(out_features, r * chunk), min(out_features, (r + 1) * chunk)) for r in range(world)]


def owned_slices(indices: torch.Tensor, in_features: int, rows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each rank, the slice [lo, hi) of the sorted flat `indices` that falls in its rows."""
    bounds = torch.tensor([first * in_features for first, _ in rows] + [rows[-1][1] * in_features], dtype=torch.int64)
    cuts = torch.searchsorted(indices.long(), bounds).tolist()
    return [(cuts[r], cuts[r + 1]) for r in range(len(rows))]


class _ShardedDeltaLinear(torch.autograd.Function):
    """y = x W^T + b with W the gathered weight (already W0 + delta); the delta gradient is
    reduce-scattered to the rank that owns each entry."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, layer):  # type: ignore[override]
        ctx.x_dtype = x.dtype
        x = autocast_input(x)
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        layer: ShardedSpartaLinear = ctx.layer
        compute = grad_out.dtype
        grad_x = (grad_out @ weight.to(compute)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_delta = None
        if ctx.needs_input_grad[3]:
            full = sparse_weight_grad(grad_out, x.to(compute), layer.sparta_indices, weight.shape[1])
            grad_delta = layer.reduce_scatter(full)
        return grad_x, None, None, grad_delta, None


def _owned(values: torch.Tensor, lo: int, hi: int, device: torch.device | None) -> torch.Tensor:
    """This rank's slice of a per-entry tensor, on `device`; uninitialised on a skeleton (meta), whose
    values arrive from rank 0 (`sharding.ShardedModel.receive_from_rank0`)."""
    if values.is_meta:
        return torch.empty(hi - lo, dtype=values.dtype, device=device)
    return values[lo:hi].to(device, copy=True)


class ShardedSpartaLinear(WrappedLinear):
    """A SpaRTA linear whose deltas, original values and optimizer state are this rank's rows only.

    `sparta_indices` is the global sorted index array (needed to compute every entry's gradient
    from this rank's batch); `sparta_local` are the owned entries' flat positions inside this
    rank's row shard, `sparta_origin` and `sparta_delta` their W0 values and fp32 deltas.
    """

    def __init__(self, layer: SpartaLinear, rank: int, world: int, group: dist.ProcessGroup | None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.base_layer = layer.base_layer
        self.rank, self.world, self.group = rank, world, group
        in_features = layer.in_features
        self.rows = row_split(layer.out_features, world)
        self.slices = owned_slices(layer.sparta_indices, in_features, self.rows)
        lo, hi = self.slices[rank]
        self.chunk = max(h - low for low, h in self.slices)  # reduce-scatter piece per rank (padded)
        indices = layer.sparta_indices.to(device)
        self.register_buffer("sparta_indices", indices)
        local = indices[lo:hi].long() - self.rows[rank][0] * in_features
        self.register_buffer("sparta_local", local.to(indices.dtype))
        self.register_buffer("sparta_origin", _owned(layer.sparta_origin, lo, hi, device))
        self.sparta_delta = nn.Parameter(_owned(layer.sparta_delta.detach(), lo, hi, device), requires_grad=layer.sparta_delta.requires_grad)

    @torch.no_grad()
    def write_weight(self) -> None:
        """W0 + delta into the owned entries of this rank's rows of the sharded weight (a DTensor
        whose local tensor is the storage FSDP all-gathers from)."""
        local = self.base_layer.weight.to_local()
        local.view(-1).index_copy_(0, self.sparta_local.long(), self._target_values(local.dtype))

    def reduce_scatter(self, full: torch.Tensor) -> torch.Tensor:
        """Sum every rank's k-entry gradient and keep this rank's owned entries, averaged over ranks
        (as DDP and FSDP average)."""
        padded = full.new_zeros(self.world * self.chunk)
        for r, (lo, hi) in enumerate(self.slices):
            padded[r * self.chunk:r * self.chunk + hi - lo] = full[lo:hi]
        mine = full.new_empty(self.chunk)
        dist.reduce_scatter_single(mine, padded, group=self.group)
        lo, hi = self.slices[self.rank]
        return mine[:hi - lo].div_(self.world)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        if self.sparta_delta.requires_grad and torch.is_grad_enabled():
            return _ShardedDeltaLinear.apply(x, layer.weight, layer.bias, self.sparta_delta, self)
        return F.linear(x, layer.weight, layer.bias)

    def extra_repr(self) -> str:
        lo, hi = self.slices[self.rank]
        return f"k={self.sparta_indices.numel()}, owned={hi - lo} (rank {self.rank}/{self.world}), shape=({self.out_features}, {self.in_features})"


@dataclass
class ShardedSparta(SpartaModel):
    """The SpaRTA layers of an FSDP2-sharded model (`sharding.shard`), with SpartaModel's interface:
    counts and shapes are the whole adapter's, `state_tensors` gathers, `load_deltas` keeps this rank's
    slice; and the `OwnedShards` (tuners/base.py) that `sharding.ShardedModel` asks about its deltas."""

    group: Any = None  # the process group of the FSDP mesh

    @classmethod
    def own_rows(cls, sparta: SpartaModel, place: MeshRank) -> ShardedSparta:
        """Swap every SpaRTA layer for its row-owned form (before `fully_shard`, which must leave
        `ignored_params()` out: they are already sharded by ownership, and placed on `place.device` here)."""
        layers = {}
        for name, layer in sparta.layers.items():
            layers[name] = ShardedSpartaLinear(layer, place.rank, place.world, place.group, place.device)
            _set_submodule(sparta.model, name, layers[name])
        sparta.layers = {}  # the unsharded layers are gone from the model
        return cls(sparta.model, layers, dict(sparta.target_of), place.group)

    def ignored_params(self) -> set[nn.Parameter]:
        """The owned deltas: FSDP neither shards nor reduces them."""
        return {layer.sparta_delta for layer in self.layers.values()}

    def owns(self, tensor: torch.Tensor) -> bool:
        return self.owner(tensor) is not None

    def computed(self, tensor: torch.Tensor) -> bool:
        """The global indices and the owned entries' local positions: drawn from the seed on every rank."""
        return any(tensor is layer.sparta_indices or tensor is layer.sparta_local for layer in self.layers.values())

    def whole_shape(self, tensor: torch.Tensor) -> torch.Size:
        return self.owner(tensor).sparta_indices.shape

    def gather(self, tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.gather_delta(self.owner(tensor), value)

    def part(self, tensor: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """The owned slice of a whole per-entry tensor (no collective)."""
        layer = self.owner(tensor)
        lo, hi = layer.slices[layer.rank]
        return whole[lo:hi]

    def check_layout(self) -> None:
        from torch.distributed.tensor import DTensor, Shard

        for name, layer in self.layers.items():
            weight = layer.base_layer.weight
            first, end = layer.rows[layer.rank]
            if not isinstance(weight, DTensor) or tuple(weight.placements) != (Shard(0),) or weight.to_local().shape[0] != end - first:
                raise SpartaError(f"`{name}` is not sharded by rows as FSDP2's default (Shard(0)): do not pass shard_placement_fn")

    @torch.no_grad()
    def write_weights(self) -> None:
        """Every owned entry of every local shard to W0 + delta: after each optimizer step and load.
        Gathered weights are freed first (`dtensors.reshard`), so the next forward gathers the written shards."""
        reshard(self.model)
        for layer in self.layers.values():
            layer.write_weight()

    def num_owned(self) -> int:
        return sum(layer.sparta_delta.numel() for layer in self.layers.values())

    def owner(self, tensor: torch.Tensor) -> ShardedSpartaLinear | None:
        """The layer whose owned deltas (or their W0 values) `tensor` is, if any."""
        return next((layer for layer in self.layers.values() if tensor is layer.sparta_delta or tensor is layer.sparta_origin), None)

    def gather_delta(self, layer: ShardedSpartaLinear, value: torch.Tensor) -> torch.Tensor:
        """All k entries of a tensor shaped like `layer`'s owned deltas (the deltas, an AdamW moment):
        one all-gather of about k values. Every rank calls it."""
        padded = value.new_zeros(layer.chunk)
        padded[:value.numel()] = value
        gathered = padded.new_empty(layer.world * layer.chunk)
        dist.all_gather_single(gathered, padded, group=self.group)
        return torch.cat([gathered[r * layer.chunk:r * layer.chunk + hi - lo] for r, (lo, hi) in enumerate(layer.slices)])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """`<module>.indices` and `<module>.delta` for every layer, as SpartaModel.state_tensors writes
        them, gathered on every rank (one all-gather of about k fp32 values per layer)."""
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.indices"] = layer.sparta_indices.detach().cpu().contiguous()
            tensors[f"{name}.delta"] = self.gather_delta(layer, layer.sparta_delta.detach()).float().cpu().contiguous()
        return tensors

    @torch.no_grad()
    def load_deltas(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take this rank's slice of full (all-k) deltas, e.g. from an adapter or checkpoint file."""
        for name, layer in self.layers.items():
            delta = tensors[f"{name}.delta"]
            if delta.numel() != layer.sparta_indices.numel():
                raise SpartaError(f"adapter delta for `{name}` has {delta.numel()} values for {layer.sparta_indices.numel()} indices: the adapter file is corrupted")
            lo, hi = layer.slices[layer.rank]
            layer.sparta_delta.copy_(delta[lo:hi])
        self.write_weights()


@dataclass
class ShardedSpartaModel(sharding.ShardedModel):
    """`sharding.ShardedModel` of a model sharded with its SpaRTA layers (`shard`), which it names."""

    @property
    def sparta(self) -> ShardedSparta:
        return self.owned


def shard(model: nn.Module, *, sparta: SpartaModel, **options: Any) -> ShardedSpartaModel:
    """`sharding.shard(model, **options)` with `sparta`'s layers made row-owned first, for a model
    sharded without its `Adapter` (tests/test_fsdp.py, scripts/bench_fsdp_memory.py; `sparta train`
    goes through `SpartaTuner.shard`)."""
    sharded = sharding.shard(model, own=lambda place: ShardedSparta.own_rows(sparta, place), **options)
    return ShardedSpartaModel(sharded.model, sharded.group, sharded.owned)
