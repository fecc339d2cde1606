"""One SpaRTA adapter resident beside the one base model, swapped in and out of it in place.

Why: a SpaRTA adapter changes k entries of a few dense weights. Activating it writes W0 + delta at
those entries (an O(k) gather and scatter), deactivating writes the saved W0 back, bit for bit; the
head is copied in. No second copy of any weight, no extra compute per token. The writing itself is
the method's (`Tuner.apply_in_place` / `revert`), the same values a SpaRTA layer and `sparta merge` write.
Each target's entries are kept row-compressed (CSR: k column indices, k fp32 deltas, a row pointer),
the form a batch of several adapters multiplies by (`mixed.row_adapters`); the flat indices an
in-place write takes follow from it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sparta_cli.errors import SpartaError
from sparta_cli.runs import TRAINED_PREFIX
from sparta_cli.tuners import get_tuner
from sparta_cli.tuners.base import Overwritten, in_modules


class BaseParameters(nn.Module):
    """A base model's parameters under the names they had when it was loaded, as the methods'
    `apply_in_place` / `revert` look them up: the same `Parameter` objects, so writes reach the model.

    Why: PEFT's multi-adapter API wraps the layers it adapts (`value` -> `value.base_layer`, the head ->
    `classifier.original_module`), renaming the very weights a SpaRTA adapter writes; and a swap then
    finds its tensors in a dict instead of walking the module tree (a swap on a tiny model: 0.5 ms -> ~0.1 ms)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._params = dict(model.named_parameters())
        self._linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        self._modules_by_name = dict(model.named_modules())  # the original modules, which PEFT's wrappers still call

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return iter(self._params.items())

    def is_linear(self, name: str) -> bool:
        return name in self._linears

    def module(self, name: str) -> nn.Module:
        """The module under the name it had at load (PEFT's `value.base_layer` is still `value` here)."""
        return self._modules_by_name[name]


def row_compressed(flat: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The sparse delta with `values` at the strictly increasing `flat` indices of a (rows, columns)
    weight, as a CSR matrix whose indices keep `flat`'s integer dtype (int32 below 2**31 entries, as
    adapter files store them): no wider temporary, so loading many adapters leaves no holes in the heap."""
    rows, columns = shape
    bounds = torch.arange(0, rows * columns + 1, columns, device=flat.device, dtype=flat.dtype)  # each row's first flat index
    crow = torch.searchsorted(flat, bounds, out_int32=flat.dtype == torch.int32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, flat % columns, values, (rows, columns), check_invariants=False)


def flat_indices(delta: torch.Tensor) -> torch.Tensor:
    """The flat (row-major) indices of a CSR matrix's entries: what an in-place write takes. Each
    entry's row counts the rows that end at or before it (a cumsum; `repeat_interleave`, which always
    runs in parallel, took milliseconds per call on a shared 2-core machine)."""
    rows, columns = delta.shape
    crow = delta.crow_indices().long()
    ends = torch.zeros(delta.values().numel() + 1, dtype=torch.long, device=crow.device)
    ends.index_add_(0, crow[1:], torch.ones(rows, dtype=torch.long, device=crow.device))
    return ends[:-1].cumsum(0) * columns + delta.col_indices()


class SparseSwap:
    """An adapter as (indices, fp32 deltas) per target weight plus its head tensors, on `model`'s device.

    `apply()` makes `model` compute the adapted network, `revert()` makes it the base again exactly; the
    checks here turn an adapter that does not fit the base into one line before it is ever applied.
    Only one adapter may be applied to a model at a time (the caller's invariant: `ServedModels.activate`)."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor], head_modules: list[str], method: str = "sparta") -> None:
        model = model if isinstance(model, BaseParameters) else BaseParameters(model)
        device = next(model.parameters()).device
        self.model, self.tuner = model, get_tuner(method)
        params = dict(model.named_parameters())
        self.deltas: dict[str, torch.Tensor] = {}  # target linear -> its delta, a CSR matrix of fp32 values
        for key, indices in tensors.items():
            if not key.endswith(".indices"):
                continue
            name = key.removesuffix(".indices")
            weight = params.get(f"{name}.weight")
            if weight is None or not model.is_linear(name):
                raise SpartaError(f"the adapter targets `{name}`, which is not a linear layer of this base model: serve it on its own base")
            flat = indices.to(device)
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= weight.numel()):
                raise SpartaError(f"adapter indices for `{name}` exceed its weight {tuple(weight.shape)}: the adapter was made for another base model")
            if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
                raise SpartaError(f"adapter indices for `{name}` repeat or are out of order: the adapter file is damaged; retrain or restore it")
            self.deltas[name] = row_compressed(flat, tensors[f"{name}.delta"].float().to(device), weight.shape)
        self.head: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if not key.startswith(TRAINED_PREFIX):
                continue
            name = key.removeprefix(TRAINED_PREFIX)
            if name not in params or not in_modules(name, head_modules):
                raise SpartaError(f"the adapter trains `{name}`, which is not part of this base model's head: serve takes SpaRTA and head-only runs")
            if value.shape[1:] != params[name].shape[1:] or value.dim() != params[name].dim():
                raise SpartaError(f"the adapter's `{name}` is {tuple(value.shape)}, which does not fit this base's {tuple(params[name].shape)}: "
                                  "serve it on its own base")
            self.head[name] = value.to(device)
        # the head by module, as a batch of several adapters runs each row's own (`mixed.row_adapters`)
        self.head_modules: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in self.head.items():
            module = max((m for m in head_modules if name.startswith(m + ".")), key=len, default=name.rpartition(".")[0])
            self.head_modules.setdefault(module, {})[name.removeprefix(module + ".")] = value
        self._overwritten: Overwritten | None = None

    @property
    def nbytes(self) -> int:
        """What it keeps resident: k x (column index + fp32 delta) bytes and a row pointer per target, plus its head."""
        tensors = [t for delta in self.deltas.values() for t in (delta.crow_indices(), delta.col_indices(), delta.values())]
        return sum(t.numel() * t.element_size() for t in tensors + list(self.head.values()))

    @property
    def applied(self) -> bool:
        return self._overwritten is not None

    def apply(self) -> None:
        """Write W0 + delta at the adapter's entries and put its head in (the method's `apply_in_place`)."""
        if self._overwritten is not None:
            raise RuntimeError("this adapter is already applied")
        tensors = {**{f"{name}.indices": flat_indices(delta) for name, delta in self.deltas.items()},
                   **{f"{name}.delta": delta.values() for name, delta in self.deltas.items()},
                   **{TRAINED_PREFIX + name: value for name, value in self.head.items()}}
        self._overwritten = self.tuner.apply_in_place(self.model, tensors)

    def revert(self) -> None:
        """Write back what `apply` overwrote: the base again, bit for bit (the method's `revert`)."""
        if self._overwritten is None:
            raise RuntimeError("this adapter is not applied")
        self.tuner.revert(self.model, self._overwritten)
        self._overwritten = None


class PeftSwap:
    """A LoRA or DoRA run as one named adapter of the one `PeftModel` on the base (PEFT's multi-adapter
    API, as LoRA servers batch them): `apply()` enables PEFT's layers and selects it (`set_adapter`),
    `revert()` disables them, so the base and SpaRTA adapters (written in place) compute without it.
    Its low-rank factors and its head copy (PEFT's modules_to_save) stay resident beside the base."""

    def __init__(self, peft_model: nn.Module, adapter_name: str) -> None:
        self.peft_model, self.adapter_name = peft_model, adapter_name
        own = [param for name, param in peft_model.named_parameters() if f".{adapter_name}." in name or name.endswith(f".{adapter_name}")]
        self.nbytes = sum(param.numel() * param.element_size() for param in own)
        self.applied = False

    def apply(self) -> None:
        self.peft_model.base_model.enable_adapter_layers()
        self.peft_model.set_adapter(self.adapter_name, inference_mode=True)
        self.applied = True

    def revert(self) -> None:
        self.peft_model.base_model.disable_adapter_layers()
        self.applied = False

    def unload(self) -> bool:
        """Drop its layers' weights from the model (the caller has reverted it, between batches). The last
        adapter takes PEFT's wrappers with it, the base plain again (True): PEFT loads no adapter into a
        PeftModel left with none."""
        if list(self.peft_model.peft_config) == [self.adapter_name]:
            self.peft_model.unload()
            return True
        self.peft_model.delete_adapter(self.adapter_name)
        return False
