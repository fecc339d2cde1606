"""The method registry: every recipe method has one tuner, and what each tuner claims exists."""

from __future__ import annotations

import typing

import pytest

from sparta_cli.config import AdapterConfig, Method
from sparta_cli.errors import SpartaError
from sparta_cli.export import FORMATS
from sparta_cli.tuners import TUNERS, get_tuner


def test_every_recipe_method_has_exactly_one_tuner():
    assert list(TUNERS) == list(typing.get_args(Method))
    assert all(name == tuner.name for name, tuner in TUNERS.items())


@pytest.mark.parametrize("name", list(TUNERS))
def test_a_tuner_names_only_real_keys_and_formats(name):
    tuner = get_tuner(name)
    assert set(tuner.config_keys) <= set(AdapterConfig.model_fields) - {"method"}
    assert set(tuner.export_formats) <= set(FORMATS)
    assert tuner.display_name


def test_which_settings_apply_to_which_method():
    assert get_tuner("sparta").applies("density") and not get_tuner("sparta").applies("r")
    assert get_tuner("lora").applies("r") and not get_tuner("lora").applies("density")
    assert not any(get_tuner(name).applies(key) for name in ("full", "head") for key in ("density", "r", "targets"))


def test_an_unknown_method_is_one_line():
    with pytest.raises(SpartaError, match="unknown method `lorra`: use one of sparta, lora, dora, full, head"):
        get_tuner("lorra")
