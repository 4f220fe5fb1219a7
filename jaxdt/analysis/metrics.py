"""The lab's analyses of one trajectory: `measure(path) -> (Summary, series)`.

`measure` opens a file (`trajectory.open_trajectory`), runs the one streaming
pass (`stream.scan`) and builds every block the file supports, each a frozen
dataclass (`freeze`, `phases`, `checks`); what the file lacks is listed in
`Summary.skipped`. `jaxdt.report.text` prints a Summary and summary.json is
`Summary.to_json()`.

Conventions (docs/definitions.md): step t = 1..T; W row t is the state after
step t (row 0: before any step); ΔW′ row t-1 holds step t. Every step number
printed or saved is 1-based, so the lab's "0-based ΔW′ index" 559 is our step
560. Motion of row i at step t: ‖ΔW′_i‖₂ ≥ threshold (0.1, Crucible 1).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import NamedTuple, Optional

import numpy as np

from jaxdt.analysis import checks
from jaxdt.analysis import freeze
from jaxdt.analysis import phases
from jaxdt.analysis import stream
from jaxdt.analysis import trajectory
from jaxdt.io import hosts
from jaxdt.io import metadata as metadata_lib
from jaxdt.numerics import finite

AnalysisError = trajectory.AnalysisError  # callers catch analysis.AnalysisError
FREEZE_BLOCKS = ("Fimbulwinter check", "stillness runs", "global freeze", "frozen fraction",
                 "lifecycle phases", "centroid drift and cloud radius")


@dataclasses.dataclass(frozen=True)
class Skipped:
  analysis: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Summary:
  """Every analysis of one trajectory; a block is None when the file cannot support it."""

  file: str
  layout: str  # "jaxdt" | "lab"
  keys: tuple
  steps: int  # T analysed (before a divergence)
  rows_recorded: int
  rows: int  # rows analysed (the dead rows of an all-rows file)
  hidden: int
  w_format: Optional[str]  # "bf16" | "f32" | None
  delta_w_prime: Optional[str]  # "stored" | "computed from W" | None
  motion_threshold: float
  notes: tuple
  skipped: tuple  # of Skipped
  run: dict  # backend facts from metadata.json (`trajectory.run_info`)
  diverged_at_step: Optional[int]
  verified: bool = False  # every tensor matched its recorded SHA-256
  loss: Optional[checks.LossSummary] = None
  fimbulwinter_check: Optional[freeze.FimbulwinterCheck] = None
  stillness: Optional[freeze.Stillness] = None
  frozen_fraction: Optional[freeze.FrozenFraction] = None
  lifecycle: Optional[phases.Lifecycle] = None
  mean_l2_at: Optional[dict] = None
  global_freeze: Optional[freeze.GlobalFreeze] = None
  centroid: Optional[phases.CentroidDrift] = None
  accounting: Optional[checks.AccountingSummary] = None
  sanity_check: Optional[checks.SanityCheck] = None

  def to_json(self) -> dict:
    """summary.json's content: the dataclasses as dicts, strict-JSON values."""
    return metadata_lib.json_ready(dataclasses.asdict(self))


def divergence_step(traj: trajectory.Trajectory) -> Optional[int]:
  """The first step whose loss is non-finite (metadata's diverged_at_step, else the
  recorded loss of steps 1..T), or None."""
  recorded = traj.metadata.get("diverged_at_step")
  if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
    return recorded
  if traj.loss_key is None or traj.steps == 0:
    return None
  loss = traj.reader.rows(traj.loss_key, 1, traj.steps + 1)  # row 0 may be NaN by design
  return finite.first_nonfinite(loss, first_step=1)


def _header(traj, T, threshold, diverged) -> dict:
  keys = traj.reader.keys()
  notes = list(traj.notes)
  changed = hosts.stretches(traj.metadata, traj.steps)
  if changed:
    notes.append(f"the run changed host: {changed}")
  if diverged is not None:
    notes.append(f"the loss is non-finite from step {diverged}: every analysis covers steps "
                 f"0..{T} only")
  return dict(
      file=os.path.abspath(traj.path), layout=traj.layout, keys=tuple(keys), steps=T,
      rows_recorded=traj.reader.shape(traj.w_key)[1] if traj.w_key else traj.n_rows,
      rows=traj.n_rows, hidden=traj.hidden, w_format=traj.w_format,
      delta_w_prime=("stored" if "delta_W_prime" in keys else
                     "computed from W" if traj.w_key else None),
      motion_threshold=threshold, notes=tuple(notes), run=trajectory.run_info(traj.metadata),
      diverged_at_step=diverged)


class _Pass(NamedTuple):
  """What every block of one analysis reads: the file and the steps to cover."""

  traj: trajectory.Trajectory
  steps: int  # T analysed
  threshold: float
  block_steps: Optional[int]
  max_steps: Optional[int]


def _freeze_blocks(p: _Pass, out: dict, series: dict, notes: list) -> None:
  """The blocks of the one streaming pass (freeze, stillness, lifecycle, centroid)."""
  traj, T = p.traj, p.steps
  sc = stream.scan(traj, p.threshold, p.block_steps, p.max_steps)
  lms = sc.last_motion
  if "last_motion_step" in traj.reader.keys() and p.max_steps is None:
    stored = traj.stored_rows("last_motion_step").astype(np.int64)
    if stored.shape == lms.shape and not np.array_equal(stored, lms):
      notes.append(f"stored last_motion_step differs from the recount in "
                   f"{int((stored != lms).sum())} rows; the stored one is reported")
    lms = stored
  out.update(
      fimbulwinter_check=freeze.FimbulwinterCheck.of(lms, T) if T else None,
      stillness=freeze.Stillness.of(sc.any_motion),
      frozen_fraction=freeze.FrozenFraction.of(sc.n_frozen, sc.n, sc.cold_to_hot,
                                               sc.hot_to_cold),
      lifecycle=phases.Lifecycle.of(sc.last_early, sc.last_midlife, sc.last_l1, T,
                                    last_hypernova=sc.last_hypernova,
                                    last_spherical=sc.last_spherical),
      mean_l2_at={str(t): float(sc.mean_l2[t - 1]) for t in freeze.sample_steps(T)})
  series.update(frozen_fraction=sc.n_frozen / max(sc.n, 1), any_motion=sc.any_motion,
                populations=phases.phase_populations(sc.last_early, sc.last_midlife,
                                                     sc.last_l1, T),
                classes=sc.classes, last_motion=lms, mean_l2=sc.mean_l2)
  skipped = []
  if sc.global_frozen is not None:
    out["global_freeze"] = freeze.GlobalFreeze.of(sc.global_frozen)
    series["global_frozen"] = sc.global_frozen
  else:
    skipped.append(Skipped("global freeze", "no W (bitwise equality needs the stored bits)"))
  if sc.centroid is not None and T:
    out["centroid"] = phases.CentroidDrift.of(sc.centroid, sc.radius, sc.radius_origin,
                                              sc.max_radius, source=sc.centroid_source)
    series.update(centroid=sc.centroid, radius=sc.radius)
    if sc.radius is None:
      skipped.append(Skipped("cloud radius", "no W (only the stored centroid)"))
  else:
    skipped.append(Skipped("centroid drift and cloud radius", "no W or centroid" if T
                           else "no steps"))
  out["skipped"] = out.get("skipped", ()) + tuple(skipped)


def _compact_blocks(p: _Pass, out: dict, series: dict) -> None:
  """The freeze blocks a compact record supports (`--probes=freeze`): the counts and the
  tracker the trainer made in its scan give the same figures as a full trajectory's pass."""
  traj, T = p.traj, p.steps
  n = traj.n_rows
  frozen = traj.reader.rows("n_frozen", 0, T).astype(np.int64)
  moving = traj.reader.rows("n_moving", 0, T).astype(np.int64)
  bad = np.flatnonzero((frozen + moving != n) | (frozen < 0) | (moving < 0))
  if bad.size:
    raise AnalysisError(f"{traj.path}: n_frozen + n_moving is not the {n} recorded rows at "
                        f"step {int(bad[0]) + 1}; the file is not a jaxdt freeze record")
  lms = traj.reader.read("last_motion_step").astype(np.int64).reshape(-1)
  any_motion = moving > 0
  out.update(
      fimbulwinter_check=freeze.FimbulwinterCheck.of(lms, T) if T else None,
      stillness=freeze.Stillness.of(any_motion),
      frozen_fraction=freeze.FrozenFraction.of(frozen, n, None, None))
  series.update(frozen_fraction=frozen / max(n, 1), any_motion=any_motion, last_motion=lms)
  if traj.has("dwp_l2_mean"):
    mean_l2 = traj.reader.rows("dwp_l2_mean", 0, T).astype(np.float64)
    out["mean_l2_at"] = {str(t): float(mean_l2[t - 1]) for t in freeze.sample_steps(T)}
    series["mean_l2"] = mean_l2
  if traj.has("centroid_norm"):
    series["centroid_norm"] = traj.reader.rows("centroid_norm", 0, T + 1).astype(np.float64)
  why = "compact freeze record (counts only; record W for this block)"
  out["skipped"] = out.get("skipped", ()) + tuple(
      Skipped(name, why) for name in ("global freeze", "lifecycle phases",
                                      "centroid drift and cloud radius", "re-heating"))


def _accounting(p: _Pass, out: dict, series: dict) -> None:
  """The Adam accounting: the in-scan adam_* keys, or recomputed from W, m, v."""
  traj, T = p.traj, p.steps
  keys = traj.reader.keys()
  names = trajectory.accounting_keys()
  if all(k in keys for k in names):
    arrays = [traj.reader.rows(k, 0, T).astype(np.float64) for k in names]
    source = "adam_* keys"
  else:
    has_state = bool(traj.w_key) and all(trajectory.state_keys(keys))
    hyper = traj.hyper() if has_state else None
    if not (has_state and hyper is not None and T):
      why = ("m and v present but the hyperparameters are unknown (no metadata.json with "
             "learning_rate, beta1, beta2, epsilon, weight_decay)" if has_state else
             "no adam_* keys, and no W + m + v to recompute them")
      out["skipped"] = out.get("skipped", ()) + (Skipped("Adam accounting", why),)
      return
    got = stream.accounting_from_state(traj, hyper, p.block_steps, p.max_steps)
    arrays = [got[k[len("adam_"):]] for k in names]
    source = "recomputed from W, m, v (jaxdt.optim.accounting.metrics)"
  out["accounting"] = checks.AccountingSummary.of(*arrays, source=source)
  series["accounting"] = dict(zip(names, arrays))


def _analyze(path, block_steps, max_steps, threshold) -> tuple:
  traj = trajectory.open_trajectory(path)
  diverged = divergence_step(traj)
  if diverged is not None:  # analyse the steps before it: the lab's measures need finite W
    max_steps = diverged - 1 if max_steps is None else min(max_steps, diverged - 1)
  T = traj.steps if max_steps is None else min(traj.steps, max_steps)
  if threshold is None:
    threshold = float(traj.metadata.get("motion_threshold") or stream.MOTION_THRESHOLD)
  out, series = _header(traj, T, threshold, diverged), {}
  notes, keys = list(out["notes"]), traj.reader.keys()
  if traj.loss_key:
    series["loss"] = traj.reader.rows(traj.loss_key, 0, T + 1).astype(np.float64)
    out["loss"] = checks.LossSummary.of(series["loss"])
  else:
    out["skipped"] = (Skipped("loss", "no loss or losses key"),)
  p = _Pass(traj, T, threshold, block_steps, max_steps)
  if traj.w_key or "delta_W_prime" in keys:
    _freeze_blocks(p, out, series, notes)
  elif trajectory.is_compact(keys) and "last_motion_step" in keys:
    _compact_blocks(p, out, series)
  else:
    out["skipped"] = out.get("skipped", ()) + tuple(
        Skipped(name, "no W or delta_W_prime") for name in FREEZE_BLOCKS)
  _accounting(p, out, series)
  if traj.w_key and all(trajectory.state_keys(keys)) and max_steps is None:
    out["sanity_check"] = checks.SanityCheck.of(traj)
  out.update(notes=tuple(notes), skipped=out.get("skipped", ()))
  out["verified"] = traj.verify()  # raises before anything is printed or written
  traj.reader.close()
  return Summary(**out), series


def measure(path: str, *, block_steps: Optional[int] = None, max_steps: Optional[int] = None,
            threshold: Optional[float] = None) -> tuple[Summary, dict]:
  """Every analysis the file supports, streamed; what it lacks is listed as skipped.

  numpy's warnings about non-finite values are silenced: a diverged or corrupt
  file is reported, not warned about line by line.

  Args:
    path: a .safetensors trajectory (ours or the lab's layout) or a run folder.
    block_steps: steps per block (default: about stream.BLOCK_BYTES of work per block).
    max_steps: analyse only steps 1..max_steps.
    threshold: motion threshold (default: metadata's motion_threshold, else 0.1).

  Returns:
    (Summary, series): series holds per-step arrays for the plots (loss,
    frozen_fraction, global_frozen, populations, classes, centroid, radius,
    last_motion, accounting).

  Raises:
    AnalysisError: PATH is not an analysable, finished, intact trajectory.
  """
  with np.errstate(all="ignore"), warnings.catch_warnings(), trajectory.malformed(path):
    warnings.simplefilter("ignore", RuntimeWarning)
    return _analyze(path, block_steps, max_steps, threshold)
