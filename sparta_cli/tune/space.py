"""The search space: which recipe keys a study varies, over which ranges or choices.

One spec language serves the recipe's `tune.space` section and `--space KEY=SPEC` flags, each a
recipe key with
  `log:1e-3..0.2`  log-uniform floats      `1e-5..1e-2`  uniform floats
  `1..4`           integers (both ends whole numbers; `log:` works too)
  `[a, b, c]`      one of these values (any YAML, lists included: `[[v, o], [q, k, v, o]]`)
  `{low: 0.001, high: 0.2, log: true}` or `{choices: [...]}` the same as a mapping.
Optuna's categorical choices must be scalars, so list and mapping choices travel as their YAML
text and are read back when the trial's recipe is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import parse_yaml

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"^\s*(log\s*:)?\s*({_NUMBER})\s*\.\.\s*({_NUMBER})\s*$")
_SPEC_KEYS = {"low", "high", "log", "choices"}
SPEC_HELP = "give a range such as 'log:1e-3..0.2' (log-uniform), '1e-5..1e-2' (uniform) or '1..4' (integers), or a list of choices [a, b]"


@dataclass(frozen=True)
class Param:
    """One searched recipe key: a numeric range or a list of choices."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution([_encode(c) for c in self.choices])
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(_encode(c)) for c in self.choices)
        return f"{'log-uniform ' if self.log else ''}{'integers ' if self.integer else ''}{self.low:g}..{self.high:g}"

    def corners(self) -> list[Any]:
        """The values that bound the space: checking these checks every value the study can draw."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def _encode(value: Any) -> Any:
    """A choice as Optuna stores it: scalars as they are, lists and mappings as one-line YAML."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()


def decode(param: Param, stored: Any) -> Any:
    """The recipe value of a parameter as Optuna stored it."""
    if param.choices is not None:
        for choice in param.choices:
            if _encode(choice) == stored:
                return choice
    return stored


def encode_params(space: dict[str, Param], values: dict[str, Any]) -> dict[str, Any]:
    """Recipe values (e.g. a configuration to try first) as Optuna's parameters."""
    unknown = sorted(set(values) - set(space))
    if unknown:
        raise SpartaError(f"tune.enqueue names {', '.join(unknown)}, which the search space does not vary: "
                          f"use keys of tune.space ({', '.join(space)})")
    encoded = {}
    for key, value in values.items():
        param = space[key]
        if param.choices is not None:
            encoded[key] = _encode(value)
            if encoded[key] not in [_encode(choice) for choice in param.choices]:
                raise SpartaError(f"tune.enqueue gives {key} = {encoded[key]}, which is not one of its choices ({param.describe()}): "
                                  "add it to tune.space, or enqueue one of them")
        elif (isinstance(value, bool) or not isinstance(value, (int, float)) or not param.low <= value <= param.high
              or (param.integer and value != int(value))):
            raise SpartaError(f"tune.enqueue gives {key} = {value!r}, outside its range {param.describe()}: enqueue a value inside it")
        else:
            encoded[key] = value
    return encoded


def parse_param(key: str, spec: Any) -> Param:
    """A Param from one spec (see the module docstring); a malformed one is a one-line SpartaError."""
    where = f"tune.space.{key} = {spec!r}"
    if isinstance(spec, list):
        if not spec:
            raise SpartaError(f"{where}: the list of choices is empty: {SPEC_HELP}")
        return Param(key, choices=tuple(spec))
    if isinstance(spec, dict):
        if set(spec) - _SPEC_KEYS or not spec:
            raise SpartaError(f"{where}: a mapping spec takes low, high, log or choices: {SPEC_HELP}")
        if "choices" in spec:
            return parse_param(key, spec["choices"])
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise SpartaError(f"{where}: low and high must be numbers: {SPEC_HELP}")
        return _range(where, key, low, high, bool(spec.get("log", False)))
    if isinstance(spec, str):
        match = _RANGE.match(spec)
        if match:
            log, low_text, high_text = match.groups()
            whole = all(re.fullmatch(r"[-+]?\d+", t) for t in (low_text, high_text))
            low, high = (int(low_text), int(high_text)) if whole else (float(low_text), float(high_text))
            return _range(where, key, low, high, bool(log))
    raise SpartaError(f"{where}: {SPEC_HELP}")


def _range(where: str, key: str, low: float, high: float, log: bool) -> Param:
    if not low < high:
        raise SpartaError(f"{where}: the low end must be below the high end: {SPEC_HELP}")
    if log and low <= 0:
        raise SpartaError(f"{where}: a log range needs a low end above 0, e.g. log:1e-4..1e-2")
    return Param(key, low=low, high=high, log=log, integer=isinstance(low, int) and isinstance(high, int))


def flatten_space(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{adapter: {density: spec}}` and `{adapter.density: spec}` both give {"adapter.density": spec}:
    overrides such as `tune.space.adapter.density=...` nest, recipe files often do not."""
    flat: dict[str, Any] = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not set(value) & _SPEC_KEYS:
            flat.update(flatten_space(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def default_space(method: str) -> dict[str, str]:
    """The method's knobs that matter most (each method's `tune_space`: SpaRTA's density and rate)."""
    from sparta_cli.tuners import method_config

    return dict(method_config(method).tune_space)


def parse_space(section: dict[str, Any]) -> dict[str, Param]:
    return {key: parse_param(key, spec) for key, spec in flatten_space(section).items()}


def parse_space_flag(text: str) -> tuple[str, Any]:
    """`--space adapter.density=log:1e-3..0.2` -> ("adapter.density", "log:1e-3..0.2"); the value is
    read as YAML so `[a, b]` is a list of choices."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise SpartaError(f"--space {text!r}: write KEY=SPEC, e.g. --space adapter.density=log:1e-3..0.2")
    try:
        value = parse_yaml(raw)  # the recipe's own strict reader: no alias bombs, no duplicate keys
    except yaml.YAMLError:
        value = raw
    return key.strip(), value if isinstance(value, (list, dict)) else raw.strip()


def as_override(key: str, value: Any) -> str:
    """A recipe value as a `key=value` override that `build_recipe` reads back to the same value."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix('...').strip()}"
