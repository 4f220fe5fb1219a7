"""The lab's analyses (docs/definitions.md): pure functions of arrays, and `analyze(path)`.

Each analysis is a pure function of the arrays that `stream.scan` (the one
streaming pass over a trajectory file) keeps. `analyze(path)` opens a file
(`trajectory.open_trajectory`), runs the pass and every analysis the file
supports, and lists what it lacks as skipped. The seed's two printed blocks
(FIMBULWINTER CHECK, STILLNESS PERIOD ANALYSIS) are formatted here, first;
`jaxdt.report.text` formats the rest.

Conventions (docs/definitions.md):
  step t = 1..T; W row t is the state after step t (row 0: before any step);
  ΔW′ row t-1 holds step t. Every step number printed or saved is 1-based,
  so the lab's "0-based ΔW′ index" 559 is our step 560.
  Motion of row i at step t: ‖ΔW′_i‖₂ ≥ threshold (0.1, Crucible 1).
  "Never" is -1 in every per-row step array (as in `last_motion_step`).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import numpy as np

from jaxdt.analysis import stream
from jaxdt.analysis import trajectory
from jaxdt.io import rundir

MILESTONES = (50, 90, 99, 100)  # per-step frozen-fraction milestones, percent
ACCOUNTING_SAMPLE_STEPS = (1, 10, 50, 100, 200, 500, 800)  # Thimble 1's validation steps
SAMPLE_STEPS = (1, 10, 100, 500, 1000, 2000, 5000, 10000)

AnalysisError = trajectory.AnalysisError  # callers catch analysis.AnalysisError


# --- The seed's two printed blocks ---------------------------------------------


def torch_median(x: np.ndarray) -> float:
  """torch.median: the lower of the two middle values for an even count."""
  s = np.sort(np.asarray(x).ravel())
  return float(s[(s.size - 1) // 2])


def fimbulwinter_check(last_motion_step: np.ndarray, total_steps: int) -> dict:
  """Crucible 1's FIMBULWINTER CHECK numbers (docs/definitions.md §Motion threshold and last motion)."""
  lms = np.asarray(last_motion_step)
  global_last = int(lms.max())
  return {
      "global_last_motion": global_last,
      "fimbulwinter_duration": int(total_steps - global_last),
      "fimbulwinter_fraction": (total_steps - global_last) / total_steps,
      "earliest_freeze": int(lms.min()),
      "median_freeze": torch_median(lms.astype(np.float32)),
      "latest_freeze": global_last,
      "never_moved": int((lms == -1).sum()),
      "n_rows": int(lms.size),
  }


def format_fimbulwinter_check(r: dict) -> str:
  """The seed's printed FIMBULWINTER CHECK block."""
  lines = ["=" * 60, "FIMBULWINTER CHECK", "=" * 60,
           f"Last motion (any token): step {r['global_last_motion']}",
           f"Fimbulwinter duration: {r['fimbulwinter_duration']} steps",
           f"Fimbulwinter fraction: {r['fimbulwinter_fraction']:.1%}",
           "", "Freeze time distribution:",
           f"  Earliest freeze: step {r['earliest_freeze']}",
           f"  Median freeze: step {r['median_freeze']:.0f}",
           f"  Latest freeze: step {r['latest_freeze']}"]
  if r["never_moved"] > 0:
    lines += ["", f"⚠️  {r['never_moved']} tokens never moved (unexpected!)"]
  else:
    lines += ["", f"✓ All {r['n_rows']} tokens moved at least once"]
  return "\n".join(lines)


def stillness_runs(any_motion: np.ndarray) -> list:
  """Lengths of the maximal runs of steps with no motion, longest first (the seed's loop)."""
  return sorted((n for _, n in runs_of(~np.asarray(any_motion, bool))), reverse=True)


def format_stillness(runs: list) -> str:
  """The seed's printed STILLNESS PERIOD ANALYSIS block."""
  lines = ["=" * 60, "STILLNESS PERIOD ANALYSIS", "=" * 60,
           f"Total stillness periods: {len(runs)}", "", "Longest 10:"]
  lines += [f"  {i + 1}. {r} steps" for i, r in enumerate(runs[:10])]
  if len(runs) >= 2:
    lines += ["", f"Final vs second-longest: {runs[0]} / {runs[1]} = {runs[0] / runs[1]:.1f}x"]
  if runs:
    lines += ["", f"Mean stillness: {sum(runs) / len(runs):.1f} steps",
              f"Median stillness: {sorted(runs)[len(runs) // 2]} steps"]
  else:
    lines += ["", "No stillness: some token moved at every step."]
  return "\n".join(lines)


# --- Analyses: pure functions of arrays ---------------------------------------


def sample_steps(total: int) -> list:
  """The steps a summary quotes values at: SAMPLE_STEPS below T, then T."""
  return [t for t in SAMPLE_STEPS if t < total] + ([total] if total else [])


def runs_of(mask: np.ndarray) -> list:
  """Maximal runs of True as (first index, length), in order."""
  m = np.concatenate([[0], np.asarray(mask, bool).astype(np.int8), [0]])
  edges = np.diff(m)
  starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
  return [(int(a), int(b - a)) for a, b in zip(starts, ends)]


def stillness_summary(any_motion: np.ndarray) -> dict:
  """STILLNESS PERIOD ANALYSIS numbers with the seed's own formulas.

  mean = sum/len; median = sorted(runs)[len // 2] (the upper middle value).
  """
  runs = stillness_runs(any_motion)
  return {
      "count": len(runs), "runs": runs, "longest_10": runs[:10],
      "mean": sum(runs) / len(runs) if runs else None,
      "median": sorted(runs)[len(runs) // 2] if runs else None,
      "final_vs_second": runs[0] / runs[1] if len(runs) >= 2 else None,
  }


def window_steps(total: int) -> int:
  """Window length for "frozen fraction by window": 1000 steps from 2000 on, else a fifth."""
  return 1000 if total >= 2000 else max(1, -(-total // 5))


def global_freeze(frozen: np.ndarray, window: Optional[int] = None) -> dict:
  """Global freeze fraction and freeze/thaw cycles (the lab's `1.29c`, docs/definitions.md §Global freeze).

  Args:
    frozen: bool [T]; frozen[t-1] says W[t] == W[t-1] bitwise for every row.
    window: steps per window for the windowed fractions (default `window_steps`).

  Returns:
    dict: frozen_steps, total_steps, fraction, cycles (maximal frozen runs),
    longest {start, end, length} (steps, inclusive; the earliest of equal
    lengths), mean_run, median_run (np.median), first_frozen_step,
    final_run_to_end, windows [{start, end, fraction}].
  """
  frozen = np.asarray(frozen, bool)
  T = frozen.size
  runs = runs_of(frozen)
  lengths = [n for _, n in runs]
  best = max(runs, key=lambda r: r[1]) if runs else None  # max() keeps the first of ties
  window = window or window_steps(T)
  return {
      "frozen_steps": int(frozen.sum()), "total_steps": T,
      "fraction": float(frozen.mean()) if T else None, "cycles": len(runs),
      "longest": None if best is None else {"start": best[0] + 1, "end": best[0] + best[1],
                                            "length": best[1]},
      "mean_run": float(np.mean(lengths)) if runs else None,
      "median_run": float(np.median(lengths)) if runs else None,
      "first_frozen_step": runs[0][0] + 1 if runs else None,
      "final_run_to_end": bool(runs) and runs[-1][0] + runs[-1][1] == T,
      "windows": [{"start": a + 1, "end": min(T, a + window),
                   "fraction": float(frozen[a:a + window].mean())} for a in range(0, T, window)],
  }


def first_step_reaching(count: np.ndarray, n: int, percent: float) -> Optional[int]:
  """First step t (1-based) with count[t-1] / n ≥ percent/100, exactly; None if never."""
  hit = np.flatnonzero(np.asarray(count, np.int64) * 100 >= percent * n)
  return int(hit[0]) + 1 if hit.size else None


def frozen_fraction(n_frozen: np.ndarray, n: int, cold_to_hot: int = 0,
                    hot_to_cold: int = 0) -> dict:
  """Per-step frozen fraction (‖ΔW′_i‖₂ < threshold) and its milestones (docs/definitions.md §Frozen-fraction milestones).

  Returns:
    dict: milestones {"50%": step or None, ...}, first_frozen_token_step,
    moving_at {step: rows still moving}, final_fraction, reheat {cold_to_hot,
    hot_to_cold, transitions (= n·(T−1)), and their fractions}.
  """
  n_frozen = np.asarray(n_frozen, np.int64)
  T = n_frozen.size
  first = np.flatnonzero(n_frozen > 0)
  samples = sample_steps(T)
  transitions = n * max(T - 1, 0)
  return {
      "milestones": {f"{p}%": first_step_reaching(n_frozen, n, p) for p in MILESTONES},
      "first_frozen_token_step": int(first[0]) + 1 if first.size else None,
      "moving_at": {str(t): int(n - n_frozen[t - 1]) for t in samples},
      "final_fraction": float(n_frozen[-1] / n) if T and n else None,
      "reheat": {"cold_to_hot": int(cold_to_hot), "hot_to_cold": int(hot_to_cold),
                 "transitions": transitions,
                 "cold_to_hot_fraction": cold_to_hot / transitions if transitions else None,
                 "hot_to_cold_fraction": hot_to_cold / transitions if transitions else None},
  }


def _stats(x: np.ndarray) -> Optional[dict]:
  """mean, median (torch.median: lower middle), min, max, count; None when empty."""
  x = np.asarray(x)
  if not x.size:
    return None
  return {"mean": float(x.mean()), "median": torch_median(x), "min": int(x.min()),
          "max": int(x.max()), "count": int(x.size)}


def nested_boundaries(last_early, last_midlife, last_l1) -> tuple:
  """The three last-exit steps as nested per-row boundaries (0 = never).

  ‖ΔW′‖₂ > √D implies L∞ > 1 (‖x‖₂ ≤ √D·‖x‖∞), which implies L1 > 0, so the
  raw last steps already nest; the maxima only guard non-finite rows.
  """
  le = np.maximum(np.asarray(last_early), 0)
  lm = np.maximum(np.asarray(last_midlife), le)
  ll = np.maximum(np.asarray(last_l1), lm)
  return le, lm, ll


def lifecycle(last_early, last_midlife, last_l1, total_steps: int, *, last_hypernova=None,
              last_spherical=None) -> dict:
  """Lifecycle phases by the last-exit rule (docs/definitions.md §Lifecycle phases).

  A row is Early up to the last step with ‖ΔW′‖₂ > √D, Midlife up to the last
  step with L∞ > 1, Late up to the last step with L1 > 0, and in Fimbulwinter
  (L1 = 0 sustained) from the step after that to the end.

  Args:
    last_early, last_midlife, last_l1: per-row last steps (-1 = never).
    total_steps: T.
    last_hypernova, last_spherical: optional per-row last ‖ΔW′‖₂ > 1000 and
      last L1 > 1 steps (docs/definitions.md §Lifecycle phases, second vocabulary).

  Returns:
    dict: boundaries {last_early, last_midlife, last_motion, fimbulwinter_onset:
    stats over rows that ever met the criterion, + never}, durations {early,
    midlife, late, fimbulwinter: stats over all rows}, and when given
    last_hypernova, last_spherical and stumbling (last motion − last L1 > 1).
  """
  raw = {"last_early": np.asarray(last_early), "last_midlife": np.asarray(last_midlife),
         "last_motion": np.asarray(last_l1)}
  boundaries = {}
  for k, b in raw.items():
    boundaries[k] = _stats(b[b >= 0])
    boundaries[k + "_never"] = int((b < 0).sum())
  ll = raw["last_motion"]
  boundaries["fimbulwinter_onset"] = _stats(ll[ll >= 0] + 1)
  le, lm, ll0 = nested_boundaries(last_early, last_midlife, last_l1)
  durations = {"early": _stats(le), "midlife": _stats(lm - le), "late": _stats(ll0 - lm),
               "fimbulwinter": _stats(total_steps - ll0)}
  out = {"boundaries": boundaries, "durations": durations}
  if last_hypernova is not None:
    h = np.asarray(last_hypernova)
    out["last_hypernova"] = _stats(h[h >= 0])
  if last_spherical is not None:
    sp = np.asarray(last_spherical)
    out["last_spherical"] = _stats(sp[sp >= 0])
    out["stumbling"] = _stats(ll0 - np.minimum(np.maximum(sp, 0), ll0))
  return out


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


def centroid_drift(centroid: np.ndarray, radius=None, radius_origin=None,
                   max_radius=None) -> dict:
  """Centroid drift and cloud radius (docs/definitions.md §Centroid drift).

  Args:
    centroid: [T+1, D] dead-row centroid c(t).
    radius, radius_origin, max_radius: optional [T+1] mean ‖w_i − c‖, mean
      ‖w_i‖ and max ‖w_i − c‖.

  Returns:
    dict: norm_start/norm_end (‖c‖), path_length (Σ‖Δc‖), crow_flies
    (‖c(T) − c(0)‖), efficiency (crow/path), cos_mean/cos_std (ddof=1, as
    torch.std)/cos_pairs over consecutive steps where both Δc ≠ 0, l2_over_l1 of
    the total displacement and its uniform baseline 1/√D, last_motion_step of
    the centroid, and with the radii radius_start/radius_end/radius_ratio,
    radius_origin_start/end and liftoff_step (first t with ‖c(t)‖ > max_i
    ‖w_i − c(t)‖: the origin leaves the bounding sphere).
  """
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
  out = {
      "norm_start": float(np.linalg.norm(c[0])), "norm_end": float(np.linalg.norm(c[-1])),
      "path_length": path, "crow_flies": crow, "efficiency": crow / path if path > 0 else None,
      "cos_mean": float(cos.mean()) if cos.size else None,
      "cos_std": float(cos.std(ddof=1)) if cos.size > 1 else None, "cos_pairs": int(cos.size),
      "l2_over_l1": crow / l1 if l1 > 0 else None, "uniform_baseline": 1 / math.sqrt(c.shape[1]),
      "last_motion_step": int(moved[-1]) + 1 if moved.size else None,
  }
  if radius is not None:
    r = np.asarray(radius, np.float64)
    out.update(radius_start=float(r[0]), radius_end=float(r[-1]),
               radius_ratio=float(r[-1] / r[0]) if r[0] > 0 else None)
  if radius_origin is not None:
    out.update(radius_origin_start=float(radius_origin[0]),
               radius_origin_end=float(radius_origin[-1]))
  if max_radius is not None:
    outside = np.flatnonzero(np.sqrt(np.square(c).sum(1)) > np.asarray(max_radius))
    out["liftoff_step"] = int(outside[0]) if outside.size else None
  return out


def _finite(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x[np.isfinite(x)]


def accounting_summary(replay_match, cosine, norm_ratio, swallowed, max_ulp_error) -> dict:
  """The Adam accounting summary (docs/definitions.md §Adam accounting) from per-step [T] metrics.

  Counts use all T steps as the denominator, as the lab's "476/1000 steps with
  ratio in [0.99, 1.01]"; means skip non-finite steps (nothing moved: ratio inf,
  cosine NaN).
  """
  r, c, q = (np.asarray(x, np.float64) for x in (replay_match, cosine, norm_ratio))
  T = r.size
  mean = lambda x: float(_finite(x).mean()) if _finite(x).size else None
  err = _finite(max_ulp_error)
  return {
      "steps": T, "replay_match_mean": mean(r), "replay_match_min": float(r.min()) if T else None,
      "replay_exact_steps": int((r == 1).sum()),
      "cosine_mean": mean(c), "cosine_above_0_99": int((c > 0.99).sum()),
      "ratio_mean": mean(q), "ratio_within_1pct": int(((q >= 0.99) & (q <= 1.01)).sum()),
      "swallowed_mean": mean(swallowed), "max_ulp_error": float(err.max()) if err.size else None,
      "samples": [{"t": t, "ratio": float(q[t - 1]), "cosine": float(c[t - 1])}
                  for t in ACCOUNTING_SAMPLE_STEPS if t <= T],
  }


def loss_summary(loss: np.ndarray) -> dict:
  """Loss at steps 1..T (row 0, before any step, is NaN or 0.0 in the lab's files)."""
  x = np.asarray(loss, np.float64)[1:]
  T = x.size
  ok = np.flatnonzero(np.isfinite(x))
  samples = sample_steps(T)
  return {
      "first": float(x[0]) if T else None, "final": float(x[-1]) if T else None,
      "min": float(x[ok].min()) if ok.size else None,
      "min_step": int(ok[np.argmin(x[ok])]) + 1 if ok.size else None,
      "at": {str(t): float(x[t - 1]) for t in samples}, "nonfinite_steps": int(T - ok.size),
  }


# --- Thimble 8's SANITY CHECK (files with W, m, v) ----------------------------


def sanity_check(traj: trajectory.Trajectory) -> dict:
  """Thimble 8's SANITY CHECK numbers (the lab's Thimble 8 notebook, cell 14) for files with W, m, v.

  `Mean |W[T] - W[0]|` subtracts in bf16 first, as the seed's
  `(W_bf16[-1] - W_bf16[0]).float().abs().mean()` does.
  """
  import ml_dtypes
  keys = traj.reader.keys()
  m_key, v_key = trajectory.state_keys(keys)
  T = traj.steps
  w0, wt = (traj.values(traj.w_rows(t, t + 1))[0] for t in (0, T))
  dw = wt - w0
  if traj.w_format == "bf16":
    dw = dw.astype(ml_dtypes.bfloat16).astype(np.float32)

  def state(key, t):
    return traj.select(trajectory.read_state(traj.reader, key, t, t + 1))[0].astype(np.float32)

  loss = traj.reader.read(traj.loss_key).astype(np.float64) if traj.loss_key else None
  return {
      "steps": T, "mean_abs_dw": float(np.abs(dw).mean()),
      "mean_abs_m": float(np.abs(state(m_key, T)).mean()),
      "mean_abs_v": float(np.abs(state(v_key, T)).mean()),
      "loss_1": float(loss[1]) if loss is not None and T else None,
      "loss_T": float(loss[T]) if loss is not None else None,
      "m0_zero": bool((state(m_key, 0) == 0).all()), "v0_zero": bool((state(v_key, 0) == 0).all()),
  }


# --- The whole analysis of one file -------------------------------------------


def analyze(path: str, *, block_steps: Optional[int] = None, max_steps: Optional[int] = None,
            threshold: Optional[float] = None) -> tuple[dict, dict]:
  """Every analysis the file supports (see `_analyze`); numpy's warnings about
  non-finite values are silenced (a diverged or corrupt file is reported, not
  warned about line by line)."""
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return _analyze(path, block_steps=block_steps, max_steps=max_steps, threshold=threshold)


def _analyze(path: str, *, block_steps: Optional[int] = None, max_steps: Optional[int] = None,
             threshold: Optional[float] = None) -> tuple[dict, dict]:
  """Every analysis the file supports, streamed; what it lacks is listed as skipped.

  Args:
    path: a .safetensors trajectory (ours or the lab's layout) or a run folder.
    block_steps: steps per block (default: about stream.BLOCK_BYTES of work per block).
    max_steps: analyse only steps 1..max_steps.
    threshold: motion threshold (default: metadata's motion_threshold, else 0.1).

  Returns:
    (summary, series): summary is JSON-ready (see report.format_summary);
    series holds per-step arrays for the plots (loss, frozen_fraction,
    global_frozen, populations, classes, centroid, radius, last_motion).
  """
  traj = trajectory.open_trajectory(path)
  keys = traj.reader.keys()
  diverged = divergence_step(traj)
  if diverged is not None:  # analyse the steps before it: the lab's measures need finite W
    max_steps = diverged - 1 if max_steps is None else min(max_steps, diverged - 1)
  T = traj.steps if max_steps is None else min(traj.steps, max_steps)
  if threshold is None:
    threshold = float(traj.metadata.get("motion_threshold") or stream.MOTION_THRESHOLD)
  skipped = []
  skip = lambda name, why: skipped.append({"analysis": name, "reason": why})
  has_d = "delta_W_prime" in keys
  summary = {
      "file": os.path.abspath(traj.path), "layout": traj.layout, "keys": keys, "steps": T,
      "rows_recorded": traj.reader.shape(traj.w_key)[1] if traj.w_key else traj.n_rows,
      "rows": traj.n_rows, "hidden": traj.hidden, "w_format": traj.w_format,
      "delta_w_prime": "stored" if has_d else ("computed from W" if traj.w_key else None),
      "motion_threshold": threshold, "notes": list(traj.notes), "skipped": skipped,
      "run": trajectory.run_info(traj.metadata), "diverged_at_step": diverged,
  }
  if diverged is not None:
    summary["notes"].append(f"the loss is non-finite from step {diverged}: every analysis "
                            f"covers steps 0..{T} only")
  series = {}
  if traj.loss_key:
    loss = traj.reader.rows(traj.loss_key, 0, T + 1).astype(np.float64)
    summary["loss"] = loss_summary(loss)
    series["loss"] = loss
  else:
    skip("loss", "no loss or losses key")
  if traj.w_key or has_d:
    sc = stream.scan(traj, threshold, block_steps, max_steps)
    lms = sc.last_motion
    if "last_motion_step" in keys and max_steps is None:
      stored = traj.stored_rows("last_motion_step").astype(np.int64)
      if stored.shape == lms.shape and not np.array_equal(stored, lms):
        summary["notes"].append(f"stored last_motion_step differs from the recount in "
                                f"{int((stored != lms).sum())} rows; the stored one is reported")
      lms = stored
    summary["fimbulwinter_check"] = fimbulwinter_check(lms, T) if T else None
    summary["stillness"] = stillness_summary(sc.any_motion)
    summary["frozen_fraction"] = frozen_fraction(sc.n_frozen, sc.n, sc.cold_to_hot, sc.hot_to_cold)
    summary["lifecycle"] = lifecycle(sc.last_early, sc.last_midlife, sc.last_l1, T,
                                     last_hypernova=sc.last_hypernova,
                                     last_spherical=sc.last_spherical)
    summary["mean_l2_at"] = {str(t): float(sc.mean_l2[t - 1]) for t in sample_steps(T)}
    series.update(frozen_fraction=sc.n_frozen / max(sc.n, 1), any_motion=sc.any_motion,
                  populations=phase_populations(sc.last_early, sc.last_midlife, sc.last_l1, T),
                  classes=sc.classes, last_motion=lms, mean_l2=sc.mean_l2)
    if sc.global_frozen is not None:
      summary["global_freeze"] = global_freeze(sc.global_frozen)
      series["global_frozen"] = sc.global_frozen
    else:
      skip("global freeze", "no W (bitwise equality needs the stored bits)")
    if sc.centroid is not None and T:
      summary["centroid"] = centroid_drift(sc.centroid, sc.radius, sc.radius_origin, sc.max_radius)
      summary["centroid"]["source"] = sc.centroid_source
      series.update(centroid=sc.centroid, radius=sc.radius)
      if sc.radius is None:
        skip("cloud radius", "no W (only the stored centroid)")
    else:
      skip("centroid drift and cloud radius", "no W or centroid" if T else "no steps")
  else:
    for name in ("Fimbulwinter check", "stillness runs", "global freeze", "frozen fraction",
                 "lifecycle phases", "centroid drift and cloud radius"):
      skip(name, "no W or delta_W_prime")
  if all(k in keys for k in trajectory.accounting_keys()):
    arrays = [traj.reader.rows(k, 0, T).astype(np.float64) for k in trajectory.accounting_keys()]
    summary["accounting"] = {**accounting_summary(*arrays), "source": "adam_* keys"}
    series["accounting"] = dict(zip(trajectory.accounting_keys(), arrays))
  else:
    has_state = traj.w_key and all(trajectory.state_keys(keys))
    hyper = traj.hyper() if has_state else None
    if has_state and hyper is not None and T:
      got = stream.accounting_from_state(traj, hyper, block_steps, max_steps)
      arrays = [got[k[len("adam_"):]] for k in trajectory.accounting_keys()]
      summary["accounting"] = {**accounting_summary(*arrays),
                               "source": "recomputed from W, m, v (jaxdt.optim.accounting.metrics)"}
      series["accounting"] = dict(zip(trajectory.accounting_keys(), arrays))
    elif has_state:
      skip("Adam accounting", "m and v present but the hyperparameters are unknown (no "
           "metadata.json with learning_rate, beta1, beta2, epsilon, weight_decay)")
    else:
      skip("Adam accounting", "no adam_* keys, and no W + m + v to recompute them")
  if traj.w_key and all(trajectory.state_keys(keys)) and max_steps is None:
    summary["sanity_check"] = sanity_check(traj)
  summary["verified"] = traj.verify()  # raises before anything is printed or written
  traj.reader.close()
  return summary, series


def divergence_step(traj: trajectory.Trajectory) -> Optional[int]:
  """The first step whose loss is non-finite (metadata's diverged_at_step, else the
  recorded loss of steps 1..T), or None."""
  recorded = traj.metadata.get("diverged_at_step")
  if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
    return recorded
  if traj.loss_key is None or traj.steps == 0:
    return None
  loss = traj.reader.rows(traj.loss_key, 1, traj.steps + 1)  # row 0 may be NaN by design
  return rundir.first_nonfinite(loss, first_step=1)
