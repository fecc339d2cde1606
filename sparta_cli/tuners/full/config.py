"""Full fine-tuning's settings: none but the seed (every weight trains)."""

from __future__ import annotations

from typing import ClassVar, Literal

from sparta_cli.tuners.config import MethodConfig, seed_field


class FullConfig(MethodConfig):
    method: Literal["full"] = "full"
    seed: int | None = seed_field()

    display_name: ClassVar[str] = "full"
    size_text: ClassVar[str] = "it trains every weight"
    default_lr: ClassVar[float] = 5e-5
    tuner: ClassVar[str] = "sparta_cli.tuners.full.tuner:FullTuner"
