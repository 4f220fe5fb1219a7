"""The five PNGs of an analysed trajectory (matplotlib's Agg, imported only to plot).

Every PNG is rendered into memory and written by `save_png` (tmp file, fsync,
rename): an interrupted analysis leaves the old picture or the new one.
"""

from __future__ import annotations

import io
import os
from typing import Optional

import numpy as np

from jaxdt.io import disk
from jaxdt.report import text



PLOT_FILES = {"loss": "loss.png", "frozen_fraction": "frozen_fraction.png",
              "freeze_steps": "freeze_steps.png", "phases": "phases.png",
              "centroid": "centroid.png"}

# --- Plots --------------------------------------------------------------------


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  return plt


def save_png(fig, path: str) -> str:
  """Lays out and renders `fig` into memory, writes it atomically (tmp + fsync + rename),
  and closes it."""
  try:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
  finally:
    fig.clf()
    _pyplot().close(fig)
  disk.atomic_write_bytes(path, buf.getvalue())
  return path


def _save(fig, out_dir: str, name: str) -> str:
  return save_png(fig, os.path.join(out_dir, PLOT_FILES[name]))


def plot_loss(plt, series: dict, summary: dict, out_dir: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 4))
  loss = series["loss"]
  ax.plot(np.arange(1, loss.size), loss[1:], lw=0.8)
  ax.set(xlabel="step", ylabel="loss", title="Training loss")
  return _save(fig, out_dir, "loss")


def plot_frozen_fraction(plt, series: dict, summary: dict, out_dir: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 4))
  f = series["frozen_fraction"]
  t = np.arange(1, f.size + 1)
  ax.plot(t, f, lw=0.8, label=f"rows with ‖ΔW′‖₂ < {summary.motion_threshold}")
  if "global_frozen" in series:
    g = series["global_frozen"]
    ax.fill_between(t, 0, 0.04, where=g, step="mid", color="k", alpha=0.6,
                    label="global freeze (W bitwise unchanged)")
  for p, step in summary.frozen_fraction.milestones.items():
    if step:
      ax.axvline(step, ls=":", lw=0.8, color="gray")
      ax.text(step, 1.01, p, fontsize=7, ha="center")
  ax.set(xlabel="step", ylabel="frozen fraction", ylim=(0, 1.06),
         title="Per-step frozen fraction")
  ax.legend(fontsize=8, loc="center right")
  return _save(fig, out_dir, "frozen_fraction")


def plot_freeze_steps(plt, series: dict, summary: dict, out_dir: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 4))
  lms = np.asarray(series["last_motion"])
  moved = lms[lms >= 0]
  ax.hist(moved, bins=min(50, max(1, np.unique(moved).size)) if moved.size else 1)
  ax.set(xlabel="freeze step (last ‖ΔW′‖₂ ≥ threshold)", ylabel="tokens",
         title=f"Per-token freeze steps ({moved.size} of {lms.size} moved)")
  return _save(fig, out_dir, "freeze_steps")


def plot_phases(plt, series: dict, summary: dict, out_dir: str) -> str:
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  pops = series["populations"]
  t = np.arange(1, pops.shape[0] + 1)
  top.stackplot(t, pops.T, labels=text.PHASES, step="mid")
  top.set(ylabel="tokens", title="Lifecycle phases (last-exit rule)")
  top.legend(fontsize=8, loc="center right")
  for i, label in enumerate(("Early ‖ΔW′‖₂>√D", "Midlife L∞>1", "Late L∞≤1, L1>0", "Still L1=0")):
    bottom.plot(t, series["classes"][:, i], lw=0.8, label=label)
  bottom.set(xlabel="step", ylabel="tokens", title="Per-step classification")
  bottom.legend(fontsize=8, loc="center right")
  return _save(fig, out_dir, "phases")


def centroid_projection(c: np.ndarray) -> np.ndarray:
  """[T+1, 2]: c(t) − c(0) on the total-drift direction and the main direction across it."""
  full = np.asarray(c, np.float64) - c[0]
  ok = np.isfinite(full).all(axis=1).cumprod().astype(bool)  # rows before the first non-finite
  x = full[ok]
  total = x[-1]
  norm = np.linalg.norm(total)
  e1 = total / norm if norm > 0 else np.eye(x.shape[1])[0]
  rest = x - np.outer(x @ e1, e1)
  _, _, vt = np.linalg.svd(rest - rest.mean(0), full_matrices=False)
  e2 = vt[0] - (vt[0] @ e1) * e1
  e2 = e2 / max(np.linalg.norm(e2), 1e-300)
  out = np.full((len(full), 2), np.nan)
  out[ok] = np.stack([x @ e1, x @ e2], axis=1)
  return out


def plot_centroid(plt, series: dict, summary: dict, out_dir: str) -> str:
  with_r = series.get("radius") is not None
  fig, axes = plt.subplots(1, 2 if with_r else 1, figsize=(10 if with_r else 5, 4))
  axes = np.atleast_1d(axes)
  p = centroid_projection(series["centroid"])
  sc = axes[0].scatter(p[:, 0], p[:, 1], c=np.arange(p.shape[0]), s=3, cmap="viridis")
  axes[0].plot(p[:, 0], p[:, 1], lw=0.4, color="gray")
  fig.colorbar(sc, ax=axes[0], label="step")
  axes[0].set(xlabel="along the total drift", ylabel="across (main direction)",
              title="Centroid path c(t) − c(0)")
  if with_r:
    r = series["radius"]
    axes[1].plot(np.arange(r.size), r, lw=0.8)
    axes[1].set(xlabel="step", ylabel="mean ‖w_i − c‖", title="Cloud radius")
  return _save(fig, out_dir, "centroid")


_PLOTS = {"loss": (plot_loss, ("loss",)),
          "frozen_fraction": (plot_frozen_fraction, ("frozen_fraction",)),
          "freeze_steps": (plot_freeze_steps, ("last_motion",)),
          "phases": (plot_phases, ("populations", "classes")),
          "centroid": (plot_centroid, ("centroid",))}


def write_plots(series: dict, summary: dict, out_dir: str) -> tuple[list, list]:
  """Writes the PNGs the series allow.

  Returns:
    (paths written, [(plot, reason)] skipped).
  """
  try:
    plt = _pyplot()
  except ImportError:
    return [], [(name, "matplotlib is not installed (pip install -e .)") for name in _PLOTS]
  os.makedirs(out_dir, exist_ok=True)
  written, skipped = [], []
  for name, (fn, needs) in _PLOTS.items():
    missing = [k for k in needs if k not in series]
    if missing or summary.steps == 0:
      skipped.append((name, f"no {', '.join(missing) or 'steps'}"))
      continue
    try:
      written.append(fn(plt, series, summary, out_dir))
    except (ArithmeticError, LookupError, TypeError, ValueError) as e:  # a file's odd values
      plt.close("all")
      skipped.append((name, f"its values cannot be plotted ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:80]})"))
  return written, skipped


DIVERGENCE_FILE = "divergence.png"


def plot_divergence(div, path: str) -> Optional[str]:
  """Two panels against step: the bitwise-equal W fraction and ‖W_a − W_b‖ / ‖W_a − W_0‖."""
  try:
    plt = _pyplot()
  except ImportError:
    return None
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
  t = np.arange(div.steps + 1)
  top.plot(t, div.equal_fraction, lw=0.8)
  top.set(ylabel="W bitwise equal", ylim=(0, 1.02), title="Divergence of B from A")
  bottom.semilogy(t[1:], div.relative_distance[1:], lw=0.8)
  bottom.set(xlabel="step", ylabel="‖W_a − W_b‖ / ‖W_a − W_0‖")
  return save_png(fig, path)


DETECTION_FILE = "detect.png"


def plot_detection(rows: list, chance: float, path: str) -> Optional[str]:
  """The detector's precision (= recall) of the dead set against step (`analysis.detect`)."""
  try:
    plt = _pyplot()
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(6, 3.6))
  steps = [r["step"] for r in rows]
  ax.plot(steps, [r["precision"] for r in rows], "o-", label="precision = recall at k")
  ax.plot(steps, [r["average_precision"] for r in rows], "s--", label="average precision")
  ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
  ax.set(xlabel="step", ylabel="of the dead set", ylim=(0, 1.02),
         title="Dead set from the weights alone (Magikarp indicator)")
  ax.legend(loc="lower right", fontsize=8)
  return save_png(fig, path)
