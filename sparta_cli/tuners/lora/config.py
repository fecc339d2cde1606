"""LoRA's and DoRA's settings (PEFT's LoraConfig, by sparta's names)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from sparta_cli.tuners.config import MethodConfig, seed_field, targets_field


class LoraConfig(MethodConfig):
    method: Literal["lora"] = "lora"
    targets: list[str] = targets_field()
    seed: int | None = seed_field()
    r: int = Field(8, ge=1, description="the LoRA/DoRA rank")
    alpha: float = Field(16.0, gt=0.0, description="the LoRA/DoRA scale")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="the LoRA/DoRA dropout")

    display_name: ClassVar[str] = "LoRA"
    size_text: ClassVar[str] = "its size is adapter.r"
    default_lr: ClassVar[float] = 1e-3
    tuner: ClassVar[str] = "sparta_cli.tuners.lora.tuner:LoraTuner"

    def name_setting(self) -> str:
        return f"-r{self.r}"

    def sizes(self) -> dict[str, float]:
        return {"r": self.r}

    def recorded(self) -> dict[str, Any]:
        return {"density": None, "targets": self.targets}


class DoraConfig(LoraConfig):
    method: Literal["dora"] = "dora"  # type: ignore[assignment]

    display_name: ClassVar[str] = "DoRA"
    tuner: ClassVar[str] = "sparta_cli.tuners.lora.tuner:DoraTuner"
