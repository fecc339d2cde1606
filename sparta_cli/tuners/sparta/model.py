"""Model surgery for SpaRTA: wrap the target linears, freeze the rest, save and load deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparta_cli.errors import SpartaError
from sparta_cli.targets import resolve_targets
from sparta_cli.tuners.sparta.layer import SpartaLinear
from sparta_cli.tuners.sparta.mask import indices_digest, num_selected, select_indices


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@dataclass
class SpartaModel:
    """The SpaRTA layers of one model, by module name, and what chose them."""

    model: nn.Module
    layers: dict[str, SpartaLinear]
    target_of: dict[str, str] = field(default_factory=dict)

    @classmethod
    def inject(cls, model: nn.Module, targets: list[str], density: float, seed: int) -> SpartaModel:
        """Wrap every target linear of `model` in place with exactly round(density*numel) trainable entries."""
        chosen = resolve_targets(model, targets)
        for name in chosen:
            weight = model.get_submodule(name).weight
            if num_selected(weight.numel(), density) == 0:
                least = 0.5 / weight.numel()
                raise SpartaError(
                    f"adapter.density={density} gives 0 trainable entries in {name} "
                    f"({tuple(weight.shape)}): use a density above {least:.2g}"
                )
        layers = {}
        for name in chosen:
            base = model.get_submodule(name)
            indices = select_indices(base.weight.numel(), density, seed, name)
            layers[name] = SpartaLinear(base, indices)
            _set_submodule(model, name, layers[name])
        return cls(model, layers, chosen)

    @classmethod
    def attach(cls, model: nn.Module, indices: dict[str, torch.Tensor]) -> SpartaModel:
        """Wrap the named linears with saved indices (loading an adapter)."""
        layers = {}
        for name, idx in indices.items():
            try:
                base = model.get_submodule(name)
            except AttributeError:
                raise SpartaError(f"the adapter targets `{name}`, which this base model does not have: load it on the base it was trained on") from None
            if not isinstance(base, nn.Linear):
                raise SpartaError(f"the adapter targets `{name}`, which is not a linear layer in this base model: load it on the base it was trained on")
            if idx.numel() and int(idx.max()) >= base.weight.numel():
                raise SpartaError(f"adapter indices for `{name}` exceed its weight {tuple(base.weight.shape)}: the adapter was made for another base model")
            layers[name] = SpartaLinear(base, idx)
            _set_submodule(model, name, layers[name])
        return cls(model, layers, dict.fromkeys(indices, "saved"))

    def num_trainable(self) -> int:
        return sum(layer.sparta_indices.numel() for layer in self.layers.values())

    def counts_by_target(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, layer in self.layers.items():
            counts[self.target_of[name]] = counts.get(self.target_of[name], 0) + layer.sparta_indices.numel()
        return counts

    def mask_digests(self) -> dict[str, str]:
        """sha256 of every layer's indices, by module name (what a checkpoint must have trained)."""
        return {name: indices_digest(layer.sparta_indices) for name, layer in self.layers.items()}

    def shapes(self) -> dict[str, list[int]]:
        return {name: [layer.out_features, layer.in_features] for name, layer in self.layers.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """`<module>.indices` (int32/int64, sorted) and `<module>.delta` (fp32) for every layer."""
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.indices"] = layer.sparta_indices.detach().cpu().contiguous()
            tensors[f"{name}.delta"] = layer.sparta_delta.detach().float().cpu().contiguous()
        return tensors

    @torch.no_grad()
    def load_deltas(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers.items():
            delta = tensors[f"{name}.delta"]
            if delta.shape != layer.sparta_delta.shape:
                raise SpartaError(f"adapter delta for `{name}` has {delta.numel()} values for {layer.sparta_indices.numel()} indices: the adapter file is corrupted")
            layer.sparta_delta.copy_(delta)
        self.write_weights()

    @torch.no_grad()
    def write_weights(self) -> None:
        """Make every target weight hold W0 + delta: after each optimizer step and each load of deltas."""
        for layer in self.layers.values():
            layer.write_weight()

    def write_after_steps_of(self, optimizer: torch.optim.Optimizer) -> None:
        """Write the weights after every step of `optimizer`, whatever way it updates the deltas
        (fused kernels and `.data` writes leave no trace in the tensors' version counters)."""
        optimizer.register_step_post_hook(lambda *_: self.write_weights())

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Write W0 + delta into every target and put the plain linears back."""
        for name, layer in self.layers.items():
            layer.write_weight()
            _set_submodule(self.model, name, layer.base_layer)
        self.layers = {}
        return self.model

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """Restore W0 bit for bit in every target and put the plain linears back."""
        for name, layer in self.layers.items():
            layer.unmerge()
            _set_submodule(self.model, name, layer.base_layer)
        self.layers = {}
        return self.model


def split_indices(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `<module>.indices` entries of an adapter file, keyed by module name."""
    return {key.removesuffix(".indices"): value for key, value in tensors.items() if key.endswith(".indices")}
