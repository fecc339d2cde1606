"""Head only: the classification head trains, the body stays frozen (the floor every method must beat)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from sparta_cli.tuners.base import Adapter, Tuner, count_params, freeze_all_but_heads

if TYPE_CHECKING:
    from sparta_cli.config import AdapterConfig


class HeadTuner(Tuner):
    name = "head"
    size_text = "it trains only the classification head"
    display_name = "head"
    default_lr = 2e-3
    adds_up = True  # a head-only run merges with sparta runs (its head can be the one kept)

    def apply(self, model: nn.Module, cfg: AdapterConfig, seed: int, head_modules: list[str]) -> Adapter:
        base_params = count_params(model)
        freeze_all_but_heads(model, head_modules)
        return Adapter(self, model, model, head_modules, base_params)
