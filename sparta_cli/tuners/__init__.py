"""Adaptation methods, one folder each (PEFT's layout), behind one interface (`Tuner`) and a registry.

Train, merge, export, eval and report ask a method what it can do (`get_tuner(name)`) instead
of branching on its name; adding a method is one folder and one line here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from sparta_cli.errors import SpartaError
from sparta_cli.tuners.base import Adapter, Tuner, check_base_matches
from sparta_cli.tuners.full import FullTuner
from sparta_cli.tuners.head import HeadTuner
from sparta_cli.tuners.lora import DoraTuner, LoraTuner
from sparta_cli.tuners.sparta.tuner import SpartaTuner

if TYPE_CHECKING:
    from sparta_cli.config import AdapterConfig

# in the order reports list them
TUNERS: dict[str, Tuner] = {tuner.name: tuner for tuner in (SpartaTuner(), LoraTuner(), DoraTuner(), FullTuner(), HeadTuner())}

# keys that only some methods read: the others refuse them (config.applies)
METHOD_SPECIFIC_KEYS = frozenset(key for tuner in TUNERS.values() for key in tuner.config_keys)


def get_tuner(method: str) -> Tuner:
    """The method named `method` (`adapter.method` in a recipe, `method` in adapter_config.json)."""
    try:
        return TUNERS[method]
    except KeyError:
        raise SpartaError(f"unknown method `{method}`: use one of {', '.join(TUNERS)}") from None


def apply_adapter(model: nn.Module, cfg: AdapterConfig, seed: int, head_modules: list[str]) -> Adapter:
    """Freeze `model` and make `cfg.method`'s parameters trainable, in place."""
    return get_tuner(cfg.method).apply(model, cfg, seed, head_modules)


def load_adapter(run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Adapter:
    """Put the run's saved adapter onto a freshly loaded base model (same head size)."""
    return get_tuner(config["method"]).load(run_dir, model, config)


__all__ = ["METHOD_SPECIFIC_KEYS", "TUNERS", "Adapter", "Tuner", "apply_adapter", "check_base_matches", "get_tuner", "load_adapter"]
