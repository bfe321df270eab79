"""Bootstrap intervals and interval-separated ranks."""
import math

import pytest

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


def test_a_paired_macro_difference_is_the_difference_of_the_macro_scores():
    """Parts of a macro average (LongBench's datasets), unequal in size: the paired difference is the difference
    of the two macro scores (not of the plain means), its interval resamples each part within itself (a shift
    constant within each part: no spread at all), and a plain dict is one part of weight 1, as before."""
    from kvbench.stats import paired_difference
    big = {f"a{i}": float(i % 5) for i in range(40)}
    small = {f"b{i}": float(i % 3) for i in range(8)}
    mine = [(0.5, {k: v + 10.0 for k, v in big.items()}), (0.5, {k: v + 2.0 for k, v in small.items()})]
    theirs = [(0.5, big), (0.5, small)]
    assert paired_difference(mine, theirs) == (6.0, 6.0, 6.0, 48)  # (10 + 2) / 2; the plain mean: 8.67
    one = {k: v + (1.0 if i % 2 else -1.0) for i, (k, v) in enumerate(big.items())}
    assert paired_difference(one, big) == paired_difference([(1.0, one)], [(1.0, big)])


def test_ranks_count_what_lies_wholly_above_not_which_pairs_are_apart():
    """B overlaps C yet ranks above it: only A's interval lies wholly above C's (the docstring's example)."""
    cells = {"A": (9.0, 8.0, 10.0), "B": (7.0, 5.0, 9.0), "C": (3.0, 1.0, 6.0)}
    assert interval_ranks(cells) == {"A": 1, "B": 1, "C": 2}


def test_stratified_interval():
    """One part of weight 1 is the plain mean's interval, the same numbers; parts are resampled within themselves,
    so a macro of constant parts has no spread and one of varied parts holds the macro."""
    from kvbench.stats import stratified_interval
    found = [100.0] * 15 + [0.0] * 5
    assert stratified_interval([(1.0, found)]) == bootstrap_interval(found)
    assert all(math.isnan(x) for x in stratified_interval([]))
    assert stratified_interval([(0.5, [80.0] * 40), (0.5, [10.0] * 10)]) == (45.0, 45.0)
    lo, hi = stratified_interval([(0.5, [60.0, 100.0] * 20), (0.5, [0.0, 20.0] * 5)])
    assert lo < 45.0 < hi and hi - lo < 15


@pytest.mark.parametrize("task,records", [
    ("niah", [{"id": f"s{i}", "meta": {"length": 1000, "depth": 0.5}, "scores": {"score": 10.0 * i}}
              for i in range(7)]),
    ("longbench", [{"id": f"{d}{i}", "meta": {"dataset": d}, "scores": {"score": float(i * 7 % 11)}}
                   for d, n in (("qasper", 3), ("lcc", 9), ("trec", 1)) for i in range(n)]),
    ("ruler", [{"id": f"{t}{L}{i}", "meta": {"task": t, "length": L}, "scores": {"score": float(i * 13 % 17)}}
               for t, L, n in (("niah_single_1", 4096, 2), ("vt", 4096, 5), ("cwe", 4096, 3), ("vt", 16384, 4))
               for i in range(n)]),
    ("scbench", [{"id": f"{t}{i}", "meta": {"task": t}, "scores": {"score": float(i * 5 % 9)}}
                 for t, n in (("scbench_kv", 2), ("scbench_vt", 6)) for i in range(n)]),
    ("aime24", [{"id": f"{p}#{k}", "meta": {"problem_id": str(p)}, "scores": {"correct": float((p + k) % 3 == 0)}}
                for p in range(5) for k in range(4)]),
])
def test_score_units_make_the_score_summarize_makes(task, records):
    """Each task's units, weighted, give its ``summarize``'s score (uneven groups: a plain mean would not)."""
    from kvbench import registry
    built = registry.build_task(task)
    parts = built.score_units(records)
    assert sum(w * sum(u.values()) / len(u) for w, u in parts) == pytest.approx(built.summarize(records)["score"])
