"""`training.lr: auto`: the rule of docs/learning_rates.md, its fit, and that a run records the rate it chose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparta_cli.config import load_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.lr_rule import SPARTA_LR_EXPONENT, SPARTA_LR_MAX, SPARTA_LR_SCALE, fit_length_rule, fit_power_law, sparta_lr
from sparta_cli.tuners import METHODS
from sparta_cli.tuners.lora.config import LoraConfig
from sparta_cli.tuners.sparta.config import SpartaConfig

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def test_fit_recovers_a_power_law_exactly():
    points = [(d, 3e-4 * d ** -0.7) for d in (0.001, 0.01, 0.05, 0.2)]
    c, a = fit_power_law(points)
    assert c == pytest.approx(3e-4, rel=1e-9) and a == pytest.approx(0.7, rel=1e-9)


def test_fit_is_least_squares_in_log_space():
    # two noisy best rates at the same density average geometrically: log-mean of 1e-2 and 4e-2 is 2e-2
    c, a = fit_power_law([(0.01, 1e-2), (0.01, 4e-2), (0.1, 2e-3), (0.1, 2e-3)])
    assert c * 0.01 ** -a == pytest.approx(2e-2, rel=1e-9) and c * 0.1 ** -a == pytest.approx(2e-3, rel=1e-9)


def test_fit_needs_two_densities():
    with pytest.raises(ValueError, match="two densities"):
        fit_power_law([(0.01, 1e-2), (0.01, 3e-2)])


def test_length_fit_recovers_a_rule_in_density_and_steps_exactly():
    points = [(d, s, 0.4 * d ** -0.6 * s ** -0.8) for d in (0.01, 0.04, 0.17) for s in (63, 213, 845)]
    c, a, b = fit_length_rule(points)
    assert (c, a, b) == pytest.approx((0.4, 0.6, 0.8), rel=1e-9)


def test_length_fit_needs_densities_and_lengths_that_vary_apart():
    with pytest.raises(ValueError, match="two densities and two run lengths"):
        fit_length_rule([(0.01, 63, 1e-2), (0.05, 63, 5e-3)])
    with pytest.raises(ValueError, match="move together"):  # length doubles exactly when density does
        fit_length_rule([(0.01, 100, 1e-2), (0.02, 200, 5e-3), (0.04, 400, 2e-3)])


def test_sparta_rate_follows_the_rule_and_is_capped():
    assert sparta_lr(0.05) == pytest.approx(SPARTA_LR_SCALE * 0.05 ** -SPARTA_LR_EXPONENT)
    assert sparta_lr(0.001) > sparta_lr(0.01) > sparta_lr(0.1)  # lower density, larger rate
    assert sparta_lr(1e-9) == SPARTA_LR_MAX
    assert SpartaConfig(density=0.01).auto_lr() == sparta_lr(0.01)
    for method, lr in {"lora": 1e-3, "dora": 1e-3, "full": 5e-5, "head": 2e-3}.items():  # compare_methods.sh's rates
        assert METHODS[method]().auto_lr() == lr


def test_auto_resolves_in_the_recipe_and_a_number_stays_a_number():
    recipe = load_recipe(QUICKSTART, ["training.lr=auto", "adapter.density=0.01"])
    assert recipe.training.lr == sparta_lr(0.01) and recipe.lr_from_rule
    recipe = load_recipe(QUICKSTART, ["training.lr=auto", "adapter.method=lora"])
    assert recipe.training.lr == LoraConfig.default_lr
    recipe = load_recipe(QUICKSTART, ["training.lr=3e-3"])
    assert recipe.training.lr == 3e-3 and not recipe.lr_from_rule


@pytest.mark.parametrize("value", ["autox", "-1", "0", "true"])
def test_a_rate_that_is_neither_positive_nor_auto_is_refused(value):
    with pytest.raises(SpartaError, match=r"training.lr must be a positive number .* or auto"):
        load_recipe(QUICKSTART, [f"training.lr={value}"])


def test_train_prints_and_records_the_chosen_rate(tmp_path, tiny_bert_dir, data_dir):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "sparta_cli", "train", str(QUICKSTART), f"model.name_or_path={tiny_bert_dir}", f"data.dir={data_dir}",
         "training.lr=auto", "adapter.density=0.02", "data.max_train_samples=8", "data.max_eval_samples=8", "data.max_length=16",
         "training.max_steps=1", "training.batch_size=4", "training.eval_every=null", f"output_dir={out}"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    chosen = sparta_lr(0.02)
    assert f"training.lr: auto = {chosen:.3g}" in result.stdout
    recorded = yaml.safe_load((out / "config.yaml").read_text())["training"]["lr"]
    assert recorded == pytest.approx(chosen)
    assert load_recipe(out / "config.yaml").training.lr == pytest.approx(chosen)  # the rerun trains at the same rate


def test_interpolated_optimum_finds_a_parabolas_vertex_between_grid_points():
    import math

    from sparta_cli.lr_rule import interpolated_optimum
    true = 0.017
    points = [(lr, (math.log(lr) - math.log(true)) ** 2 + 0.4) for lr in (3e-3, 1e-2, 3e-2, 1e-1)]
    assert interpolated_optimum(points) == pytest.approx(true, rel=1e-9)
    assert interpolated_optimum([(1e-2, 0.5), (3e-2, 0.4)]) == 3e-2  # best at the edge: no vertex to find


def test_holdout_rows_are_disjoint_sized_and_seeded(tmp_path, data_dir):
    script = Path(__file__).resolve().parent.parent / "scripts" / "holdout_glue.py"
    out = tmp_path / "held"
    for name in ("a", "b"):
        subprocess.run([sys.executable, str(script), str(out / name), "--tasks", "rte", "--val", "50", "--train", "200",
                        "--seed", "3", "--data", str(data_dir)], check=True, capture_output=True)
    train, dev = ((out / "a" / "glue" / "RTE" / f).read_text().splitlines() for f in ("train.tsv", "dev.tsv"))
    header = (data_dir / "glue" / "RTE" / "train.tsv").read_text().splitlines()[0]
    assert train[0] == dev[0] == header and len(train) == 201 and len(dev) == 51
    assert not set(train[1:]) & set(dev[1:])  # no held-out row trains
    assert (out / "b" / "glue" / "RTE" / "dev.tsv").read_text().splitlines() == dev  # same seed, same rows
