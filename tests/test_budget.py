"""`adapter.budget`, the paper's unit: SpaRTA's entries as a share of all the base model's parameters
(or a count), resolved to the per-matrix density once the model is known, and recorded beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_model

from sparta_cli.config import build_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.lr_rule import sparta_lr
from sparta_cli.preflight import check_against_config
from sparta_cli.report import ReportedRun
from sparta_cli.runs import ALL_RESULTS, read_started_run
from sparta_cli.sweep import run_action
from sparta_cli.tasks import resolve_task
from sparta_cli.tuners import apply_adapter, get_tuner
from sparta_cli.tuners.sparta.config import SpartaConfig

# tiny Llama (conftest): vocab 96, hidden 32, MLP 64, 2 layers, 4 heads of 8, 2 KV heads, 3 labels.
# Per layer q 32x32 = 1024, k and v 16x32 = 512 each, o 1024, gate/up/down 2048 each, two norms of 32:
# 9,280; embeddings 96 x 32 = 3,072; final norm 32; the new head (score, 3 x 32) does not count.
LLAMA_PARAMS = 3072 + 2 * 9280 + 32  # 21,664
VO_ENTRIES = 2 * (512 + 1024)  # v and o of both layers: 3,072


def _recipe(adapter: dict, *overrides: str, **top) -> dict:
    return {"model": {"name_or_path": "m"}, "task": {"name": "sst2"}, "adapter": adapter, **top}


def _trained_deltas(cfg: SpartaConfig) -> tuple[int, float]:
    adapter = apply_adapter(tiny_model("llama"), cfg, seed=0, head_modules=["score"])
    return adapter.sparta.num_trainable(), get_tuner("sparta").resolve_settings(cfg, tiny_model("llama")).density


@pytest.mark.parametrize(("budget", "k"), [(0.05, round(0.05 * LLAMA_PARAMS)), (600, 600), (1e3, 1000)])
def test_a_budget_trains_its_share_of_all_parameters(budget, k):
    trained, density = _trained_deltas(SpartaConfig(budget=budget, targets=["v", "o"]))
    assert density == k / VO_ENTRIES
    # each of the 4 matrices rounds its own round(density x size): at most half an entry apiece
    assert abs(trained - k) <= 4 * 0.5, (trained, k)


def test_a_budget_past_the_targets_names_the_largest_they_allow():
    with pytest.raises(SpartaError) as error:
        get_tuner("sparta").resolve_settings(SpartaConfig(budget=0.2, targets=["v", "o"]), tiny_model("llama"))
    assert str(error.value) == (f"adapter.budget=0.2 asks for 4,333 entries, but the targets (v, o) hold 3,072: the largest budget "
                                f"they allow is {VO_ENTRIES / LLAMA_PARAMS:.6g} of the model's 21,664 parameters (or a count of 3,072)")


@pytest.mark.parametrize(("adapter", "message"), [
    ({"budget": 0.01, "density": 0.02}, "adapter.budget and adapter.density both size SpaRTA: keep one"),
    ({"budget": True}, "invalid `adapter.budget` = True: give a number, not true"),
    ({"budget": 1.5}, "invalid `adapter.budget` = 1.5: give a fraction of all parameters (below 1) or a whole count"),
    ({"budget": 0}, "invalid `adapter.budget` = 0: Input should be greater than 0"),
])
def test_bad_budgets_are_refused_in_one_line(adapter, message):
    with pytest.raises(SpartaError) as error:
        build_recipe(_recipe(adapter))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_lr_auto_with_a_budget_takes_the_rule_at_the_density_the_model_gives(tmp_path, tiny_bert_dir, data_dir):
    from sparta_cli.train import train

    raw = _recipe({"budget": 2000, "targets": ["v", "o"]}, model={"name_or_path": str(tiny_bert_dir)},
                  data={"dir": str(data_dir), "max_length": 16, "max_train_samples": 8, "max_eval_samples": 8},
                  training={"max_steps": 1, "batch_size": 4, "lr": "auto"}, output_dir=str(tmp_path / "run"))
    recipe = build_recipe(raw)
    assert recipe.training.lr == "auto" and recipe.lr_from_rule  # the density waits for the model
    density = 2000 / (4 * 32 * 32)  # BERT's v and o are 32 x 32 in each of 2 layers
    check_against_config(recipe, str(tiny_bert_dir), resolve_task(recipe.task))  # `sparta validate` says it too
    assert (recipe.adapter.density, recipe.training.lr) == (density, sparta_lr(density))
    recorded = yaml.safe_load((train(build_recipe(raw)) / "config.yaml").read_text())
    assert (recorded["adapter"]["density"], recorded["training"]["lr"]) == (density, sparta_lr(density))
    # a sweep rerun finds the run its recipe wrote, though the recipe resolves both only at load
    assert run_action(build_recipe(raw)) == "finished"
    assert run_action(build_recipe(raw, ["adapter.budget=1000"])).startswith("conflict:")


def test_an_override_of_one_size_drops_the_other_and_a_run_record_keeps_both():
    recipe = build_recipe(_recipe({"density": 0.02}), ["adapter.budget=0.003"])
    assert (recipe.adapter.budget, recipe.adapter.density) == (0.003, None) and recipe.run_name == "sparta-b0.003-s42"
    assert build_recipe(_recipe({"budget": 0.003}), ["adapter.density=0.05"]).adapter.density == 0.05
    # a run's config.yaml records the budget and the density it resolved to
    recorded = build_recipe({**_recipe({"budget": 0.003, "density": 0.0123}), "run": {}}).adapter
    assert (recorded.budget, recorded.density) == (0.003, 0.0123)
    # a density-sized recipe is recorded as before budgets existed
    assert "budget" not in build_recipe(_recipe({"density": 0.02})).to_dict()["adapter"]


def test_validate_resolves_the_budget_on_a_skeleton(tiny_bert_dir):
    recipe = build_recipe(_recipe({"budget": 2000, "targets": ["v", "o"]}, model={"name_or_path": str(tiny_bert_dir)}))
    check_against_config(recipe, str(tiny_bert_dir), resolve_task(recipe.task))
    # BERT's v and o are 32 x 32 in each of 2 layers
    assert recipe.adapter.density == 2000 / (4 * 32 * 32)


def test_a_budget_run_records_both_and_resumes_only_with_the_same_budget(tmp_path, tiny_bert_dir, data_dir):
    from sparta_cli.train import _resume_point, train

    raw = _recipe({"budget": 0.002, "targets": ["v", "o"]}, model={"name_or_path": str(tiny_bert_dir)},
                  data={"dir": str(data_dir), "max_length": 16, "max_train_samples": 8, "max_eval_samples": 8},
                  training={"max_steps": 2, "batch_size": 4, "lr": 1e-3, "save_every": 2}, output_dir=str(tmp_path / "run"))
    run_dir = train(build_recipe(raw))
    config = json.loads((run_dir / "adapter_config.json").read_text())
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["adapter"]
    assert config["budget"] == recorded["budget"] == 0.002 and config["density"] == recorded["density"] > 0
    trained = config["trainable_by_kind"]["v"] + config["trainable_by_kind"]["o"]
    assert abs(trained - config["density"] * 4 * 32 * 32) <= 4 * 0.5  # the density that ran
    assert ReportedRun(**vars(read_started_run(run_dir))).density == config["density"]
    Path(run_dir / ALL_RESULTS).unlink()  # as if stopped after its checkpoint
    same = build_recipe(raw)
    check_against_config(same, str(tiny_bert_dir), resolve_task(same.task))
    assert _resume_point(run_dir, same, print) is not None
    other = build_recipe(raw, ["adapter.budget=0.003"])
    check_against_config(other, str(tiny_bert_dir), resolve_task(other.task))
    with pytest.raises(SpartaError, match="adapter.budget: 0.002 there, 0.003 now"):
        _resume_point(run_dir, other, print)
