"""SpaRTA as a method: fp32 deltas at random entries of the target matrices, plus the head."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from sparta_cli.lr_rule import sparta_lr
from sparta_cli.runs import read_adapter_tensors
from sparta_cli.tuners.base import (
    Adapter,
    Tuner,
    check_base_matches,
    count_params,
    freeze_all_but_heads,
    load_trained,
)
from sparta_cli.tuners.sparta.model import SpartaModel, split_indices

if TYPE_CHECKING:
    from sparta_cli.config import AdapterConfig


class SpartaTuner(Tuner):
    name = "sparta"
    display_name = "SpaRTA"
    config_keys = ("density", "targets")
    size_text = "its size is adapter.density"
    export_formats = ("sparta", "peft", "peft-sparta")
    adds_up = True
    # accelerate's plugins would flatten the weights under its layers; training.sharding=fsdp shards
    # the deltas by the weights' rows instead (sharded.py, docs/scaling.md)
    shardable = False

    def name_setting(self, cfg: AdapterConfig) -> str:
        return f"-d{cfg.density}"

    def auto_lr(self, cfg: AdapterConfig) -> float:
        return sparta_lr(cfg.density)

    def apply(self, model: nn.Module, cfg: AdapterConfig, seed: int, head_modules: list[str]) -> Adapter:
        base_params = count_params(model)
        freeze_all_but_heads(model, head_modules)
        sparta = SpartaModel.inject(model, cfg.targets, cfg.density, seed)
        return Adapter(self, model, model, head_modules, base_params, sparta)

    def load(self, run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Adapter:
        check_base_matches(config, model)
        tensors = read_adapter_tensors(run_dir)
        base_params = count_params(model)
        sparta = SpartaModel.attach(model, split_indices(tensors))
        sparta.load_deltas(tensors)
        load_trained(model, tensors)
        return self._loaded(model, config, base_params, sparta)
