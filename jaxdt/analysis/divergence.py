"""How fast two runs from one start part: per step, bitwise-equal W and relative distance.

For two trajectories of the same rows (a jaxdt run and its torch twin, or a
torch run at 1 and at 2 threads), step t gives
  equal_fraction[t]    = the fraction of recorded W elements with equal bits,
  relative_distance[t] = ‖W_a[t] − W_b[t]‖ / ‖W_a[t] − W_a[0]‖ (Frobenius norms
                         in f64 over the recorded rows: how far apart the two
                         runs are, against how far run A has travelled).
Both are streamed in blocks of steps (`stream.BLOCK_BYTES`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxdt.analysis import freeze
from jaxdt.analysis import stream
from jaxdt.analysis import trajectory
from jaxdt.numerics import lattice


@dataclasses.dataclass(frozen=True)
class Divergence:
  """Per-step divergence of two runs over steps 0..T (index t = step t)."""

  steps: int
  first_differing_step: Optional[int]  # None: W bitwise equal throughout
  equal_fraction: np.ndarray  # f64 [T + 1]
  relative_distance: np.ndarray  # f64 [T + 1]; NaN at step 0 (A has not moved)

  def at(self, t: int) -> dict:
    return {"step": t, "equal_fraction": float(self.equal_fraction[t]),
            "relative_distance": float(self.relative_distance[t])}

  def samples(self) -> list:
    """The values at the summary's sample steps (`freeze.sample_steps`)."""
    return [self.at(t) for t in freeze.sample_steps(self.steps)]

  def to_json(self) -> dict:
    return {"steps": self.steps, "first_differing_step": self.first_differing_step,
            "samples": self.samples(), "equal_fraction": self.equal_fraction.tolist(),
            "relative_distance": [None if not np.isfinite(x) else float(x)
                                  for x in self.relative_distance]}


def _check_same_rows(ta: trajectory.Trajectory, tb: trajectory.Trajectory) -> None:
  if ta.w_key is None or tb.w_key is None:
    raise trajectory.AnalysisError("divergence needs W in both runs")
  sa, sb = ta.reader.shape(ta.w_key)[1:], tb.reader.shape(tb.w_key)[1:]
  if sa != sb or ta.w_format != tb.w_format:
    raise trajectory.AnalysisError(f"the runs record different W ({ta.w_format} {list(sa)} vs "
                                   f"{tb.w_format} {list(sb)}); compare runs of one config")
  ra, rb = (t.reader.read("dead_indices") if t.has("dead_indices") else None for t in (ta, tb))
  if ra is not None and rb is not None and not np.array_equal(ra, rb):
    raise trajectory.AnalysisError("the runs record other dead rows; compare runs made from "
                                   "the same data")


def _as_f64(t: trajectory.Trajectory, key: str, rows: np.ndarray) -> np.ndarray:
  if key == t.w_key:
    return t.values(rows).astype(np.float64)
  code = t.reader.raw_dtype(key)
  return trajectory.np_as_float64(rows, code)


def _diverge(ta, tb, key_a: str, key_b: str, T: int, block: int, from_start: bool) -> Divergence:
  """Divergence of tensor key_b of B from key_a of A over steps 0..T: bitwise-equal fraction,
  and ‖A − B‖ over ‖A − A[0]‖ (from_start: how far A travelled) or over ‖A‖."""
  equal, rel = np.zeros(T + 1), np.full(T + 1, np.nan)
  a0 = _as_f64(ta, key_a, ta.reader.rows(key_a, 0, 1))[0] if from_start else 0.0
  first = None
  for s in range(0, T + 1, block):
    e = min(T + 1, s + block)
    ra, rb = ta.reader.rows(key_a, s, e), tb.reader.rows(key_b, s, e)
    same = lattice.np_bits(ra) == lattice.np_bits(rb)
    equal[s:e] = same.reshape(e - s, -1).mean(axis=1)
    if first is None and not same.all():
      first = s + int(np.argmax(~same.reshape(e - s, -1).all(axis=1)))
    va, vb = _as_f64(ta, key_a, ra), _as_f64(tb, key_b, rb)
    apart = np.sqrt(np.square(va - vb).sum(axis=(1, 2)))
    scale = np.sqrt(np.square(va - a0).sum(axis=(1, 2)))
    with np.errstate(divide="ignore", invalid="ignore"):
      rel[s:e] = np.where(scale > 0, apart / scale, np.nan)
  return Divergence(T, first, equal, rel)


def divergence(path_a: str, path_b: str, *, block_steps: Optional[int] = None) -> Divergence:
  """Per-step divergence of run B's W from run A's over the steps both have (streamed).

  Raises:
    AnalysisError: unfinished or corrupt runs, no W, or other rows.
  """
  return state_divergence(path_a, path_b, ("weights",), block_steps=block_steps)["weights"]


def state_divergence(path_a: str, path_b: str, roles=("weights", "momentum", "variance"), *,
                     block_steps: Optional[int] = None) -> dict:
  """{role: Divergence} of B from A for each recorded role: W against A's travel from step 0,
  the gradient and the Adam moments m and v (zero before step 1) against A's own norm.

  Raises:
    AnalysisError: unfinished or corrupt runs, no W, other rows, a role one run lacks.
  """
  ta, tb = trajectory.open_trajectory(path_a), trajectory.open_trajectory(path_b)
  try:
    _check_same_rows(ta, tb)
    T = min(ta.steps, tb.steps)
    tb.check_memory(T)
    block = stream.block_for(ta, T, block_steps)
    out = {}
    for role in roles:
      ka, kb = (t.w_key if role == "weights" else trajectory.role_key(t.reader.keys(), role)
                for t in (ta, tb))
      if ka is None or kb is None:
        raise trajectory.AnalysisError(f"divergence of {role}: {'A' if ka is None else 'B'} "
                                       f"records no {role}; record it in both runs")
      if ta.reader.shape(ka)[1:] != tb.reader.shape(kb)[1:]:
        raise trajectory.AnalysisError(f"the runs record {role} with other shapes; compare "
                                       "runs of one config")
      out[role] = _diverge(ta, tb, ka, kb, T, block, from_start=role == "weights")
    ta.verify()
    tb.verify()
  finally:
    ta.reader.close()
    tb.reader.close()
  return out
