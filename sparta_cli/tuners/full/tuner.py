"""Full fine-tuning: every parameter of the model trains (the reference the sparse methods aim at)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from sparta_cli.tuners.base import Adapter, Tuner, count_params

if TYPE_CHECKING:
    from sparta_cli.config import AdapterConfig


class FullTuner(Tuner):
    name = "full"
    size_text = "it trains every weight"
    display_name = "full"

    def apply(self, model: nn.Module, cfg: AdapterConfig, seed: int, head_modules: list[str]) -> Adapter:
        model.requires_grad_(True)
        return Adapter(self, model, model, head_modules, count_params(model))
