"""Uncertainty for the leaderboard: bootstrap intervals of a task's score, and ranks that count the methods whose
intervals lie wholly above.

A cell of the leaderboard is a task's score: a mean over samples (a found rate, a mean F1), or a macro average
of such means (LongBench's subsets, RULER's tasks and lengths), or a mean over units of several samples (AIME's
problems); with 20-100 samples its 95% interval is often wider than the gap between two methods.
``bootstrap_interval`` gives the percentile bootstrap interval of a mean (resampling samples with replacement, a
fixed seed, so a table is reproducible); ``stratified_interval`` that of a weighted sum of group means, each group
resampled within itself (``Task.score_units`` says how a task's score is made of them). ``interval_ranks`` ranks
methods by how many intervals lie wholly above theirs (below, for a lower-is-better score).
``paired_difference`` compares two methods on the same samples (units): the interval of the mean of their
per-sample differences, much narrower than two separate intervals when the samples' difficulty varies more than the
methods do (the samples' own variance cancels).
"""
from __future__ import annotations

import math
import random


def bootstrap_interval(values: list[float], level: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaN, NaN when empty; the value when n = 1)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    if len(vals) == 1 or min(vals) == max(vals):
        return vals[0] if len(vals) == 1 else min(vals), max(vals)
    rng = random.Random(seed)
    n = len(vals)
    return _percentile_interval(sorted(sum(rng.choices(vals, k=n)) / n for _ in range(n_boot)), level)


def stratified_interval(parts: list[tuple[float, list[float]]], level: float = 0.95, n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(weight * mean(values))`` over ``parts`` = [(weight, values)], every
    part resampled within itself (its size kept: the groups of a macro average are fixed, the samples drawn). One
    part of weight 1 is the plain mean: ``bootstrap_interval``, the same numbers."""
    parts = [(w, v) for w, v in parts if len(v)]
    if len(parts) == 1 and parts[0][0] == 1.0:
        return bootstrap_interval(parts[0][1], level, n_boot, seed)
    if not parts:
        return math.nan, math.nan
    import numpy as np  # a RULER run is 26 groups x 2000 resamples
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for weight, values in parts:
        v = np.asarray(values, dtype=float)
        total += weight * v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    return tuple(float(x) for x in _percentile_interval(np.sort(total), level))


def _percentile_interval(means, level: float) -> tuple[float, float]:
    """The central ``level`` of sorted resampled means."""
    tail = (1.0 - level) / 2.0
    n_boot = len(means)
    return means[max(0, int(math.floor(tail * n_boot)))], means[min(n_boot - 1, int(math.ceil((1.0 - tail) * n_boot)) - 1)]


def paired_difference(a: dict | list, b: dict | list, level: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float, int]:
    """``a``, ``b``: unit id -> score, or a task's ``score_units`` parts ``[(weight, {unit: score})]`` (a macro
    average's groups). The difference of the two scores over the units both have (per part: weight x the mean of
    the differences, parts both lack left out and the weights renormalised), its percentile bootstrap interval
    (the units resampled together, each part within itself, as the leaderboard's interval) and the count of
    units; NaNs when they share none."""
    import numpy as np  # vectorised: a cell's family-level intervals take 20,000 resamples of each pair
    a_parts = a if isinstance(a, list) else [(1.0, a)]
    b_all = {k: v for _, part in (b if isinstance(b, list) else [(1.0, b)]) for k, v in part.items()}
    parts = []
    for weight, part in a_parts:
        common = sorted(set(part) & set(b_all), key=str)
        if common:
            parts.append((weight, np.array([float(part[k]) - float(b_all[k]) for k in common])))
    if not parts:
        return math.nan, math.nan, math.nan, 0
    total = sum(w for w, _ in parts)
    rng = np.random.default_rng(seed)
    means = np.zeros(n_boot)
    for weight, diffs in parts:
        means += weight / total * diffs[rng.integers(0, len(diffs), (n_boot, len(diffs)))].mean(1)
    lo, hi = _percentile_interval(np.sort(means), level)
    mean = sum(w / total * d.mean() for w, d in parts)
    return float(mean), float(lo), float(hi), sum(len(d) for _, d in parts)


def interval_ranks(cells: dict[str, tuple[float, float, float]], higher_is_better: bool = True) -> dict[str, int]:
    """``{name: (mean, lo, hi)}`` -> ``{name: rank}``: 1 + the number of methods whose interval lies wholly
    above this one's (below, when lower is better), as LMSYS's arena ranks. A rank counts the methods clearly
    better; it does not say which pairs the intervals separate. Equal ranks overlap (were one interval wholly above
    the other, the lower would count it and all above it), but different ranks may too: A [8, 10], B [5, 9],
    C [1, 6] rank 1, 1, 2, B overlapping C (only A's interval lies above C's). Whether two methods differ:
    ``paired_difference``."""
    ranks = {}
    for name, (_, lo, hi) in cells.items():
        if higher_is_better:
            above = sum(1 for other, (_, olo, _) in cells.items() if other != name and olo > hi)
        else:
            above = sum(1 for other, (_, _, ohi) in cells.items() if other != name and ohi < lo)
        ranks[name] = 1 + above
    return ranks


def format_cell(mean: float, lo: float, hi: float, n: int, digits: int = 1) -> str:
    """``"62.5 [45.0, 80.0] n=40"``."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] n={n}"
