"""An exact two-sided rank-sum test (Mann-Whitney / Wilcoxon) for tiny samples.

The study compares a handful of seeds per framework; at n = 2..5 per group no normal
approximation holds, so the p-value is counted over every split of the pooled values
into groups of the two sizes (C(N, n) splits, 56 for 5 against 3). Ties get midranks and
the count is conditional on them, which is exact for tied data too. A milestone not
reached in a run (+inf) ranks above every step and ties with the other unreached ones.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

MAX_SPLITS = 200_000  # C(N, n) above this is refused (None): the study's groups are small


class RankTest(NamedTuple):
  p: float         # two-sided: share of splits at least as far from the mean rank sum
  extreme: int     # splits counted as at least as extreme
  splits: int      # all splits, C(N, n)
  p_min: float     # the smallest p these sizes can give (no ties): 2 / C(N, n)


def midranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of `x`, ties sharing the mean of their ranks (+inf ties with +inf)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  s = x[order]
  i = 0
  while i < len(s):
    j = i
    while j + 1 < len(s) and s[j + 1] == s[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  return ranks


def rank_sum(a: Sequence[float], b: Sequence[float]) -> Optional[RankTest]:
  """Exact two-sided rank-sum test of `a` against `b`; None where a group is empty or
  the split count exceeds MAX_SPLITS."""
  n, m = len(a), len(b)
  splits = math.comb(n + m, n) if n and m else 0
  if not splits or splits > MAX_SPLITS:
    return None
  r = midranks(np.asarray(list(a) + list(b), dtype=np.float64))
  centre = n * (n + m + 1) / 2
  # midranks and the centre are multiples of 1/2, so these sums are exact in f64; the
  # 1e-9 only guards the >= against a future change of the statistic
  far = abs(r[:n].sum() - centre) - 1e-9
  extreme = sum(abs(r[list(c)].sum() - centre) >= far
                for c in itertools.combinations(range(n + m), n))
  return RankTest(extreme / splits, int(extreme), splits, min(1.0, 2 / splits))
