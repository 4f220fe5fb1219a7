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


def divergence(path_a: str, path_b: str, *, block_steps: Optional[int] = None) -> Divergence:
  """Per-step divergence of run B from run A over the steps both have (streamed).

  Raises:
    AnalysisError: unfinished or corrupt runs, no W, or other rows.
  """
  ta, tb = trajectory.open_trajectory(path_a), trajectory.open_trajectory(path_b)
  try:
    _check_same_rows(ta, tb)
    T = min(ta.steps, tb.steps)
    tb.check_memory(T)
    block = stream.block_for(ta, T, block_steps)
    equal, rel = np.zeros(T + 1), np.full(T + 1, np.nan)
    w0 = ta.values(ta.reader.rows(ta.w_key, 0, 1)).astype(np.float64)[0]
    first = None
    for s in range(0, T + 1, block):
      e = min(T + 1, s + block)
      wa, wb = ta.reader.rows(ta.w_key, s, e), tb.reader.rows(tb.w_key, s, e)
      same = lattice.np_bits(wa) == lattice.np_bits(wb)
      equal[s:e] = same.reshape(e - s, -1).mean(axis=1)
      if first is None and not same.all():
        first = s + int(np.argmax(~same.reshape(e - s, -1).all(axis=1)))
      va, vb = ta.values(wa).astype(np.float64), tb.values(wb).astype(np.float64)
      apart = np.sqrt(np.square(va - vb).sum(axis=(1, 2)))
      travelled = np.sqrt(np.square(va - w0).sum(axis=(1, 2)))
      with np.errstate(divide="ignore", invalid="ignore"):
        rel[s:e] = np.where(travelled > 0, apart / travelled, np.nan)
    ta.verify()
    tb.verify()
  finally:
    ta.reader.close()
    tb.reader.close()
  return Divergence(T, first, equal, rel)
