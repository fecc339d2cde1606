"""The method registry: every recipe method has one tuner, and what each tuner claims exists."""

from __future__ import annotations

import pytest

from sparta_cli.errors import SpartaError
from sparta_cli.export import FORMATS
from sparta_cli.tuners import METHODS, TUNERS, get_tuner


def test_every_recipe_method_has_exactly_one_tuner():
    assert list(TUNERS) == list(METHODS)
    assert all(name == tuner.name and tuner.config is METHODS[name] for name, tuner in TUNERS.items())


@pytest.mark.parametrize("name", list(TUNERS))
def test_a_tuner_names_only_real_keys_and_formats(name):
    tuner = get_tuner(name)
    assert set(tuner.config_keys) <= set(tuner.config.model_fields) - {"method"}
    assert set(tuner.export_formats) <= set(FORMATS)
    assert tuner.display_name


def test_which_settings_apply_to_which_method():
    assert "density" in get_tuner("sparta").config_keys and "r" not in get_tuner("sparta").config_keys
    assert "r" in get_tuner("lora").config_keys and "density" not in get_tuner("lora").config_keys
    assert not any(key in get_tuner(name).config_keys for name in ("full", "head") for key in ("density", "r", "targets"))


def test_an_unknown_method_is_one_line():
    with pytest.raises(SpartaError, match="unknown method `lorra`: use one of sparta, lora, dora, full, head"):
        get_tuner("lorra")
