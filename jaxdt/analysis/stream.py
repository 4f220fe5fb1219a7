"""The streaming passes over a trajectory file, in blocks of steps.

`scan` is the one pass the analyses need: it reads W (and ΔW′ when stored;
otherwise computes it from W with `trajectory.np_lattice_displacement`, bit
for bit the lab's formula) in blocks of steps and keeps O(T + rows) state:
per-step counts and per-row last-exit steps (`Scan`). `accounting_from_state`
recomputes the Adam accounting metrics from recorded W, m, v in the same
blocks. Memory is one block plus what is kept, so files larger than memory
work.

Conventions as in `jaxdt.analysis.metrics`: W row t is the state after step t, ΔW′
row t-1 holds step t, and "never" is -1 in every per-row step array.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from jaxdt.analysis import trajectory
from jaxdt.numerics import lattice

BLOCK_BYTES = 64 << 20  # rows read per block: about this many bytes
MOTION_THRESHOLD = 0.1  # the Crucible 1 default when the file's metadata has none
HYPERNOVA = 1000.0  # ‖ΔW′‖₂ above this: Hypernova (docs/definitions.md §Lifecycle phases)


# --- The one streaming pass ---------------------------------------------------


class Scan(NamedTuple):
  """What one pass over a trajectory keeps: per-step counts and per-row last steps.

  Per step t = 1..T (index t-1): any_motion, n_frozen (‖ΔW′_i‖₂ < threshold),
  classes (instantaneous: Early ‖ΔW′‖₂ > √D; Midlife L∞ > 1; Late L∞ ≤ 1 and
  L1 > 0; Still L1 = 0), mean_l2 (over finite norms), global_frozen (W[t] ==
  W[t-1] bitwise for every row; None without W).
  Per row (-1 = never): last_motion (‖ΔW′‖₂ ≥ threshold), last_early, last_midlife,
  last_l1 (L1 > 0), last_hypernova (‖ΔW′‖₂ > 1000), last_spherical (L1 > 1).
  cold_to_hot / hot_to_cold: row-level changes of "frozen" between steps.
  Per W row 0..T (None without W/centroid): centroid (f64 [T+1, D]), radius
  (mean ‖w_i − c‖), radius_origin (mean ‖w_i‖), max_radius (max ‖w_i − c‖).
  """

  steps: int
  n: int
  hidden: int
  threshold: float
  any_motion: np.ndarray
  n_frozen: np.ndarray
  classes: np.ndarray
  mean_l2: np.ndarray
  global_frozen: Optional[np.ndarray]
  last_motion: np.ndarray
  last_early: np.ndarray
  last_midlife: np.ndarray
  last_l1: np.ndarray
  last_hypernova: np.ndarray
  last_spherical: np.ndarray
  cold_to_hot: int
  hot_to_cold: int
  centroid: Optional[np.ndarray]
  radius: Optional[np.ndarray]
  radius_origin: Optional[np.ndarray]
  max_radius: Optional[np.ndarray]
  centroid_source: str


def _last_step(last: np.ndarray, hit: np.ndarray, first_step: int) -> np.ndarray:
  """Per-row running max of the step numbers where `hit` [b, n] holds."""
  steps = np.arange(first_step, first_step + hit.shape[0], dtype=np.int64)[:, None]
  return np.maximum(last, np.where(hit, steps, -1).max(axis=0, initial=-1))


def default_block_steps(n: int, hidden: int) -> int:
  """Steps per block so that a block's working arrays take about BLOCK_BYTES."""
  return max(1, BLOCK_BYTES // max(1, trajectory.BLOCK_ELEMENT_BYTES * n * hidden))


def block_for(traj: trajectory.Trajectory, T: int, block_steps: Optional[int]) -> int:
  """Steps per block, after checking the pass's kept state against the memory budget: the
  per-step arrays of T entries are allocated only after this (never from a header's word
  alone), and a block is never larger than the budget allows."""
  traj.check_memory(T)
  most = traj.reader.budget // max(1, trajectory.BLOCK_ELEMENT_BYTES * traj.n_rows
                                   * max(traj.hidden, 1))
  return max(1, min(block_steps or default_block_steps(traj.n_rows, traj.hidden), most))


class _Motion:
  """The per-step counts and per-row last steps of `scan`, filled block by block."""

  KEYS = ("motion", "early", "midlife", "l1", "hypernova", "spherical")

  def __init__(self, T: int, n: int, D: int, threshold: float):
    self.threshold, self.sqrt_d = threshold, math.sqrt(D)
    self.any_motion, self.n_frozen = np.zeros(T, bool), np.zeros(T, np.int64)
    self.classes, self.mean_l2 = np.zeros((T, 4), np.int64), np.zeros(T)
    self.last = {k: np.full(n, -1, np.int64) for k in self.KEYS}
    self.cold_to_hot = self.hot_to_cold = 0
    self.prev_frozen = None

  def add(self, d: np.ndarray, s: int, e: int) -> None:
    """ΔW′ of steps s+1..e, [e - s, n, D]."""
    with np.errstate(over="ignore", invalid="ignore"):
      a = np.abs(d)
      l1 = a.sum(axis=-1, dtype=np.float64)  # (b, n)
      linf = a.max(axis=-1, initial=0)
      l2 = np.sqrt(np.square(d, dtype=np.float64).sum(axis=-1))
    moving = l2 >= self.threshold
    frozen = ~moving
    self.any_motion[s:e] = moving.any(axis=1)
    self.n_frozen[s:e] = frozen.sum(axis=1)
    early, mid, warm = l2 > self.sqrt_d, linf > 1, l1 > 0
    self.classes[s:e] = np.stack([early.sum(1), (mid & ~early).sum(1), (warm & ~mid).sum(1),
                                  (l1 == 0).sum(1)], axis=1)
    finite = np.isfinite(l2)
    self.mean_l2[s:e] = np.where(finite, l2, 0).sum(1) / np.maximum(finite.sum(1), 1)
    for key, hit in zip(self.KEYS, (moving, early, mid, warm, l2 > HYPERNOVA, l1 > 1)):
      self.last[key] = _last_step(self.last[key], hit, s + 1)
    chain = frozen if self.prev_frozen is None else np.concatenate([self.prev_frozen[None],
                                                                    frozen])
    self.cold_to_hot += int((chain[:-1] & ~chain[1:]).sum())
    self.hot_to_cold += int((~chain[:-1] & chain[1:]).sum())
    self.prev_frozen = frozen[-1]


class _Cloud:
  """Global freeze, centroid and radii per W row, filled block by block."""

  def __init__(self, traj: trajectory.Trajectory, T: int, has_w: bool, stored_c: bool):
    self.traj, self.T, self.stored_c = traj, T, stored_c
    self.global_frozen = np.zeros(T, bool) if has_w else None
    self.centroid = np.zeros((T + 1, traj.hidden)) if has_w or stored_c else None
    self.radii = [np.full(T + 1, np.nan) for _ in range(3)] if has_w else [None] * 3

  def add(self, w: np.ndarray, s: int, e: int) -> None:
    """W rows s..e, [e - s + 1, n, D]."""
    bits = lattice.np_bits(w)
    self.global_frozen[s:e] = (bits[1:] == bits[:-1]).all(axis=(1, 2))
    k = e + 1 - s if e == self.T else e - s  # W rows s..e-1, and row T in the last block
    x = self.traj.values(w[:k]).astype(np.float64)  # (k, n, D)
    c = (self.traj.reader.rows("centroid", s, s + k).astype(np.float64) if self.stored_c
         else x.mean(axis=1))
    self.centroid[s:s + k] = c
    r = np.sqrt(np.square(x - c[:, None]).sum(-1))  # (k, n)
    self.radii[0][s:s + k] = r.mean(1)
    self.radii[1][s:s + k] = np.sqrt(np.square(x).sum(-1)).mean(1)
    self.radii[2][s:s + k] = r.max(1, initial=0)


def scan(traj: trajectory.Trajectory, threshold: float = MOTION_THRESHOLD,
         block_steps: Optional[int] = None, max_steps: Optional[int] = None) -> Scan:
  """One pass over steps 1..T in blocks; memory is one block plus O(T + rows).

  Args:
    traj: an opened trajectory with W or delta_W_prime.
    threshold: the motion threshold on ‖ΔW′_i‖₂.
    block_steps: steps per block (default: about BLOCK_BYTES of work per block).
    max_steps: analyse only steps 1..max_steps.

  Returns:
    Scan.
  """
  T = traj.steps if max_steps is None else min(traj.steps, max_steps)
  n, D = traj.n_rows, traj.hidden
  block = block_for(traj, T, block_steps)
  has_w = traj.w_key is not None
  stored_c = traj.has("centroid") and traj.rows is None
  motion, cloud = _Motion(T, n, D, threshold), _Cloud(traj, T, has_w, stored_c)
  for s in range(0, T, block):
    e = min(T, s + block)
    w = traj.w_rows(s, e + 1) if has_w else None  # (b+1, n, D)
    motion.add(traj.dwp_rows(s, e) if w is None or traj.has("delta_W_prime") else traj.cells(w),
               s, e)
    if has_w:
      cloud.add(w, s, e)
  centroid = cloud.centroid
  if stored_c and not has_w:
    centroid = traj.reader.rows("centroid", 0, T + 1).astype(np.float64)
  if centroid is not None and T == 0 and has_w:  # no steps: only row 0
    centroid[0] = traj.values(traj.w_rows(0, 1)).astype(np.float64).mean(axis=1)[0]
  source = (("stored 'centroid'" if stored_c else "mean of W rows (f64)")
            if centroid is not None else "none")
  last = motion.last
  return Scan(T, n, D, float(threshold), motion.any_motion, motion.n_frozen, motion.classes,
              motion.mean_l2, cloud.global_frozen, last["motion"], last["early"],
              last["midlife"], last["l1"], last["hypernova"], last["spherical"],
              motion.cold_to_hot, motion.hot_to_cold, centroid, *cloud.radii, source)


# --- Accounting recomputed from recorded W, m, v (Thimble 1/3/8 layouts) -------


def _state_rows(traj: trajectory.Trajectory, key: str, start: int, stop: int):
  """m or v rows as W's dtype (f32 copies of bf16 state round-trip exactly)."""
  import ml_dtypes
  a = traj.select(trajectory.read_state(traj.reader, key, start, stop))
  if traj.w_format == "f32":
    return a.astype(np.float32)
  return a.astype(ml_dtypes.bfloat16)


def accounting_from_state(traj: trajectory.Trajectory, hyper, block_steps: Optional[int] = None,
                          max_steps: Optional[int] = None) -> dict:
  """Per-step accounting metrics recomputed from W[t-1], W[t], m_t, v_t.

  Runs `jaxdt.optim.accounting.metrics` (the same function the trainer's in-scan
  probe runs) over blocks of steps, so a Thimble 8 file (W, m, v) gets the
  same numbers as our adam_* keys.

  Args:
    traj: a trajectory with W and m, v of T+1 rows (row t: after step t).
    hyper: `config_lib.OptimConfig` of the run.
    block_steps, max_steps: as in `scan`.

  Returns:
    dict metric name -> f32 [T] (accounting.METRIC_NAMES).
  """
  import jax
  import ml_dtypes

  from jaxdt.optim import accounting  # pylint: disable=g-import-not-at-top
  m_key, v_key = trajectory.state_keys(traj.reader.keys())
  T = traj.steps if max_steps is None else min(traj.steps, max_steps)
  block = block_for(traj, T, block_steps)
  from jaxdt.optim import adamw  # pylint: disable=g-import-not-at-top
  rule = adamw.rule(hyper)
  fn = jax.jit(jax.vmap(lambda wp, wn, m, v, t: accounting.metrics(wp, wn, m, v, t, rule)))
  out = {k: np.zeros(T, np.float32) for k in accounting.METRIC_NAMES}
  for s in range(0, T, block):
    e = min(T, s + block)
    w = traj.w_rows(s, e + 1)
    w = w.view(ml_dtypes.bfloat16) if traj.w_format == "bf16" else w
    m = _state_rows(traj, m_key, s + 1, e + 1)
    v = _state_rows(traj, v_key, s + 1, e + 1)
    got = fn(w[:-1], w[1:], m, v, np.arange(s + 1, e + 1, dtype=np.int32))
    for k in out:
      out[k][s:e] = np.asarray(got[k])
  return out
