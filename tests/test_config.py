"""Recipe naming and method keys: default run folders never collide across a method's settings,
and keys the chosen method does not read are refused instead of ignored."""

from __future__ import annotations

import pytest
from conftest import REPO

from sparta_cli.config import build_recipe, load_recipe, read_yaml
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import write_yaml

RECIPE = REPO / "configs" / "quickstart.yaml"


@pytest.mark.parametrize(("overrides", "folder"), [
    ([], "runs/sst2/sparta-d0.05-s42"),
    (["adapter.density=0.001", "seed=7"], "runs/sst2/sparta-d0.001-s7"),
    (["adapter.method=lora", "adapter.r=16"], "runs/sst2/lora-r16-s42"),
    (["adapter.method=lora", "adapter.r=4"], "runs/sst2/lora-r4-s42"),
    (["adapter.method=dora"], "runs/sst2/dora-r8-s42"),
    (["adapter.method=full", "seed=1"], "runs/sst2/full-s1"),
    (["adapter.method=head"], "runs/sst2/head-s42"),
])
def test_default_run_folder_names_the_methods_settings(overrides, folder):
    assert load_recipe(RECIPE, overrides).output_dir == folder


def test_switching_method_drops_the_files_keys_of_the_old_method():
    """quickstart.yaml sets a density; `adapter.method=lora` on it is not a mistake, the density just goes."""
    recipe = load_recipe(RECIPE, ["adapter.method=lora"])
    assert "density" not in recipe.to_dict()["adapter"] and recipe.to_dict()["adapter"]["r"] == 8


@pytest.mark.parametrize(("overrides", "key", "method"), [
    (["adapter.method=lora", "adapter.density=0.1"], "adapter.density", "lora"),
    (["adapter.r=16"], "adapter.r", "sparta"),
    (["adapter.alpha=32"], "adapter.alpha", "sparta"),
    (["adapter.method=head", "adapter.targets=[q]"], "adapter.targets", "head"),
])
def test_keys_of_another_method_are_refused(overrides, key, method):
    with pytest.raises(SpartaError, match=rf"^{key} \(.*\) does not apply to adapter.method={method}: remove it"):
        load_recipe(RECIPE, overrides)


def test_a_runs_config_reloads_as_its_recipe(tmp_path):
    """config.yaml holds only the method's own keys, and an older one (with density for LoRA) still loads."""
    recipe = load_recipe(RECIPE, ["adapter.method=lora", "adapter.r=4", f"output_dir={tmp_path}/run"])
    write_yaml(tmp_path / "config.yaml", {**recipe.to_dict(), "run": {"world_size": 1}})
    assert build_recipe(read_yaml(tmp_path / "config.yaml")).to_dict() == recipe.to_dict()
    older = {**recipe.to_dict(), "adapter": {**recipe.to_dict()["adapter"], "density": 0.05}, "run": {}}
    assert build_recipe(older).to_dict() == recipe.to_dict()


def test_an_sft_runs_config_holds_no_classifier_keys_and_an_older_one_still_loads(tmp_path):
    recipe = build_recipe({"model": {"name_or_path": "m"}, "task": {"name": "sst2", "type": "sft"}})
    recorded = recipe.to_dict()
    assert not {"head", "label_field", "text_fields", "shots"} & set(recorded["task"])
    assert build_recipe({**recorded, "run": {}}).to_dict() == recorded
    # an SFT run written before recorded the classification defaults beside its own keys
    older = {**recorded, "task": {**recorded["task"], "head": "classifier", "label_field": "label", "shots": 0}, "run": {}}
    assert build_recipe(older).to_dict() == recorded


def test_a_bare_no_for_mixed_precision_means_no():
    """YAML reads `no` as false; `mixed_precision: no` (Accelerate's word) must still mean no mixed precision."""
    raw = read_yaml(REPO / "configs" / "quickstart.yaml")
    assert build_recipe(raw, ["training.mixed_precision=no"]).training.mixed_precision == "no"
    raw["training"]["mixed_precision"] = False  # what `mixed_precision: no` in a recipe file becomes
    assert build_recipe(raw).training.mixed_precision == "no"
    with pytest.raises(SpartaError, match="mixed_precision"):
        build_recipe(raw, ["training.mixed_precision=yes"])  # true is not a precision


def test_a_recipe_that_is_a_fifo_or_a_device_is_named_and_never_read(tmp_path):
    """Reading a FIFO blocks until a writer comes, /dev/zero never ends: both are refused unopened (issue 25)."""
    import os
    from pathlib import Path

    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    for path, what in ((fifo, "a FIFO \\(named pipe\\)"), (Path("/dev/zero"), "a character device")):
        with pytest.raises(SpartaError, match=f"^recipe {path} is {what}, not a regular file: give the path to a YAML file$"):
            read_yaml(path)
