"""BENCHMARKS.md's table for scripts/bench_tune.sh: per study, trials finished and pruned, wall time,
the best validation score with its trial's test score; and each study's best within the wall time
of the fastest one (the "equal wall time" comparison). Works on unfinished studies (partial tables).

    python scripts/bench_tune_table.py STUDY_DIR [STUDY_DIR ...]
"""

from __future__ import annotations

import sys

from sparta_cli.tune.results import counts
from sparta_cli.tune.study import open_study, read_plan, retries


def _finished(study) -> list:
    trials = study.get_trials(deepcopy=False)
    replaced = retries(trials)
    return sorted((t for t in trials if t.state.is_finished() and t.number not in replaced), key=lambda t: t.datetime_complete)


def _best(plan, trials):
    done = [t for t in trials if t.state.name == "COMPLETE"]
    if not done:
        return None
    return (max if plan.direction == "maximize" else min)(done, key=lambda t: t.value)


def main(folders: list[str]) -> None:
    studies = []
    for folder in folders:
        plan = read_plan(folder)
        study = open_study(plan)
        trials = _finished(study)
        start = min((t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start), default=None)
        wall = (trials[-1].datetime_complete - start).total_seconds() if trials else 0.0
        studies.append((plan, study, trials, start, wall))
    equal = min((wall for *_, wall in studies if wall > 0), default=0.0)
    metric = studies[0][0].metric
    test_key = f"test_{metric}"
    print(f"| study | sampler / pruner | trials finished | pruned | wall time | best validation {metric} | its test {metric} "
          f"| best validation within {equal / 60:.0f} min | its test |")
    print("|---|---|---|---|---|---|---|---|---|")
    for plan, study, trials, start, wall in studies:
        found = counts(study)
        best = _best(plan, trials)
        early = _best(plan, [t for t in trials if (t.datetime_complete - start).total_seconds() <= equal])

        def cells(trial) -> str:
            if trial is None:
                return "— | —"
            test = trial.user_attrs.get(test_key)
            return f"{trial.value:.4f} (trial {trial.number}) | {test:.4f}" if test is not None else f"{trial.value:.4f} | —"

        print(f"| {plan.study} | {plan.sampler} / {plan.pruner} | {len(trials)} of {plan.trials} | {found['pruned']} "
              f"| {wall / 60:.0f} min | {cells(best)} | {cells(early)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
