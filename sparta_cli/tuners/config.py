"""What every method's settings (`adapter:` in a recipe) share: `MethodConfig`.

Each method's own keys live in `tuners/<method>/config.py`, a subclass with its `method` literal;
the recipe's `adapter` is their union, discriminated by `method` (config.py), so a key another
method reads is refused by the model itself. Pure pydantic: reading a recipe imports no tuner code.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from sparta_cli.strict import SEED_LIMIT, Strict


class MethodConfig(Strict):
    """One method's `adapter:` section, and what the recipe, messages and reports ask of it."""

    method: str
    display_name: ClassVar[str]  # how reports and plots name it
    size_text: ClassVar[str]  # what sizes it, for messages
    default_lr: ClassVar[float]  # what `training.lr: auto` gives it (the rates compare_methods.sh used)
    tuner: ClassVar[str]  # `module:Class` of its Tuner, imported on first use (tuners.get_tuner)
    # `sparta tune`'s search when the recipe gives none
    tune_space: ClassVar[dict[str, str]] = {"training.lr": "log:1e-4..3e-2"}
    # keys that size it in alternative ways (SpaRTA: density or budget): overriding one drops the others
    one_of: ClassVar[tuple[tuple[str, ...], ...]] = ()

    @classmethod
    def name(cls) -> str:
        """The `adapter.method` value that picks this class."""
        return cls.model_fields["method"].default

    def auto_lr(self) -> float | None:
        """The rate `training.lr: auto` resolves to (docs/learning_rates.md); None while it waits for the
        model (`Recipe.resolve_adapter`)."""
        return self.default_lr

    def name_setting(self) -> str:
        """The setting that sizes it, as it appears in default run names (`-d0.01`, `-r16`; none for full/head)."""
        return ""

    def sizes(self) -> dict[str, float]:
        """The numbers that size it in a report: `density` for SpaRTA, `r` for LoRA/DoRA, none for full/head."""
        return {}

    def recorded(self) -> dict[str, Any]:
        """Its settings as adapter_config.json records them for every method (null where it has none)."""
        return {"density": None, "targets": None}

    @classmethod
    def own_keys(cls, adapter: dict[str, Any]) -> dict[str, Any]:
        """The keys of a recorded `adapter:` section this method reads (config.yaml of an older sparta
        recorded every method's keys)."""
        return {key: value for key, value in adapter.items() if key in cls.model_fields}


def seed_field() -> Any:
    return Field(None, ge=0, lt=SEED_LIMIT)  # null: the run's seed


def targets_field() -> Any:
    return Field(default_factory=lambda: ["v", "o"], min_length=1, description="the matrices an adapter trains")
