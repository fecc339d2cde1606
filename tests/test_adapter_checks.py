"""A corrupt or inconsistent adapter is refused before use, on every read path (issue 11)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sparta_cli.adapter_checks import check_adapter_config
from sparta_cli.errors import SpartaError
from sparta_cli.tuners.sparta.checks import check_adapter_tensors

PATH = Path("run/adapter_model.safetensors")
SHAPES = {"layer.v": [4, 8], "layer.o": [8, 4]}


def _config(**changes):
    config = {"format_version": 1, "method": "sparta", "head_modules": ["classifier"], "target_shapes": SHAPES,
              "base_model": {"name_or_path": "m"}, "task": {"num_labels": 2}, "density": 0.25, "trainable_params": 16 + 6}
    config.update(changes)
    return config


def _tensors():
    return {"layer.v.indices": torch.tensor([0, 3, 9, 10, 11, 20, 30, 31], dtype=torch.int32), "layer.v.delta": torch.randn(8),
            "layer.o.indices": torch.tensor([1, 2, 4, 8, 16, 17, 18, 19]), "layer.o.delta": torch.randn(8),
            "trained.classifier.weight": torch.randn(2, 3)}


def test_a_sound_adapter_passes():
    check_adapter_config(_config(), PATH)
    check_adapter_tensors(_tensors(), _config(), PATH)


def _with(key, value):
    tensors = _tensors()
    if value is None:
        tensors.pop(key)
    else:
        tensors[key] = value
    return tensors


@pytest.mark.parametrize("tensors,phrase", [
    (_with("layer.v.indices", torch.tensor([-1, 3, 9, 10, 11, 20, 30, 31])), "strictly increasing within [0, 32)"),
    (_with("layer.v.indices", torch.tensor([0, 3, 9, 10, 11, 20, 30, 10**8])), "strictly increasing within [0, 32)"),
    (_with("layer.v.indices", torch.tensor([0, 3, 3, 10, 11, 20, 30, 31])), "repeated or unsorted"),
    (_with("layer.v.indices", torch.tensor([3, 0, 9, 10, 11, 20, 30, 31])), "repeated or unsorted"),
    (_with("layer.v.indices", torch.tensor([0.0, 3, 9, 10, 11, 20, 30, 31])), "flat integer tensor"),
    (_with("layer.v.delta", torch.randn(7)), "one floating delta per index"),
    (_with("layer.v.delta", None), "one floating delta per index"),
    (_with("layer.v.delta", torch.tensor([math.nan] + [0.0] * 7)), "`layer.v.delta` holds inf or NaN"),
    (_with("layer.o.delta", torch.tensor([math.inf] + [0.0] * 7)), "`layer.o.delta` holds inf or NaN"),
    (_with("trained.classifier.weight", torch.full((2, 3), math.nan)), "holds inf or NaN"),
    (_with("layer.q.indices", torch.tensor([1])), "name different modules"),
    (_with("layer.o.indices", None), "`layer.o.delta` has no indices"),
    (_with("something", torch.zeros(1)), "unknown tensor `something`"),
])
def test_a_damaged_adapter_is_refused_naming_the_problem(tensors, phrase):
    with pytest.raises(SpartaError, match=r"^run/adapter_model.safetensors: .*" + phrase.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_adapter_tensors(tensors, _config(), PATH)


def test_the_declared_density_and_shapes_must_fit_the_tensors():
    with pytest.raises(SpartaError, match="8 entries but density 0.5 of 32 is 16"):
        check_adapter_tensors(_tensors(), _config(density=0.5), PATH)
    with pytest.raises(SpartaError, match="within \\[0, 8\\)"):
        check_adapter_tensors(_tensors(), _config(target_shapes={"layer.v": [2, 4], "layer.o": [8, 4]}, density=None), PATH)


@pytest.mark.parametrize("config,phrase", [
    (_config(method=None), "`method`"),
    ({k: v for k, v in _config().items() if k != "head_modules"}, "lacks `head_modules`"),
    (_config(base_model={"dtype": "float32"}), "lacks `base_model.name_or_path`"),
    (_config(task={"name": "sst2"}), "lacks `task.num_labels`"),
    (_config(target_shapes={"layer.v": [4]}), "target_shapes.layer.v"),
    (_config(density=7), "`density`"),
    ([1, 2], "not an adapter config"),
])
def test_a_damaged_adapter_config_is_refused_naming_the_key(config, phrase):
    with pytest.raises(SpartaError, match=phrase.replace("[", r"\[")):
        check_adapter_config(config, Path("run/adapter_config.json"))
