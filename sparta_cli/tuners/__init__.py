"""Adaptation methods, one folder each (PEFT's layout), and the registry: the one list of methods.

A method is `tuners/<method>/config.py` (its `adapter:` settings, pure pydantic) and
`tuners/<method>/tuner.py` (its `Tuner`: what trains, how it is saved, loaded, merged, exported).
Reading a recipe needs only the settings; a method's `Tuner` is imported on first use
(`get_tuner`), so config.py imports no tuner code. Adding a method is one folder and one entry in
`METHODS` (docs/design.md, "How to add a method").
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparta_cli.errors import SpartaError
from sparta_cli.tuners.config import MethodConfig
from sparta_cli.tuners.full.config import FullConfig
from sparta_cli.tuners.head.config import HeadConfig
from sparta_cli.tuners.lora.config import DoraConfig, LoraConfig
from sparta_cli.tuners.sparta.config import SpartaConfig

if TYPE_CHECKING:
    from torch import nn

    from sparta_cli.tuners.base import Adapter, Tuner

# every method, in the order reports list them
METHODS: dict[str, type[MethodConfig]] = {config.name(): config for config in (SpartaConfig, LoraConfig, DoraConfig, FullConfig, HeadConfig)}


def _unknown(method: Any) -> SpartaError:
    return SpartaError(f"unknown method `{method}`: use one of {', '.join(METHODS)}")


def method_config(method: str) -> type[MethodConfig]:
    """The settings class of `method` (`adapter.method` in a recipe, `method` in adapter_config.json)."""
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise _unknown(method) from None


def reader_of(key: str) -> type[MethodConfig] | None:
    """The first method whose settings have `adapter.<key>` (for messages about a key another method reads)."""
    return next((config for config in METHODS.values() if key in config.model_fields), None)


@cache
def get_tuner(method: str) -> Tuner:
    """The method named `method`, its code imported now."""
    module, _, name = method_config(method).tuner.partition(":")
    return getattr(importlib.import_module(module), name)()


def apply_adapter(model: nn.Module, cfg: MethodConfig, seed: int, head_modules: list[str]) -> Adapter:
    """Freeze `model` and make `cfg.method`'s parameters trainable, in place."""
    return get_tuner(cfg.method).apply(model, cfg, seed, head_modules)


def load_adapter(run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Adapter:
    """Put the run's saved adapter onto a freshly loaded base model (same head size)."""
    return get_tuner(config["method"]).load(run_dir, model, config)


# What tuners/base.py defines for every method, named here too (imported on first use, like the tuners).
_FROM_BASE = ("Adapter", "Tuner", "check_base_matches")


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        return getattr(importlib.import_module("sparta_cli.tuners.base"), name)
    if name == "TUNERS":  # every method's Tuner, by name
        return {method: get_tuner(method) for method in METHODS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "apply_adapter", "get_tuner", "load_adapter", "method_config", "reader_of", *_FROM_BASE]
