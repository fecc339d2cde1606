"""`training.lr: auto`: the learning rate a method wants, from the rule measured in docs/learning_rates.md.

SpaRTA's best rate grows as the density falls (fewer entries must carry the same change), fitted
on MiniLM as a power law lr* = c * density^-a; the other methods state a fixed rate on their tuner
(`Tuner.auto_lr`). Pure functions: the recipe resolves `auto` once, and the chosen value is what
config.yaml records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

SPARTA_LR_SCALE = 2.5e-3   # c, fitted in docs/learning_rates.md (SST-2 and STS-B, 3 densities each)
SPARTA_LR_EXPONENT = 0.60  # a
SPARTA_LR_MAX = 0.3        # the largest rate measured; the rule is not extrapolated past it


def sparta_lr(density: float) -> float:
    """SpaRTA's `training.lr: auto` rate at `density` (the other methods state a fixed one: `Tuner.auto_lr`)."""
    return min(SPARTA_LR_MAX, SPARTA_LR_SCALE * density ** -SPARTA_LR_EXPONENT)


def fit_power_law(points: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """(c, a) of lr = c * density^-a, least squares in log-log space over (density, best lr) pairs."""
    points = list(points)
    if len({d for d, _ in points}) < 2:
        raise ValueError("fitting a power law needs best rates at two densities or more")
    c, a = _log_least_squares([(d,) for d, _ in points], [lr for _, lr in points])
    return c, a


def fit_length_rule(points: Iterable[tuple[float, float, float]]) -> tuple[float, float, float]:
    """(c, a, b) of lr = c * density^-a * steps^-b, least squares in log space over (density, optimizer
    steps, best lr): the rule with the run's length as a second variable (issue 24's refit)."""
    points = list(points)
    if len({d for d, _, _ in points}) < 2 or len({s for _, s, _ in points}) < 2:
        raise ValueError("fitting the length-aware rule needs best rates at two densities and two run lengths or more")
    return _log_least_squares([(d, s) for d, s, _ in points], [lr for _, _, lr in points])


def _log_least_squares(xs: list[tuple[float, ...]], ys: list[float]) -> tuple[float, ...]:
    """(c, e1, e2, ...) of y = c * x1^-e1 * x2^-e2 ..., least squares in log space."""
    import numpy as np

    design = np.column_stack([np.ones(len(xs)), -np.log(np.asarray(xs, dtype=float))])
    weights, _, rank, _ = np.linalg.lstsq(design, np.log(np.asarray(ys, dtype=float)), rcond=None)
    if rank < design.shape[1]:
        raise ValueError("the points do not determine the fit (their densities and lengths move together)")
    return (math.exp(weights[0]), *(float(w) for w in weights[1:]))


def interpolated_optimum(points: Iterable[tuple[float, float]]) -> float:
    """The rate at the vertex of the parabola through (log lr, validation loss) of the best rate and its
    two neighbours: a half-decade grid's best rate, refined when the loss is flat between two rates."""
    ordered = sorted(points)
    best = min(range(len(ordered)), key=lambda i: ordered[i][1])
    if best in (0, len(ordered) - 1):
        return ordered[best][0]  # not bracketed: the grid's edge is all we know
    (x0, y0), (x1, y1), (x2, y2) = ((math.log(lr), loss) for lr, loss in ordered[best - 1: best + 2])
    numerator = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    denominator = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    return math.exp(x1 - 0.5 * numerator / denominator)
