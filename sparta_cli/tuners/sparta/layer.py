"""The SpaRTA linear layer: a frozen dense weight that holds W0 + delta at k chosen entries.

Why this shape: the forward is the ordinary dense matmul, so it costs exactly what
the frozen model costs. The backward returns the input gradient as usual and, for
the deltas, only the k chosen entries of g^T x. No gradient is ever stored for the
frozen weight, and the deltas stay fp32 whatever the model's dtype.

The dense weight is rewritten from the deltas explicitly (`SpartaLinear.write_weight`,
called by an optimizer step post-hook and after every load, see `SpartaModel`), never
inferred from the delta's version counter: a fused optimizer or a write through
`.data` changes the values without bumping it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

GradPath = Literal["dense", "sampled"]


@dataclass(frozen=True)
class DeviceCost:
    """What one device class achieves, for choosing the delta-gradient path (docs/design.md).

    flops: dense GEMM throughput (FLOP/s); bandwidth: memory throughput (bytes/s) as the
    gathers see it; gather_bytes: bytes the sampled product moves per (token, entry).
    """

    flops: float
    bandwidth: float
    gather_bytes: float = 20.0


# H100/H200: ~800 TFLOP/s bf16 GEMM, ~4 TB/s HBM, 20 bytes per (token, entry) (two 2-byte
# gathers, their fp32 copies, the product and its reduction): the sampled product wins only
# below density bandwidth / (10 * flops) = 1/2000, and its temporaries are larger too.
CUDA_COST = DeviceCost(flops=800e12, bandwidth=4e12)
# CPU (torch 2.13, Xeon, 1 thread): the strided gathers run far below the memory bandwidth;
# 'bandwidth' is fitted so that the rule reproduces the measured crossover near 1/400 (at
# 512x512 and 2048x2048 with 512 tokens the sampled product wins 3-30x at 1/1000 and loses 3-5x
# at 1/100 and 1/200; scripts/bench_step.py rows sparta at 0.01 vs limit).
CPU_COST = DeviceCost(flops=50e9, bandwidth=1.25e9)
# Upper bound on the (tokens x chunk) temporary of the sampled product, in elements.
SAMPLED_CHUNK_ELEMENTS = 1 << 24
# "dense" or "sampled" forces one path everywhere (tests and scripts/gpu_check.py compare both).
FORCED_GRAD_PATH: GradPath | None = None
# SPARTA_CHECK_WEIGHTS=1: every forward verifies that the weight holds W0 + delta (a host sync).
CHECK_WEIGHTS_ENV = "SPARTA_CHECK_WEIGHTS"


def grad_path(tokens: int, out_features: int, in_features: int, k: int, device_type: str) -> GradPath:
    """The cheaper way to get k entries of the (out x in) product g^T x over `tokens` rows.

    dense:   2 * tokens * out * in FLOP, at least one write of the out x in result;
    sampled: gather_bytes * tokens * k bytes. Tokens cancel in the leading terms, so on a
    GPU the sampled product pays only below density ~ bandwidth / (10 * flops).
    """
    if FORCED_GRAD_PATH is not None:
        return FORCED_GRAD_PATH
    cost = CUDA_COST if device_type == "cuda" else CPU_COST
    numel = out_features * in_features
    dense_s = max(2.0 * tokens * numel / cost.flops, 4.0 * numel / cost.bandwidth)
    sampled_s = cost.gather_bytes * tokens * k / cost.bandwidth
    return "sampled" if sampled_s < dense_s else "dense"


def sparse_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int,
                       path: GradPath | None = None) -> torch.Tensor:
    """The entries `indices` (flat, row-major) of grad_out^T @ x, as fp32.

    grad_out: (..., out), x: (..., in). Equal to `(grad_out^T x).flatten()[indices]`;
    `path` defaults to the cheaper one (`grad_path`).
    """
    g = grad_out.reshape(-1, grad_out.shape[-1])
    a = x.reshape(-1, x.shape[-1])
    k = indices.numel()
    flat = indices.long()
    if (path or grad_path(a.shape[0], g.shape[1], in_features, k, g.device.type)) == "dense":
        return (g.t() @ a).view(-1).index_select(0, flat).float()
    rows, cols = flat // in_features, flat % in_features
    chunk = max(1, SAMPLED_CHUNK_ELEMENTS // max(1, a.shape[0]))
    out = torch.empty(k, dtype=torch.float32, device=g.device)
    for start in range(0, k, chunk):
        end = min(k, start + chunk)
        gathered = g.index_select(1, rows[start:end]).float() * a.index_select(1, cols[start:end]).float()
        out[start:end] = gathered.sum(0)
    return out


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype autocast runs the linear in (x itself outside autocast): keeping this one for
    the backward, as autocast's own linear does, halves the saved activation of an fp32 x under bf16."""
    device_type = x.device.type
    return x.to(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else x


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x W^T + b, where W already holds W0 + delta; gradients flow to x and delta only."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, indices):  # type: ignore[override]
        ctx.x_dtype = x.dtype
        x = autocast_input(x)
        ctx.save_for_backward(x, weight, indices)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, indices = ctx.saved_tensors
        # under autocast the forward ran in grad_out's dtype; the backward matches it
        compute = grad_out.dtype
        grad_x = (grad_out @ weight.to(compute)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_delta = None
        if ctx.needs_input_grad[3]:
            grad_delta = sparse_weight_grad(grad_out, x.to(compute), indices, weight.shape[1])
        return grad_x, None, None, grad_delta, None


def written_values(origin: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a chosen entry holds: `(W0 + delta).to(dtype)`, summed in fp32 from the original value, so
    rewriting it never accumulates rounding (the layers, `sparta merge` and an in-place apply agree)."""
    return (origin.float() + delta).to(dtype)


class WrappedLinear(nn.Module):
    """What every SpaRTA linear shares (one process, or row-sharded under FSDP): the frozen linear it
    wraps and the value W0 + delta that its chosen entries must hold."""

    base_layer: nn.Linear
    sparta_origin: torch.Tensor
    sparta_delta: nn.Parameter

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _target_values(self, dtype: torch.dtype) -> torch.Tensor:
        return written_values(self.sparta_origin, self.sparta_delta.detach(), dtype)


class SpartaLinear(WrappedLinear):
    """Wraps a frozen `nn.Linear`; trains fp32 deltas at fixed flat indices of its weight.

    `write_weight` sets the chosen entries to `(W0 + delta).to(dtype)` from the stored
    original values, so repeated updates never accumulate rounding error, and `unmerge`
    restores W0 bit for bit. Whoever changes the deltas calls it (`SpartaModel` does).
    """

    def __init__(self, base_layer: nn.Linear, indices: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        if weight.is_meta:  # a skeleton (an FSDP rank that receives its weights from rank 0): the indices stay real
            origin = torch.empty(indices.numel(), dtype=weight.dtype, device=weight.device)
        else:
            indices = indices.to(weight.device)
            origin = weight.detach().view(-1)[indices.long()].clone()
        self.register_buffer("sparta_indices", indices)
        self.register_buffer("sparta_origin", origin)
        self.sparta_delta = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=weight.device))

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @torch.no_grad()
    def write_weight(self) -> None:
        """Make the dense weight hold W0 + delta at the chosen entries (exact, no drift)."""
        weight = self.base_layer.weight
        weight.view(-1).index_copy_(0, self.sparta_indices.long(), self._target_values(self.base_layer.weight.dtype))

    @torch.no_grad()
    def weight_is_written(self) -> bool:
        """Whether the dense weight holds exactly W0 + delta at the chosen entries (a host sync)."""
        held = self.base_layer.weight.view(-1).index_select(0, self.sparta_indices.long())
        return bool(torch.equal(held, self._target_values(self.base_layer.weight.dtype)))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 exactly; the deltas are kept (`write_weight` puts them back)."""
        weight = self.base_layer.weight
        weight.view(-1).index_copy_(0, self.sparta_indices.long(), self.sparta_origin.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.environ.get(CHECK_WEIGHTS_ENV) == "1" and not self.weight_is_written():
            raise RuntimeError(f"{CHECK_WEIGHTS_ENV}: the weight does not hold W0 + delta; something changed the deltas "
                               "without SpartaModel.write_weights() (register it as an optimizer step post-hook)")
        layer = self.base_layer
        if self.sparta_delta.requires_grad and torch.is_grad_enabled():
            return _SparseDeltaLinear.apply(x, layer.weight, layer.bias, self.sparta_delta, self.sparta_indices)
        return F.linear(x, layer.weight, layer.bias)

    def extra_repr(self) -> str:
        return f"k={self.sparta_indices.numel()}, shape=({self.out_features}, {self.in_features})"
