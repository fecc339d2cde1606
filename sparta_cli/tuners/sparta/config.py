"""SpaRTA's settings: the fraction of each target matrix that trains, and which matrices."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from sparta_cli.lr_rule import sparta_lr
from sparta_cli.tuners.config import MethodConfig, seed_field, targets_field


class SpartaConfig(MethodConfig):
    method: Literal["sparta"] = "sparta"
    density: float = Field(0.01, gt=0.0, le=1.0, description="SpaRTA's fraction of each target matrix")
    targets: list[str] = targets_field()
    seed: int | None = seed_field()

    display_name: ClassVar[str] = "SpaRTA"
    size_text: ClassVar[str] = "its size is adapter.density"
    tuner: ClassVar[str] = "sparta_cli.tuners.sparta.tuner:SpartaTuner"
    # the paper: the best density depends on model, data and task; sparse adapters want rates far above
    # full fine-tuning's, and the best rate moves with density. The rate range spans docs/learning_rates.md's
    # rule (2.5e-3 * d^-0.60: 0.16 at d = 1e-3, 0.0066 at d = 0.2) with a factor of about 2-7 to spare at each end.
    tune_space: ClassVar[dict[str, str]] = {"adapter.density": "log:1e-3..0.2", "training.lr": "log:1e-3..0.3"}

    def auto_lr(self) -> float:
        return sparta_lr(self.density)

    def name_setting(self) -> str:
        return f"-d{self.density}"

    def sizes(self) -> dict[str, float]:
        return {"density": self.density}

    def recorded(self) -> dict[str, Any]:
        return {"density": self.density, "targets": self.targets}
