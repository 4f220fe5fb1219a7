"""Lifecycle phases and the dead cloud's centroid drift, as typed results (docs/definitions.md).

`Lifecycle.of` applies the last-exit rule to per-row last steps (-1 = never);
`CentroidDrift.of` reads the centroid and cloud radii per W row 0..T.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from jaxdt.analysis import freeze


@dataclasses.dataclass(frozen=True)
class Stats:
  """mean, median (torch.median: lower middle), min, max and count of a set of steps."""

  mean: float
  median: float
  min: int
  max: int
  count: int

  @classmethod
  def of(cls, x: np.ndarray) -> Optional["Stats"]:
    x = np.asarray(x)
    if not x.size:
      return None
    return cls(float(x.mean()), freeze.torch_median(x), int(x.min()), int(x.max()), int(x.size))


def nested_boundaries(last_early, last_midlife, last_l1) -> tuple:
  """The three last-exit steps as nested per-row boundaries (0 = never).

  ‖ΔW′‖₂ > √D implies L∞ > 1 (‖x‖₂ ≤ √D·‖x‖∞), which implies L1 > 0, so the
  raw last steps already nest; the maxima only guard non-finite rows.
  """
  le = np.maximum(np.asarray(last_early), 0)
  lm = np.maximum(np.asarray(last_midlife), le)
  ll = np.maximum(np.asarray(last_l1), lm)
  return le, lm, ll


def _count_at_least(b: np.ndarray, total_steps: int) -> np.ndarray:
  """[T]: for t = 1..T, how many rows have b ≥ t."""
  h = np.bincount(np.clip(b, 0, total_steps), minlength=total_steps + 1)
  return np.cumsum(h[::-1])[::-1][1:]


def phase_populations(last_early, last_midlife, last_l1, total_steps: int) -> np.ndarray:
  """int [T, 4]: rows in Early, Midlife, Late, Fimbulwinter at each step (last-exit rule)."""
  le, lm, ll = nested_boundaries(last_early, last_midlife, last_l1)
  n = le.size
  ge = [_count_at_least(b, total_steps) for b in (le, lm, ll)]
  return np.stack([ge[0], ge[1] - ge[0], ge[2] - ge[1], n - ge[2]], axis=1)


@dataclasses.dataclass(frozen=True)
class Boundaries:
  """Last-exit steps over the rows that ever met each criterion, and how many never did."""

  last_early: Optional[Stats]
  last_early_never: int
  last_midlife: Optional[Stats]
  last_midlife_never: int
  last_motion: Optional[Stats]
  last_motion_never: int
  fimbulwinter_onset: Optional[Stats]  # last motion + 1


@dataclasses.dataclass(frozen=True)
class Durations:
  """Steps spent in each phase, over all rows."""

  early: Optional[Stats]
  midlife: Optional[Stats]
  late: Optional[Stats]
  fimbulwinter: Optional[Stats]


@dataclasses.dataclass(frozen=True)
class Lifecycle:
  """Lifecycle phases by the last-exit rule (docs/definitions.md §Lifecycle phases).

  A row is Early up to the last step with ‖ΔW′‖₂ > √D, Midlife up to the last
  step with L∞ > 1, Late up to the last step with L1 > 0, and in Fimbulwinter
  (L1 = 0 sustained) from the step after that to the end. The second
  vocabulary adds the last Hypernova (‖ΔW′‖₂ > 1000) and Spherical (L1 > 1)
  steps and the stumbling duration (last motion − last L1 > 1).
  """

  boundaries: Boundaries
  durations: Durations
  last_hypernova: Optional[Stats] = None
  last_spherical: Optional[Stats] = None
  stumbling: Optional[Stats] = None

  @classmethod
  def of(cls, last_early, last_midlife, last_l1, total_steps: int, *, last_hypernova=None,
         last_spherical=None) -> "Lifecycle":
    raw = [np.asarray(x) for x in (last_early, last_midlife, last_l1)]
    met = [Stats.of(b[b >= 0]) for b in raw]
    never = [int((b < 0).sum()) for b in raw]
    ll = raw[2]
    bounds = Boundaries(met[0], never[0], met[1], never[1], met[2], never[2],
                        Stats.of(ll[ll >= 0] + 1))
    le, lm, ll0 = nested_boundaries(*raw)
    durations = Durations(Stats.of(le), Stats.of(lm - le), Stats.of(ll0 - lm),
                          Stats.of(total_steps - ll0))
    extra = {}
    if last_hypernova is not None:
      h = np.asarray(last_hypernova)
      extra["last_hypernova"] = Stats.of(h[h >= 0])
    if last_spherical is not None:
      sp = np.asarray(last_spherical)
      extra["last_spherical"] = Stats.of(sp[sp >= 0])
      extra["stumbling"] = Stats.of(ll0 - np.minimum(np.maximum(sp, 0), ll0))
    return cls(bounds, durations, **extra)


@dataclasses.dataclass(frozen=True)
class CentroidDrift:
  """Centroid drift and cloud radius (docs/definitions.md §Centroid drift).

  norm_start/norm_end are ‖c‖; path_length Σ‖Δc‖; crow_flies ‖c(T) − c(0)‖;
  efficiency crow/path; cos_mean/cos_std (ddof=1, as torch.std) over
  consecutive steps where both Δc ≠ 0; l2_over_l1 of the total displacement
  against its uniform baseline 1/√D; with the radii: mean ‖w_i − c‖, mean ‖w_i‖
  and liftoff_step (first t with ‖c(t)‖ > max_i ‖w_i − c(t)‖).
  """

  source: str
  norm_start: float
  norm_end: float
  path_length: float
  crow_flies: float
  efficiency: Optional[float]
  cos_mean: Optional[float]
  cos_std: Optional[float]
  cos_pairs: int
  l2_over_l1: Optional[float]
  uniform_baseline: float
  last_motion_step: Optional[int]
  radius_start: Optional[float] = None
  radius_end: Optional[float] = None
  radius_ratio: Optional[float] = None
  radius_origin_start: Optional[float] = None
  radius_origin_end: Optional[float] = None
  liftoff_step: Optional[int] = None

  @classmethod
  def of(cls, centroid: np.ndarray, radius=None, radius_origin=None, max_radius=None, *,
         source: str = "") -> "CentroidDrift":
    c = np.asarray(centroid, np.float64)
    dc = np.diff(c, axis=0)
    step = np.sqrt(np.square(dc).sum(1))
    path = float(step.sum())
    total = c[-1] - c[0]
    crow = float(np.sqrt(np.square(total).sum()))
    both = (step[:-1] > 0) & (step[1:] > 0)
    cos = (dc[:-1] * dc[1:]).sum(1)[both] / (step[:-1] * step[1:])[both]
    moved = np.flatnonzero(step > 0)
    l1 = float(np.abs(total).sum())
    radii = {}
    if radius is not None:
      r = np.asarray(radius, np.float64)
      radii.update(radius_start=float(r[0]), radius_end=float(r[-1]),
                   radius_ratio=float(r[-1] / r[0]) if r[0] > 0 else None)
    if radius_origin is not None:
      radii.update(radius_origin_start=float(radius_origin[0]),
                   radius_origin_end=float(radius_origin[-1]))
    if max_radius is not None:
      outside = np.flatnonzero(np.sqrt(np.square(c).sum(1)) > np.asarray(max_radius))
      radii["liftoff_step"] = int(outside[0]) if outside.size else None
    return cls(
        source, float(np.linalg.norm(c[0])), float(np.linalg.norm(c[-1])), path, crow,
        crow / path if path > 0 else None, float(cos.mean()) if cos.size else None,
        float(cos.std(ddof=1)) if cos.size > 1 else None, int(cos.size),
        crow / l1 if l1 > 0 else None, 1 / math.sqrt(c.shape[1]),
        int(moved[-1]) + 1 if moved.size else None, **radii)
