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
    xs, ys = zip(*((math.log(d), math.log(lr)) for d, lr in points))
    if len(set(xs)) < 2:
        raise ValueError("fitting a power law needs best rates at two densities or more")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - slope * mx), -slope


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
