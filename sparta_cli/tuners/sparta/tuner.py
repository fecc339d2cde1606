"""SpaRTA as a method: fp32 deltas at random entries of the target matrices, plus the head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparta_cli.targets import is_head, resolve_targets
from sparta_cli.tuners.base import (
    Adapter,
    MeshRank,
    Overwritten,
    OwnedShards,
    Tuner,
    check_base_matches,
    count_params,
    freeze_all_but_heads,
    load_trained,
    trained_tensors,
)
from sparta_cli.tuners.sparta.checks import check_adapter_tensors
from sparta_cli.tuners.sparta.config import SpartaConfig
from sparta_cli.tuners.sparta.layer import written_values
from sparta_cli.tuners.sparta.model import SpartaModel, split_indices

DELTA_PARAM = "sparta_delta"  # the deltas' parameter name in each SpaRTA layer


class SpartaTuner(Tuner):
    config = SpartaConfig
    export_formats = ("sparta", "peft", "peft-sparta")
    adds_up = True
    # accelerate's plugins would flatten the weights under its layers; training.sharding=fsdp shards
    # the deltas by the weights' rows instead (sharded.py, docs/scaling.md)
    shardable = False

    def resolve_settings(self, cfg: SpartaConfig, model: nn.Module) -> SpartaConfig:
        """A budget's density over `model`: the paper counts all the base model's parameters, embeddings
        included and each shared (tied) tensor once, without the new classification head (`score` /
        `classifier`), against the entries of every target matrix."""
        if cfg.budget is None:
            return cfg
        base = sum(p.numel() for name, p in model.named_parameters() if not is_head(name))
        sizes = [model.get_submodule(name).weight.numel() for name in resolve_targets(model, cfg.targets)]
        return cfg.with_budget(base, sizes)

    def apply(self, model: nn.Module, cfg: SpartaConfig, seed: int, head_modules: list[str]) -> Adapter:
        cfg = self.resolve_settings(cfg, model)
        base_params = count_params(model)
        freeze_all_but_heads(model, head_modules)
        sparta = SpartaModel.inject(model, cfg.targets, cfg.density, seed)
        return Adapter(self, model, model, head_modules, base_params, sparta)

    def load(self, run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Adapter:
        check_base_matches(config, model)
        tensors = self.read_tensors(run_dir)
        base_params = count_params(model)
        sparta = SpartaModel.attach(model, split_indices(tensors))
        sparta.load_deltas(tensors)
        load_trained(model, tensors)
        return self._loaded(model, config, base_params, sparta)

    def num_trainable(self, adapter: Adapter) -> int:
        """The deltas are counted by their layers' indices: a sharded layer's parameter is a rank's slice."""
        layers = adapter.sparta.layers.values()
        deltas = sum(layer.sparta_indices.numel() for layer in layers if layer.sparta_delta.requires_grad)
        return deltas + sum(p.numel() for name, p in adapter.trainable() if not name.endswith(DELTA_PARAM))

    def counts_by_target(self, adapter: Adapter) -> dict[str, int]:
        return dict(adapter.sparta.counts_by_target())

    def target_shapes(self, adapter: Adapter) -> dict[str, list[int]]:
        return adapter.sparta.shapes()

    def mask_digests(self, adapter: Adapter) -> dict[str, str]:
        return adapter.sparta.mask_digests()

    def saved_tensors(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        return {**adapter.sparta.state_tensors(), **trained_tensors(adapter, skip=DELTA_PARAM)}

    def follow_steps_of(self, adapter: Adapter, optimizer: torch.optim.Optimizer) -> None:
        adapter.sparta.write_after_steps_of(optimizer)

    def write_weights(self, adapter: Adapter) -> None:
        adapter.sparta.write_weights()

    def shard(self, adapter: Adapter, place: MeshRank) -> OwnedShards:
        """Every SpaRTA layer becomes its row-owned form; `adapter.sparta` is then the sharded one."""
        from sparta_cli.tuners.sparta.sharded import ShardedSparta

        adapter.sparta = ShardedSparta.own_rows(adapter.sparta, place)
        return adapter.sparta

    def check_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> None:
        check_adapter_tensors(tensors, config, path)

    @torch.no_grad()
    def apply_in_place(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> Overwritten:
        """The head's tensors, and at each target matrix's k entries `(W0 + delta).to(dtype)`: the
        value a SpaRTA layer writes and `sparta merge` writes."""
        params = dict(model.named_parameters())
        indices = split_indices(tensors)
        weights = {module: params[f"{module}.weight"] for module in indices}  # a missing one fails before anything is written
        overwritten = super().apply_in_place(model, tensors)
        for module, weight in weights.items():
            flat = indices[module].to(weight.device).long()
            before = weight.view(-1)[flat].clone()
            overwritten.entries[f"{module}.weight"] = (flat, before)
            weight.view(-1).index_copy_(0, flat, written_values(before, tensors[f"{module}.delta"].to(weight.device), weight.dtype))
        return overwritten
