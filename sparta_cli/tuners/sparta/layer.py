"""The SpaRTA linear layer: a frozen dense weight that holds W0 + delta at k chosen entries.

Why this shape: the forward is the ordinary dense matmul, so it costs exactly what
the frozen model costs. The backward returns the input gradient as usual and, for
the deltas, only the k chosen entries of g^T x. No gradient is ever stored for the
frozen weight, and the deltas stay fp32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below this share of a matrix's entries, gathering the k products from the
# activations beats a dense g^T x followed by a gather (see docs/design.md); above it
# the dense GEMM wins. On CPU the GEMM is so much more efficient than the strided
# gathers that the crossover is far lower (torch 2.13, Xeon, 1 thread: at 512x512 and
# 2048x2048 with 512 tokens the sampled product wins 3-30x at 1/1000 and loses 3-5x
# at 1/100 and 1/200; scripts/bench_step.py rows sparta at 0.01 vs limit).
SAMPLED_PRODUCT_MAX_DENSITY = 1.0 / 64
SAMPLED_PRODUCT_MAX_DENSITY_CPU = 1.0 / 400
# Upper bound on the (tokens x chunk) temporary of the sampled product, in elements.
SAMPLED_CHUNK_ELEMENTS = 1 << 24


def sparse_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """The entries `indices` (flat, row-major) of grad_out^T @ x, as fp32.

    grad_out: (..., out), x: (..., in). Equal to `(grad_out^T x).flatten()[indices]`.
    """
    g = grad_out.reshape(-1, grad_out.shape[-1])
    a = x.reshape(-1, x.shape[-1])
    k = indices.numel()
    numel = g.shape[1] * in_features
    flat = indices.long()
    if k > numel * (SAMPLED_PRODUCT_MAX_DENSITY if g.is_cuda else SAMPLED_PRODUCT_MAX_DENSITY_CPU):
        return (g.t() @ a).view(-1).index_select(0, flat).float()
    rows, cols = flat // in_features, flat % in_features
    chunk = max(1, SAMPLED_CHUNK_ELEMENTS // max(1, a.shape[0]))
    out = torch.empty(k, dtype=torch.float32, device=g.device)
    for start in range(0, k, chunk):
        end = min(k, start + chunk)
        gathered = g.index_select(1, rows[start:end]).float() * a.index_select(1, cols[start:end]).float()
        out[start:end] = gathered.sum(0)
    return out


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x W^T + b, where W already holds W0 + delta; gradients flow to x and delta only."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, indices):  # type: ignore[override]
        ctx.save_for_backward(x, weight, indices)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, indices = ctx.saved_tensors
        # under autocast the forward ran in grad_out's dtype; the backward matches it
        compute = grad_out.dtype
        grad_x = (grad_out @ weight.to(compute)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_delta = None
        if ctx.needs_input_grad[3]:
            grad_delta = sparse_weight_grad(grad_out, x.to(compute), indices, weight.shape[1])
        return grad_x, None, None, grad_delta, None


class SpartaLinear(nn.Module):
    """Wraps a frozen `nn.Linear`; trains fp32 deltas at fixed flat indices of its weight.

    The wrapped weight is rewritten at the chosen entries as `(W0 + delta).to(dtype)`
    from the stored original values whenever the deltas have changed, so repeated
    updates never accumulate rounding error, and `unmerge` restores W0 bit for bit.
    """

    def __init__(self, base_layer: nn.Linear, indices: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        indices = indices.to(weight.device)
        self.register_buffer("sparta_indices", indices)
        self.register_buffer("sparta_origin", weight.detach().view(-1)[indices.long()].clone())
        self.sparta_delta = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=weight.device))
        self._written: tuple[int, int] | None = self._delta_state()  # zero deltas: W already is W0

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _delta_state(self) -> tuple[int, int]:
        return (self.sparta_delta.data_ptr(), self.sparta_delta._version)

    @torch.no_grad()
    def write_weight(self) -> None:
        """Make the dense weight hold W0 + delta at the chosen entries (exact, no drift)."""
        weight = self.base_layer.weight
        values = (self.sparta_origin.float() + self.sparta_delta.detach()).to(weight.dtype)
        weight.view(-1).index_copy_(0, self.sparta_indices.long(), values)
        self._written = self._delta_state()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 exactly; the deltas are kept and written again on the next forward."""
        weight = self.base_layer.weight
        weight.view(-1).index_copy_(0, self.sparta_indices.long(), self.sparta_origin.to(weight.dtype))
        self._written = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._written != self._delta_state():
            self.write_weight()
        layer = self.base_layer
        if self.sparta_delta.requires_grad and torch.is_grad_enabled():
            return _SparseDeltaLinear.apply(x, layer.weight, layer.bias, self.sparta_delta, self.sparta_indices)
        return F.linear(x, layer.weight, layer.bias)

    def extra_repr(self) -> str:
        return f"k={self.sparta_indices.numel()}, shape=({self.out_features}, {self.in_features})"
