"""The exact rank-sum test, against counts done by hand and an independent brute force."""

import itertools
import math

import numpy as np
import pytest

from jaxdt.analysis import ranktest


def test_fully_separated_groups_give_the_smallest_p_their_sizes_allow():
  t = ranktest.rank_sum([1, 2, 3, 4], [5, 6])
  assert (t.extreme, t.splits) == (2, 15) and t.p == pytest.approx(2 / 15)
  assert t.p_min == pytest.approx(2 / 15)
  t = ranktest.rank_sum([393, 393, 467, 445, 430], [441, 514, 500])
  assert t.splits == 56 and 0 < t.p <= 1


def test_identical_values_are_one_tie_and_p_is_one():
  assert ranktest.rank_sum([7, 7, 7], [7, 7]).p == 1.0


def test_unreached_milestones_rank_above_every_step_and_tie_together():
  np.testing.assert_array_equal(ranktest.midranks(np.array([np.inf, 3.0, np.inf, 1.0])),
                                [3.5, 2.0, 3.5, 1.0])
  sep = ranktest.rank_sum([np.inf, 1300, 1290], [1070, 1072])
  assert sep.p == pytest.approx(2 / 10)


def test_p_matches_a_brute_force_over_relabellings_on_random_tied_data():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n, m = rng.integers(1, 6, size=2)
    x = rng.integers(0, 4, size=n + m).astype(float)  # many ties
    # brute force on the rank-sum statistic's distance from its mean, with scipy-free midranks
    r = {v: np.mean([i + 1 for i, w in enumerate(sorted(x)) if w == v]) for v in set(x)}
    stat = lambda idx: abs(sum(r[x[i]] for i in idx) - n * (n + m + 1) / 2)
    obs = stat(range(n))
    count = sum(stat(c) >= obs - 1e-9 for c in itertools.combinations(range(n + m), n))
    t = ranktest.rank_sum(x[:n], x[n:])
    assert t.extreme == count and t.splits == math.comb(n + m, n)


def test_empty_or_too_large_groups_give_none():
  assert ranktest.rank_sum([], [1, 2]) is None
  assert ranktest.rank_sum(range(20), range(20)) is None
