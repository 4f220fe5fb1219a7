"""Freeze analyses as typed results: Fimbulwinter check, stillness, global freeze, frozen fraction.

Each block is a frozen dataclass built by its `of(...)` from per-step or
per-row arrays (docs/definitions.md). Conventions: step t = 1..T; index t-1
of a per-step array holds step t; "never" is -1 in per-row step arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

MILESTONES = (50, 90, 99, 100)  # per-step frozen-fraction milestones, percent
SAMPLE_STEPS = (1, 10, 100, 500, 1000, 2000, 5000, 10000)


def torch_median(x: np.ndarray) -> float:
  """torch.median: the lower of the two middle values for an even count."""
  s = np.sort(np.asarray(x).ravel())
  return float(s[(s.size - 1) // 2])


def runs_of(mask: np.ndarray) -> list:
  """Maximal runs of True as (first index, length), in order."""
  m = np.concatenate([[0], np.asarray(mask, bool).astype(np.int8), [0]])
  edges = np.diff(m)
  starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
  return [(int(a), int(b - a)) for a, b in zip(starts, ends)]


def sample_steps(total: int) -> list:
  """The steps a summary quotes values at: SAMPLE_STEPS below T, then T."""
  return [t for t in SAMPLE_STEPS if t < total] + ([total] if total else [])


def window_steps(total: int) -> int:
  """Window length for "frozen fraction by window": 1000 steps from 2000 on, else a fifth."""
  return 1000 if total >= 2000 else max(1, -(-total // 5))


def first_step_reaching(count: np.ndarray, n: int, percent: float) -> Optional[int]:
  """First step t (1-based) with count[t-1] / n ≥ percent/100, exactly; None if never."""
  hit = np.flatnonzero(np.asarray(count, np.int64) * 100 >= percent * n)
  return int(hit[0]) + 1 if hit.size else None


@dataclasses.dataclass(frozen=True)
class FimbulwinterCheck:
  """Crucible 1's FIMBULWINTER CHECK (docs/definitions.md §Motion threshold and last motion)."""

  global_last_motion: int
  fimbulwinter_duration: int
  fimbulwinter_fraction: float
  earliest_freeze: int
  median_freeze: float  # torch.median of the per-row last motion steps
  latest_freeze: int
  never_moved: int
  n_rows: int

  @classmethod
  def of(cls, last_motion_step: np.ndarray, total_steps: int) -> "FimbulwinterCheck":
    lms = np.asarray(last_motion_step)
    last = int(lms.max())
    return cls(last, int(total_steps - last), (total_steps - last) / total_steps,
               int(lms.min()), torch_median(lms.astype(np.float32)), last,
               int((lms == -1).sum()), int(lms.size))


@dataclasses.dataclass(frozen=True)
class Stillness:
  """STILLNESS PERIOD ANALYSIS: maximal runs of steps with no row moving, longest first.

  mean = sum/len; median = sorted(runs)[len // 2] (the lab's formula: the
  upper middle value).
  """

  count: int
  runs: tuple
  longest_10: tuple
  mean: Optional[float]
  median: Optional[int]
  final_vs_second: Optional[float]

  @classmethod
  def of(cls, any_motion: np.ndarray) -> "Stillness":
    runs = tuple(sorted((n for _, n in runs_of(~np.asarray(any_motion, bool))), reverse=True))
    return cls(len(runs), runs, runs[:10], sum(runs) / len(runs) if runs else None,
               sorted(runs)[len(runs) // 2] if runs else None,
               runs[0] / runs[1] if len(runs) >= 2 else None)


@dataclasses.dataclass(frozen=True)
class Span:
  """Steps start..end (inclusive)."""

  start: int
  end: int
  length: int


@dataclasses.dataclass(frozen=True)
class Window:
  start: int
  end: int
  fraction: float


@dataclasses.dataclass(frozen=True)
class GlobalFreeze:
  """Global freeze fraction and freeze/thaw cycles (the lab's `1.29c`, docs/definitions.md §Global
  freeze): a step is frozen when W[t] == W[t-1] bitwise for every row."""

  frozen_steps: int
  total_steps: int
  fraction: Optional[float]
  cycles: int  # maximal frozen runs
  longest: Optional[Span]  # the earliest of equal lengths
  mean_run: Optional[float]
  median_run: Optional[float]  # np.median
  first_frozen_step: Optional[int]
  final_run_to_end: bool
  windows: tuple

  @classmethod
  def of(cls, frozen: np.ndarray, window: Optional[int] = None) -> "GlobalFreeze":
    frozen = np.asarray(frozen, bool)
    T = frozen.size
    runs = runs_of(frozen)
    lengths = [n for _, n in runs]
    best = max(runs, key=lambda r: r[1]) if runs else None  # max() keeps the first of ties
    window = window or window_steps(T)
    return cls(
        int(frozen.sum()), T, float(frozen.mean()) if T else None, len(runs),
        None if best is None else Span(best[0] + 1, best[0] + best[1], best[1]),
        float(np.mean(lengths)) if runs else None, float(np.median(lengths)) if runs else None,
        runs[0][0] + 1 if runs else None, bool(runs) and runs[-1][0] + runs[-1][1] == T,
        tuple(Window(a + 1, min(T, a + window), float(frozen[a:a + window].mean()))
              for a in range(0, T, window)))


@dataclasses.dataclass(frozen=True)
class Reheat:
  """Row-level changes of "frozen" between consecutive steps."""

  cold_to_hot: int
  hot_to_cold: int
  transitions: int  # n · (T − 1)
  cold_to_hot_fraction: Optional[float]
  hot_to_cold_fraction: Optional[float]


@dataclasses.dataclass(frozen=True)
class FrozenFraction:
  """Per-step frozen fraction (‖ΔW′_i‖₂ < threshold) and its milestones (docs/definitions.md
  §Frozen-fraction milestones)."""

  milestones: dict  # {"50%": first step or None, "90%": ..., "99%": ..., "100%": ...}
  first_frozen_token_step: Optional[int]
  moving_at: dict  # {str(step): rows still moving}
  final_fraction: Optional[float]
  reheat: Optional[Reheat]  # None: not recorded (the compact freeze record keeps counts only)

  @classmethod
  def of(cls, n_frozen: np.ndarray, n: int, cold_to_hot: Optional[int] = 0,
         hot_to_cold: Optional[int] = 0) -> "FrozenFraction":
    n_frozen = np.asarray(n_frozen, np.int64)
    T = n_frozen.size
    first = np.flatnonzero(n_frozen > 0)
    transitions = n * max(T - 1, 0)
    share = lambda k: k / transitions if transitions else None
    return cls(
        {f"{p}%": first_step_reaching(n_frozen, n, p) for p in MILESTONES},
        int(first[0]) + 1 if first.size else None,
        {str(t): int(n - n_frozen[t - 1]) for t in sample_steps(T)},
        float(n_frozen[-1] / n) if T and n else None,
        None if cold_to_hot is None else
        Reheat(int(cold_to_hot), int(hot_to_cold), transitions, share(cold_to_hot),
               share(hot_to_cold)))

  def milestone(self, percent: int) -> Optional[int]:
    """The first step with `percent`% of the rows frozen (None if never)."""
    return self.milestones.get(f"{percent}%")
