"""What a study leaves in its folder, rebuilt from the storage after every `sparta tune`:
trials.csv / trials.md (one row per trial, validation metric only), best.yaml (the best trial's
recipe, trained as is by `sparta train`), summary.json (the best trial, with its test scores) and
plots (history.png, params.png, importances.png).

Test scores (`test_*`, the official evaluation split scored once with each run's best adapter) are
never in the table: choosing among trials by them would make them validation scores. Only the best
trial's are reported, once.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import yaml

from sparta_cli.fileio import write_json, write_text
from sparta_cli.tune.space import decode
from sparta_cli.tune.study import Plan, retries

TRIALS_CSV = "trials.csv"
TRIALS_MD = "trials.md"
BEST_YAML = "best.yaml"
SUMMARY_JSON = "summary.json"


def state_name(trial, retry=None) -> str:
    """complete, pruned, diverged, fail, fail (retried as N), running; `retry`: the trial that replaces this one."""
    name = trial.state.name.lower()
    if name == "pruned" and "failure" in trial.user_attrs:
        return "diverged"
    if name == "fail" and retry is not None:
        return f"fail (retried as {retry.number})"
    return name


def trial_rows(study, plan: Plan) -> list[dict[str, Any]]:
    """One row per asked-for trial (enqueued ones not yet started are left out)."""
    from optuna.trial import TrialState

    params = plan.params
    rows = []
    trials = study.get_trials(deepcopy=False)
    replaced = retries(trials)
    for trial in trials:
        if trial.state == TrialState.WAITING:
            continue
        row: dict[str, Any] = {"trial": trial.number, "state": state_name(trial, replaced.get(trial.number)),
                               f"validation_{plan.metric}": trial.value if trial.value is not None else ""}
        for key, param in params.items():
            value = decode(param, trial.params[key]) if key in trial.params else ""
            row[key] = value if not isinstance(value, (list, dict)) else yaml.safe_dump(value, default_flow_style=True).strip()
        attrs = trial.user_attrs
        row["best_step"] = attrs.get("best_step", "")
        row["evaluations"] = len(trial.intermediate_values)
        row["pruned_at_step"] = attrs.get("pruned_at_step", "")
        row["seconds"] = attrs.get("seconds", "")
        row["run_dir"] = attrs.get("run_dir", "")
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def rows_to_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no trials yet\n"
    columns = [c for c in rows[0] if c != "run_dir"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def best_trial(study):
    """The best finished trial, or None before any trial completes."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(done, key=lambda t: t.value)


def counts(study) -> dict[str, int]:
    found = {"complete": 0, "pruned": 0, "fail": 0, "running": 0}
    trials = study.get_trials(deepcopy=False)
    replaced = retries(trials)
    for trial in trials:
        if trial.number in replaced:
            continue  # its retry is counted instead
        name = trial.state.name.lower()
        if name in found:
            found[name] += 1
    return found


def write_best_yaml(plan: Plan, trial, path: Path) -> None:
    """The best trial's recipe with a fresh output_dir: `sparta train best.yaml` reruns the trial,
    same seed, same data split, same validation score."""
    recipe = plan.trial_recipe(trial.number, trial.params)
    data = recipe.to_dict()
    data["output_dir"] = str(Path(plan.study_dir) / "best")
    header = (f"# best trial {trial.number} of study {plan.study}: validation {plan.metric} = {trial.value:.6g}\n"
              f"# its run: {trial.user_attrs.get('run_dir', recipe.output_dir)}; rerun with: sparta train {path}\n")
    write_text(path, header + yaml.safe_dump(data, sort_keys=False))


def write_outputs(study, plan: Plan) -> dict[str, Any]:
    """Every file of the study folder, from the storage; returns the summary."""
    folder = Path(plan.study_dir)
    rows = trial_rows(study, plan)
    write_text(folder / TRIALS_CSV, rows_to_csv(rows))
    write_text(folder / TRIALS_MD, f"# study {plan.study}: validation {plan.metric} ({plan.direction})\n\n" + rows_to_markdown(rows))
    best = best_trial(study)
    summary: dict[str, Any] = {"study": plan.study, "storage": plan.storage, "metric": f"validation {plan.metric}",
                               "direction": plan.direction, "trials": counts(study), "best": None}
    if best is not None:
        write_best_yaml(plan, best, folder / BEST_YAML)
        summary["best"] = {"trial": best.number, f"validation_{plan.metric}": best.value,
                           "params": {k: decode(plan.params[k], v) for k, v in best.params.items() if k in plan.params},
                           "best_step": best.user_attrs.get("best_step"), "run_dir": best.user_attrs.get("run_dir"),
                           "test": {k: v for k, v in best.user_attrs.items() if k.startswith("test_")}}
    write_json(folder / SUMMARY_JSON, summary)
    from sparta_cli.tune.plots import write_plots

    write_plots(study, plan, folder)
    return summary

