"""What every recipe section shares: the strict pydantic base (config.py's sections and each
method's settings in tuners/<method>/config.py), in a module of its own so both import it
without importing each other."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Strict(BaseModel):
    # no inf/NaN anywhere: `training.epochs: .inf` would never end, `lr: .nan` never learn
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Pydantic reads true as 1 for a number: YAML's yes/on/true (`training.max_steps=true`,
        `batch_size: yes`) would become one step or one row. A number key takes a number."""
        if isinstance(value, bool) and info.field_name is not None:
            kinds = set(get_args(cls.model_fields[info.field_name].annotation)) or {cls.model_fields[info.field_name].annotation}
            if kinds & {int, float} and bool not in kinds:
                form = "a whole number" if float not in kinds else "a number"
                raise ValueError(f"give {form}, not {str(value).lower()} (YAML reads true, yes, on, false, no and off as booleans)")
        return value


SEED_LIMIT = 2**32  # numpy's seeds (set by accelerate's set_seed) are below 2**32
