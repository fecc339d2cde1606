"""SpaRTA's settings: how many entries of the target matrices train, and which matrices.

Its size is one of two: `density`, the fraction of each target matrix, or `budget`, the paper's
unit, a share of all the base model's parameters (or a count of entries). A budget becomes a
density once the model is known (`with_budget`, called by `SpartaTuner.resolve_settings` at load
and by `sparta validate` on a skeleton), and the run records both.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_serializer, model_validator

from sparta_cli.errors import SpartaError
from sparta_cli.lr_rule import sparta_lr
from sparta_cli.tuners.config import MethodConfig, seed_field, targets_field

DEFAULT_DENSITY = 0.01
BUDGET_OR_DENSITY = ("adapter.budget and adapter.density both size SpaRTA: keep one (budget: a share of all the base "
                     "model's parameters, or a count of entries; density: the fraction of each target matrix)")


class SpartaConfig(MethodConfig):
    method: Literal["sparta"] = "sparta"
    # null only beside a budget not resolved yet; DEFAULT_DENSITY when neither is given
    density: float | None = Field(None, gt=0.0, le=1.0, description="SpaRTA's fraction of each target matrix")
    budget: int | float | None = Field(None, gt=0, description="SpaRTA's entries as a share of all the base model's "
                                                                "parameters (0 < budget < 1) or a count (a whole number >= 1)")
    targets: list[str] = targets_field()
    seed: int | None = seed_field()

    display_name: ClassVar[str] = "SpaRTA"
    size_text: ClassVar[str] = "its size is adapter.density"
    tuner: ClassVar[str] = "sparta_cli.tuners.sparta.tuner:SpartaTuner"
    one_of: ClassVar[tuple[tuple[str, ...], ...]] = (("density", "budget"),)
    # the paper: the best density depends on model, data and task; sparse adapters want rates far above
    # full fine-tuning's, and the best rate moves with density. The rate range spans docs/learning_rates.md's
    # rule (2.5e-3 * d^-0.60: 0.16 at d = 1e-3, 0.0066 at d = 0.2) with a factor of about 2-7 to spare at each end.
    tune_space: ClassVar[dict[str, str]] = {"adapter.density": "log:1e-3..0.2", "training.lr": "log:1e-3..0.3"}

    @model_validator(mode="before")
    @classmethod
    def _one_size(cls, data: Any, info: ValidationInfo) -> Any:
        """Density or budget, not both, unless a run recorded them (the budget and the density it resolved to)."""
        if not isinstance(data, dict):
            return data
        if data.get("budget") is None:
            return {**data, "density": DEFAULT_DENSITY} if "density" not in data else data
        if data.get("density") is not None and not (info.context or {}).get("recorded"):
            raise ValueError(BUDGET_OR_DENSITY)
        return data

    @model_validator(mode="after")
    def _sized(self) -> SpartaConfig:
        if self.density is None and self.budget is None:
            raise ValueError("adapter.density is null: give the fraction of each target matrix (e.g. 0.01) or an adapter.budget")
        return self

    @field_validator("budget")
    @classmethod
    def _fraction_or_count(cls, value: int | float | None) -> int | float | None:
        if value is not None and value >= 1:
            if value != int(value):
                raise ValueError("give a fraction of all parameters (below 1) or a whole count of entries (e.g. 150000)")
            return int(value)
        return value

    @model_serializer(mode="wrap")
    def _without_unset_budget(self, handler) -> dict[str, Any]:
        """A density-sized adapter is recorded as before budgets existed (config.yaml, checkpoints' recipe.json)."""
        data = handler(self)
        if data.get("budget") is None:
            data.pop("budget", None)
        return data

    def entries(self, base_params: int) -> int:
        """The budget's k: a count as given, a fraction of `base_params` rounded to the nearest entry."""
        return int(self.budget) if self.budget >= 1 else int(round(self.budget * base_params))

    def with_budget(self, base_params: int, target_sizes: list[int]) -> SpartaConfig:
        """These settings with the budget's per-matrix density, k / (all target entries), where
        k = budget x `base_params` (or the count). Itself when sized by density."""
        if self.budget is None:
            return self
        k, room = self.entries(base_params), sum(target_sizes)
        if k > room:
            raise SpartaError(f"adapter.budget={self.budget:g} asks for {k:,} entries, but the targets "
                              f"({', '.join(self.targets)}) hold {room:,}: the largest budget they allow is "
                              f"{room / base_params:.6g} of the model's {base_params:,} parameters (or a count of {room:,})")
        return self.model_copy(update={"density": k / room})

    def auto_lr(self) -> float | None:
        """The rule's rate at the density; None while a budget waits for the model to give it."""
        return None if self.density is None else sparta_lr(self.density)

    def name_setting(self) -> str:
        return f"-b{self.budget}" if self.budget is not None else f"-d{self.density}"

    def sizes(self) -> dict[str, float]:
        return {"density": self.density}

    def recorded(self) -> dict[str, Any]:
        budget = {"budget": self.budget} if self.budget is not None else {}
        return {"density": self.density, "targets": self.targets, **budget}
