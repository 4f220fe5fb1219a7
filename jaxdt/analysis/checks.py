"""The training's own checks as typed results: loss, Adam accounting, Thimble 8's sanity check."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxdt.analysis import freeze
from jaxdt.analysis import trajectory

ACCOUNTING_SAMPLE_STEPS = (1, 10, 50, 100, 200, 500, 800)  # Thimble 1's validation steps


def _finite(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x[np.isfinite(x)]


@dataclasses.dataclass(frozen=True)
class LossSummary:
  """Loss at steps 1..T (row 0, before any step, is NaN or 0.0 in the lab's files)."""

  first: Optional[float]
  final: Optional[float]
  min: Optional[float]
  min_step: Optional[int]
  at: dict  # {str(step): loss}
  nonfinite_steps: int

  @classmethod
  def of(cls, loss: np.ndarray) -> "LossSummary":
    x = np.asarray(loss, np.float64)[1:]
    T = x.size
    ok = np.flatnonzero(np.isfinite(x))
    return cls(float(x[0]) if T else None, float(x[-1]) if T else None,
               float(x[ok].min()) if ok.size else None,
               int(ok[np.argmin(x[ok])]) + 1 if ok.size else None,
               {str(t): float(x[t - 1]) for t in freeze.sample_steps(T)}, int(T - ok.size))


@dataclasses.dataclass(frozen=True)
class AccountingSample:
  t: int
  ratio: float
  cosine: float


@dataclasses.dataclass(frozen=True)
class AccountingSummary:
  """The Adam accounting (docs/definitions.md §Adam accounting) from per-step [T] metrics.

  Counts use all T steps as the denominator, as the lab's "476/1000 steps with
  ratio in [0.99, 1.01]"; means skip non-finite steps (nothing moved: ratio
  inf, cosine NaN).
  """

  source: str
  steps: int
  replay_match_mean: Optional[float]
  replay_match_min: Optional[float]
  replay_exact_steps: int
  cosine_mean: Optional[float]
  cosine_above_0_99: int
  ratio_mean: Optional[float]
  ratio_within_1pct: int
  swallowed_mean: Optional[float]
  max_ulp_error: Optional[float]
  samples: tuple
  lab_validation: Optional[str] = None  # Thimble 1's own validation cell, when printed

  @classmethod
  def of(cls, replay_match, cosine, norm_ratio, swallowed, max_ulp_error, *,
         source: str) -> "AccountingSummary":
    r, c, q = (np.asarray(x, np.float64) for x in (replay_match, cosine, norm_ratio))
    T = r.size
    mean = lambda x: float(_finite(x).mean()) if _finite(x).size else None
    err = _finite(max_ulp_error)
    return cls(
        source, T, mean(r), float(r.min()) if T else None, int((r == 1).sum()), mean(c),
        int((c > 0.99).sum()), mean(q), int(((q >= 0.99) & (q <= 1.01)).sum()), mean(swallowed),
        float(err.max()) if err.size else None,
        tuple(AccountingSample(t, float(q[t - 1]), float(c[t - 1]))
              for t in ACCOUNTING_SAMPLE_STEPS if t <= T))


@dataclasses.dataclass(frozen=True)
class SanityCheck:
  """Thimble 8's SANITY CHECK (the lab's Thimble 8 notebook, cell 14) for files with W, m, v.

  `mean_abs_dw` subtracts in bf16 first, as the lab's
  `(W_bf16[-1] - W_bf16[0]).float().abs().mean()` does.
  """

  steps: int
  mean_abs_dw: float
  mean_abs_m: float
  mean_abs_v: float
  loss_1: Optional[float]
  loss_T: Optional[float]
  m0_zero: bool
  v0_zero: bool

  @classmethod
  def of(cls, traj: trajectory.Trajectory) -> "SanityCheck":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    m_key, v_key = trajectory.state_keys(traj.reader.keys())
    T = traj.steps
    w0, wt = (traj.values(traj.w_rows(t, t + 1))[0] for t in (0, T))
    dw = wt - w0
    if traj.w_format == "bf16":
      dw = dw.astype(ml_dtypes.bfloat16).astype(np.float32)

    def state(key, t):
      return traj.select(trajectory.read_state(traj.reader, key, t, t + 1))[0].astype(np.float32)

    loss = traj.reader.read(traj.loss_key).astype(np.float64) if traj.loss_key else None
    return cls(T, float(np.abs(dw).mean()), float(np.abs(state(m_key, T)).mean()),
               float(np.abs(state(v_key, T)).mean()),
               float(loss[1]) if loss is not None and T else None,
               float(loss[T]) if loss is not None else None,
               bool((state(m_key, 0) == 0).all()), bool((state(v_key, 0) == 0).all()))
