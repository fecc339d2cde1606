"""Head-only settings: none but the seed (only the classification head trains)."""

from __future__ import annotations

from typing import ClassVar, Literal

from sparta_cli.tuners.config import MethodConfig, seed_field


class HeadConfig(MethodConfig):
    method: Literal["head"] = "head"
    seed: int | None = seed_field()

    display_name: ClassVar[str] = "head"
    size_text: ClassVar[str] = "it trains only the classification head"
    default_lr: ClassVar[float] = 2e-3
    tuner: ClassVar[str] = "sparta_cli.tuners.head.tuner:HeadTuner"
