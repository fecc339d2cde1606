"""What every recipe section shares: the strict pydantic base (config.py's sections and each
method's settings in tuners/<method>/config.py), in a module of its own so both import it
without importing each other."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # no inf/NaN anywhere: `training.epochs: .inf` would never end, `lr: .nan` never learn
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


SEED_LIMIT = 2**32  # numpy's seeds (set by accelerate's set_seed) are below 2**32
