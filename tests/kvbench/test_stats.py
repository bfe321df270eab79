"""Bootstrap intervals and interval-separated ranks."""
import math

from kvbench.stats import bootstrap_interval, format_cell, interval_ranks


def test_bootstrap_interval_of_a_rate():
    found = [100.0] * 15 + [0.0] * 5  # 75% found over 20 samples
    lo, hi = bootstrap_interval(found)
    assert 50 < lo < 75 < hi < 95  # about 75 +- 19 (normal approximation: 1.96 * sqrt(.75*.25/20) = 19)
    assert bootstrap_interval(found) == (lo, hi)  # a fixed seed: the same table every time
    wide = bootstrap_interval(found[:4] + found[-1:])
    assert wide[1] - wide[0] > hi - lo  # fewer samples, a wider interval


def test_degenerate_inputs():
    assert all(math.isnan(x) for x in bootstrap_interval([]))
    assert bootstrap_interval([42.0]) == (42.0, 42.0)
    assert bootstrap_interval([100.0] * 10) == (100.0, 100.0)


def test_ranks_tie_what_intervals_do_not_separate():
    cells = {"a": (90.0, 85.0, 95.0), "b": (80.0, 70.0, 88.0), "c": (40.0, 30.0, 50.0), "d": (38.0, 20.0, 55.0)}
    assert interval_ranks(cells) == {"a": 1, "b": 1, "c": 3, "d": 3}
    # a lower-is-better metric (KL): the smaller interval wins
    kl = {"x": (0.05, 0.04, 0.06), "y": (0.2, 0.15, 0.25)}
    assert interval_ranks(kl, higher_is_better=False) == {"x": 1, "y": 2}


def test_format_cell():
    assert format_cell(62.5, 45.0, 80.0, 40) == "62.5 [45.0, 80.0] n=40"
    assert format_cell(math.nan, math.nan, math.nan, 0) == "-"


def test_paired_difference_separates_what_overlapping_intervals_cannot():
    """Samples of varied difficulty, one method 2 points above the other on every one: the two separate
    intervals overlap (the leaderboard's tie), the paired interval is the shift itself; only shared ids count."""
    from kvbench.stats import bootstrap_interval, paired_difference
    hard = {f"s{i}": float((i * 37) % 100) for i in range(60)}
    easy = {k: v + 2.0 for k, v in hard.items()}
    alo, ahi = bootstrap_interval(list(easy.values()))
    blo, bhi = bootstrap_interval(list(hard.values()))
    assert alo < bhi and blo < ahi  # overlap
    assert paired_difference(easy, hard) == (2.0, 2.0, 2.0, 60)
    noisy = {k: v + (3.0 if i % 2 else -3.0) for i, (k, v) in enumerate(hard.items())}
    mean, lo, hi, n = paired_difference(noisy, hard)
    assert n == 60 and mean == 0.0 and lo < 0 < hi  # no difference: not separated
    assert paired_difference({**easy, "extra": 99.0}, {"s0": 1.0, "s1": 5.0})[3] == 2
    assert paired_difference({"a": 1.0}, {"b": 1.0})[3] == 0
