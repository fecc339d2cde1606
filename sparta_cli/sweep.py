"""The plan of a density sweep: which `sparta train` runs, with which overrides, into which folders.

scripts/sweep_density.sh drives the runs; this module resolves every run's recipe through
the same loader as `sparta train`, so a typo fails before the first run starts, two runs
can never share an output folder, and a folder holding a run of another recipe (say, another
model with the default output_dir) is never skipped as "finished" or resumed.
`python -m sparta_cli.sweep RECIPE DENSITIES [SEEDS] [--baselines] [--full-lr LR] -- OVERRIDES...`
prints one tab-separated line per run: the output folder, the action (`new`, `finished`,
`resume` or `conflict:<why>`), then the overrides to pass to `sparta train`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from sparta_cli.config import Recipe, changed_keys, load_recipe, read_yaml
from sparta_cli.errors import SpartaError
from sparta_cli.outputs import foreign_entries, run_dir_is_empty
from sparta_cli.runs import ALL_RESULTS, CONFIG_YAML

LORA_BASELINE = ("adapter.method=lora", "adapter.targets=[q,v]", "adapter.r=8")
FULL_BASELINE = ("adapter.method=full",)
FULL_LR = 2e-5  # full fine-tuning diverges at the rates sparse adapters want


def plan_sweep(recipe: str | Path, densities: list[str], seeds: list[str], overrides: list[str] = (),
               baselines: bool = False, full_lr: float = FULL_LR) -> list[tuple[Recipe, list[str]]]:
    """(resolved recipe, overrides) per run: seed by seed, every density then LoRA and full, so
    a sweep cut short still holds complete comparisons for its first seeds.

    The user's overrides come first so each run's own settings (method, density, seed) win.
    """
    if not densities:
        raise SpartaError("the sweep names no densities: give them as one argument, e.g. \"0.001 0.005 0.01 0.05\"")
    runs = []
    for seed in [[f"seed={s}"] for s in seeds] or [[]]:  # no seeds: the recipe's own
        runs += [[*overrides, "adapter.method=sparta", f"adapter.density={d}", *seed] for d in densities]
        if baselines:
            runs += [[*overrides, *LORA_BASELINE, *seed], [*overrides, *FULL_BASELINE, f"training.lr={full_lr}", *seed]]
    planned = [(load_recipe(recipe, args), args) for args in runs]
    seen: set[Path] = set()
    for resolved, _ in planned:
        out = Path(resolved.output_dir)
        if out in seen:
            raise SpartaError(
                f"two runs of the sweep would share output_dir {out}: remove output_dir from the recipe or make it end in "
                "${name} (the method, its density or rank, and the seed), e.g. output_dir=sweeps/${task.name}/${name}"
            )
        seen.add(out)
    return planned


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted key -> leaf value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_action(recipe: Recipe) -> str:
    """What the sweep does with a run's folder: train it anew, skip it, resume it (from its newest
    checkpoint, or from the start if it has none), or refuse because it holds a run of another recipe."""
    out = Path(recipe.output_dir)
    if run_dir_is_empty(out):
        return "new"
    foreign = foreign_entries(out)
    if foreign:  # `train --resume` would write a run among them
        return f"conflict:{out} holds files no sparta run writes ({', '.join(foreign[:3])}): set output_dir elsewhere or move them"
    if (out / CONFIG_YAML).is_file():
        theirs = read_yaml(out / CONFIG_YAML)
        theirs.pop("run", None)
        differ = [name for name, _, _ in changed_keys(theirs, recipe.to_dict())]
        if differ:
            return f"conflict:{out} holds a run of another recipe ({', '.join(differ[:3])} differ): set output_dir elsewhere or remove it"
    if (out / ALL_RESULTS).is_file():
        return "finished"
    return "resume"


def main(argv: list[str]) -> int:
    args, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    baselines = "--baselines" in args
    args = [a for a in args if a != "--baselines"]
    full_lr = FULL_LR
    try:
        if "--full-lr" in args:
            i = args.index("--full-lr")
            full_lr = _rate(args[i + 1: i + 2])
            del args[i: i + 2]
        recipe, densities, seeds = args[0], args[1].split(), args[2].split() if len(args) > 2 else []
        planned = plan_sweep(recipe, densities, seeds, overrides, baselines, full_lr)
        lines = []
        for resolved, run_args in planned:
            if any("\t" in a or "\n" in a for a in run_args):
                raise SpartaError(f"override {run_args} holds a tab or newline: write it without one")
            lines.append("\t".join([resolved.output_dir, run_action(resolved), *run_args]))  # a damaged config.yaml: one line
    except SpartaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for line in lines:
        print(line)
    return 0


def _rate(given: list[str]) -> float:
    try:
        rate = float(given[0])
    except (IndexError, ValueError):
        raise SpartaError(f"--full-lr {' '.join(given)}: give full fine-tuning's learning rate as a number, e.g. 5e-5") from None
    if not 0 < rate < math.inf:
        raise SpartaError(f"--full-lr {given[0]}: give a positive learning rate, e.g. 5e-5")
    return rate


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
