"""One SpaRTA adapter resident beside the one base model, swapped in and out of it in place.

Why: a SpaRTA adapter changes k entries of a few dense weights. Activating it writes W0 + delta at
those entries (an O(k) gather and scatter), deactivating writes the saved W0 back, bit for bit; the
head is swapped by reference. No second copy of any weight, no extra compute per token.
"""

from __future__ import annotations

import torch
from torch import nn

from sparta_cli.errors import SpartaError
from sparta_cli.runs import TRAINED_PREFIX
from sparta_cli.tuners.base import in_modules


class SparseSwap:
    """An adapter as (indices, fp32 deltas) per target weight plus its head tensors, on `model`'s device.

    `apply()` makes `model` compute the adapted network, `revert()` makes it the base again exactly.
    Only one adapter may be applied to a model at a time (the caller's invariant: `ServedModels.activate`)."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor], head_modules: list[str]) -> None:
        device = next(model.parameters()).device
        params = dict(model.named_parameters())
        self.weights: dict[str, nn.Parameter] = {}
        self.deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, indices in tensors.items():
            if not key.endswith(".indices"):
                continue
            name = key.removesuffix(".indices")
            weight = params.get(f"{name}.weight")
            if weight is None or not isinstance(model.get_submodule(name), nn.Linear):
                raise SpartaError(f"the adapter targets `{name}`, which is not a linear layer of this base model: serve it on its own base")
            if indices.numel() and int(indices.max()) >= weight.numel():
                raise SpartaError(f"adapter indices for `{name}` exceed its weight {tuple(weight.shape)}: the adapter was made for another base model")
            self.weights[name] = weight
            self.deltas[name] = (indices.to(device), tensors[f"{name}.delta"].float().to(device))
        self.head: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if not key.startswith(TRAINED_PREFIX):
                continue
            name = key.removeprefix(TRAINED_PREFIX)
            if name not in params or not in_modules(name, head_modules):
                raise SpartaError(f"the adapter trains `{name}`, which is not part of this base model's head: serve takes SpaRTA and head-only runs")
            self.head[name] = value.to(device)
        self.params = {name: params[name] for name in self.head}
        self._saved_w0: dict[str, torch.Tensor] | None = None
        self._saved_head: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """What it keeps resident: k x (index + fp32 delta) bytes per target, plus its head."""
        tensors = [t for pair in self.deltas.values() for t in pair] + list(self.head.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def applied(self) -> bool:
        return self._saved_w0 is not None

    @torch.no_grad()
    def apply(self) -> None:
        """Write W0 + delta at the adapter's entries (saving W0 there) and put its head in."""
        if self._saved_w0 is not None:
            raise RuntimeError("this adapter is already applied")
        saved = {}
        for name, (indices, delta) in self.deltas.items():
            flat = self.weights[name].view(-1)
            index = indices.long()
            origin = flat.index_select(0, index)
            flat.index_copy_(0, index, (origin.float() + delta).to(flat.dtype))  # SpartaLinear.write_weight's values
            saved[name] = origin
        for name, value in self.head.items():
            self._saved_head[name] = self.params[name].data
            self.params[name].data = value
        self._saved_w0 = saved

    @torch.no_grad()
    def revert(self) -> None:
        """Write the saved W0 back (bit for bit) and restore the base's head."""
        if self._saved_w0 is None:
            raise RuntimeError("this adapter is not applied")
        for name, origin in self._saved_w0.items():
            indices, _ = self.deltas[name]
            self.weights[name].view(-1).index_copy_(0, indices.long(), origin)
        for name, value in self._saved_head.items():
            self.params[name].data = value
        self._saved_head = {}
        self._saved_w0 = None
