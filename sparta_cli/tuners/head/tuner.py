"""Head only: the classification head trains, the body stays frozen (the floor every method must beat)."""

from __future__ import annotations

from torch import nn

from sparta_cli.tuners.base import Adapter, Tuner, count_params, freeze_all_but_heads
from sparta_cli.tuners.head.config import HeadConfig


class HeadTuner(Tuner):
    config = HeadConfig
    adds_up = True  # a head-only run merges with sparta runs (its head can be the one kept)
    trains_body = False

    def apply(self, model: nn.Module, cfg: HeadConfig, seed: int, head_modules: list[str]) -> Adapter:
        base_params = count_params(model)
        freeze_all_but_heads(model, head_modules)
        return Adapter(self, model, model, head_modules, base_params)
