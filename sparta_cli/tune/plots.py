"""A study's pictures: the validation metric per trial with the best so far, the metric against each
searched key (density, lr, ...) coloured by how the trial ended, and the keys' importances."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from sparta_cli.plots import _figure, _save
from sparta_cli.tune.space import decode
from sparta_cli.tune.study import Plan

STYLE = {"COMPLETE": {"color": "tab:blue", "marker": "o", "label": "complete"},
         "PRUNED": {"color": "tab:orange", "marker": "x", "label": "pruned (last validation score)"}}

HISTORY_PNG = "history.png"
PARAMS_PNG = "params.png"
IMPORTANCES_PNG = "importances.png"


def _scored(study) -> list:
    """Finished trials with a finite value: completed ones, and pruned ones at their last report."""
    return [t for t in study.get_trials(deepcopy=False) if t.state.name in STYLE and t.value is not None and math.isfinite(t.value)]


def history_png(study, plan: Plan, path: Path) -> Path:
    trials = _scored(study)
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    for state, style in STYLE.items():
        mine = [t for t in trials if t.state.name == state]
        ax.scatter([t.number for t in mine], [t.value for t in mine], **style)
    complete = sorted((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.number)
    if complete:
        best, xs, ys = None, [], []
        for t in complete:
            better = best is None or (t.value > best if plan.direction == "maximize" else t.value < best)
            best = t.value if better else best
            xs.append(t.number)
            ys.append(best)
        last = max(t.number for t in trials)
        ax.step([*xs, last], [*ys, ys[-1]], where="post", color="tab:green", label="best so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {plan.metric}")
    ax.set_title(f"study {plan.study}: optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def params_png(study, plan: Plan, path: Path) -> Path:
    """One panel per searched key: validation metric against the key's value (log axis for log ranges)."""
    trials = _scored(study)
    params = plan.params
    fig = _figure(4.2 * len(params), 4.0)
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, (key, param) in zip(axes, params.items()):
        labels = [str(c) for c in param.choices] if param.choices is not None else None
        for state, style in STYLE.items():
            mine = [t for t in trials if t.state.name == state and key in t.params]
            xs = [decode(param, t.params[key]) for t in mine]
            if labels is not None:
                xs = [labels.index(str(x)) for x in xs]
            ax.scatter(xs, [t.value for t in mine], **style)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels=labels, rotation=20, fontsize="small")
        else:  # the whole searched range, so the picture shows where the search did not go
            if param.log:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter("")
                ax.set_xlim(param.low / 1.2, param.high * 1.2)
            else:
                pad = (param.high - param.low) * 0.05
                ax.set_xlim(param.low - pad, param.high + pad)
        ax.set_xlabel(key)
        ax.set_ylabel(f"validation {plan.metric}")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"study {plan.study}: validation {plan.metric} against each searched key")
    return _save(fig, path)


def importances_png(study, plan: Plan, path: Path) -> Path | None:
    """Importances by Optuna's default evaluator; None (no file) with fewer than two
    completed trials or a single searched key, where importances mean nothing."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if len(complete) < 2 or len(plan.params) < 2:
        return None
    try:
        with warnings.catch_warnings():  # few trials make the evaluator warn; the axis label says how many
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study, params=list(plan.params))
    except (ValueError, RuntimeError):  # e.g. every completed trial has the same value
        return None
    names = list(importances)[::-1]
    fig = _figure(6.4, 0.6 + 0.5 * len(names))
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel(f"importance for validation {plan.metric} ({len(complete)} completed trials)")
    ax.set_title(f"study {plan.study}: which keys matter")
    return _save(fig, path)


def write_plots(study, plan: Plan, folder: Path) -> list[Path]:
    if not _scored(study):
        return []
    made = [history_png(study, plan, folder / HISTORY_PNG), params_png(study, plan, folder / PARAMS_PNG)]
    importances = importances_png(study, plan, folder / IMPORTANCES_PNG)
    return made + ([importances] if importances else [])
