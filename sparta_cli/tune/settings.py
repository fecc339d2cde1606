"""The `tune:` section of a recipe and the flags of `sparta tune`, checked and resolved into a Plan.

```yaml
tune:
  trials: 20                 # trials in the study (a resumed study runs only the missing ones)
  workers: 1                 # trials at once on this machine (one GPU each when there are GPUs)
  study: null                # name in the storage (default: the recipe file's name)
  output_dir: null           # the study folder (default: tunes/<study>)
  storage: null              # default: the journal file <output_dir>/study.journal
  sampler: tpe               # tpe, random, or grid (every key a list of choices)
  pruner: median             # median, halving, hyperband or none
  sampler_startup_trials: 10 # random trials before TPE models the space
  pruner_startup_trials: 3   # finished trials before the median pruner prunes
  space:                     # default: adapter.density log:1e-3..0.2 and training.lr log:1e-3..0.3 (sparta); lr log:1e-4..3e-2 (others)
    adapter.density: log:1e-3..0.2
    adapter.targets: [[v, o], [q, k, v, o]]
  enqueue:                   # configurations tried first, e.g. the recipe's own
    - {adapter.density: 0.05, training.lr: 2.0e-3}
```
Everything here is checked before any trial starts: every end of every range and every choice
must make a valid recipe, and the recipe must hold out a validation set to select on.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from sparta_cli.config import Recipe, build_recipe, parse_override, read_yaml, set_dotted
from sparta_cli.errors import SpartaError
from sparta_cli.strict import Strict
from sparta_cli.tune.space import as_override, default_space, encode_params, flatten_space, parse_space, parse_space_flag
from sparta_cli.tune.study import JOURNAL_FILE, Plan


class TuneSettings(Strict):  # the recipe's rules: unknown keys refused, no true for a count
    trials: int = Field(20, ge=1)
    workers: int = Field(1, ge=1)
    study: str | None = None
    output_dir: str | None = None
    storage: str | None = None
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "halving", "hyperband", "none"] = "median"
    sampler_startup_trials: int = Field(10, ge=0)
    pruner_startup_trials: int = Field(3, ge=0)
    space: dict[str, Any] = Field(default_factory=dict)
    enqueue: list[dict[str, Any]] = Field(default_factory=list)


def _settings(section: dict[str, Any]) -> TuneSettings:
    try:
        return TuneSettings.model_validate(section)
    except ValidationError as exc:
        error = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        where = "tune." + ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(error["loc"][-1]), list(TuneSettings.model_fields), n=1, cutoff=0.5)
            fix = f"did you mean `tune.{hint[0]}`?" if hint else f"valid keys: {', '.join(TuneSettings.model_fields)}"
            raise SpartaError(f"unknown key `{where}` in the recipe: {fix}") from None
        raise SpartaError(f"invalid `{where}` = {error.get('input')!r}: {error['msg']}") from None


def objective(recipe: Recipe) -> tuple[str, str]:
    """(validation metric, direction): the run's own selection metric, so each trial's reported score
    is the one its best step was chosen by."""
    from sparta_cli.metrics import lower_is_better
    from sparta_cli.tasks import resolve_task

    metric = (recipe.training.best_metric or resolve_task(recipe.task).main_metric).removeprefix("eval_")  # train takes either
    return metric, "minimize" if lower_is_better(metric) else "maximize"


def plan_study(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (), flags: dict[str, Any] | None = None,
               space_flags: list[str] | tuple[str, ...] = ()) -> tuple[Plan, int]:
    """The study's plan and the number of workers to start on this machine.

    Overrides apply to the whole file, `tune.*` keys included; flags (`--trials`, ...) win over both."""
    tree = dict(read_yaml(Path(recipe_path)))
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    section = tree.pop("tune", None) or {}
    if not isinstance(section, dict):
        raise SpartaError("`tune` in the recipe must be a section of `key: value` lines (trials, space, ...): see docs/tune.md")
    section = {**section, **{k: v for k, v in (flags or {}).items() if v is not None}}
    settings = _settings(section)
    recipe = build_recipe(tree)
    if recipe.data.validation_size is None:
        raise SpartaError("sparta tune selects on a held-out validation set, never the official evaluation split, but "
                          "data.validation_size is not set: add data.validation_size=0.1 (a fraction, or a count of training rows)")
    metric, direction = objective(recipe)

    given = flatten_space(settings.space)
    given.update(dict(parse_space_flag(text) for text in space_flags))
    space = given or default_space(recipe.adapter.method)
    params = parse_space(space)
    for key, param in params.items():  # every end and choice must make a valid recipe: fail now, not at trial 17
        for value in param.corners():
            build_recipe(tree, [as_override(key, value)])
    if settings.sampler == "grid":
        ranges = [key for key, param in params.items() if param.choices is None]
        if ranges:
            raise SpartaError(f"tune.sampler = grid needs a list of choices for every key, but {', '.join(ranges)} "
                              "is a range: write e.g. adapter.density: [0.001, 0.01, 0.1]")
    if settings.sampler == "grid" and settings.enqueue:  # Optuna's grid numbers its points by trial, enqueued or not
        raise SpartaError("tune.enqueue does not go with tune.sampler = grid, which tries every point of the grid anyway: "
                          "remove tune.enqueue")
    enqueue = [encode_params(params, flatten_space(values)) for values in settings.enqueue]
    for values in settings.enqueue:
        build_recipe(tree, [as_override(k, v) for k, v in flatten_space(values).items()])

    study = settings.study or Path(recipe_path).stem
    study_dir = Path(settings.output_dir or Path("tunes") / study)
    storage = settings.storage or str((study_dir / JOURNAL_FILE).resolve())
    trials = settings.trials
    if settings.sampler == "grid":
        trials = min(trials, math.prod(len(p.choices) for p in params.values()))
    plan = Plan(study=study, study_dir=str(study_dir.resolve()), storage=storage, base=tree, space=space, metric=metric,
                direction=direction, trials=trials, sampler=settings.sampler, pruner=settings.pruner,
                sampler_startup_trials=settings.sampler_startup_trials, pruner_startup_trials=settings.pruner_startup_trials,
                seed=recipe.seed, enqueue=enqueue)
    return plan, settings.workers
