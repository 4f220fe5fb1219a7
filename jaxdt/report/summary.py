"""`run.py --summarize`: one row of freeze figures per finished run, group statistics, a plot.

Each path is a finished run folder (jaxdt's, or a torch peer run of
benchmarks/torch_peer.py) or a sweep folder (all its members, in member
order). Every path is resolved and checked before anything is read, and every
run is analysed (one streaming pass, `metrics.measure`, which verifies each
tensor's SHA-256) before anything is written: a refused input leaves the
output folder untouched.

Per run: label, framework, steps, seed, data_seed, precision, learning_rate,
weight_decay, the first steps where 50/90/99/100% of the recorded (dead) rows
are frozen (‖ΔW′_i‖₂ < the motion threshold, 0.1), the global last motion
(max of last_motion_step), the number of global stillness runs (maximal runs
of steps where no row moves) and the final loss; with the CPU and wall time the
run recorded. `--group_by` adds each group's mean, sd (ddof=1), min and max.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence

import numpy as np

from jaxdt.analysis import metrics
from jaxdt.analysis import trajectory
from jaxdt.io import disk
from jaxdt.io import locks
from jaxdt.io import metadata as metadata_lib
from jaxdt.report import outputs as outputs_lib
from jaxdt.report import plots as plots_lib

SUMMARY_FILE = "summary.json"
PLOT_FILE = "frozen_fraction.png"
AXES = ("framework", "seed", "data_seed", "precision", "learning_rate", "weight_decay", "steps")
FIGURES = ("frozen_50", "frozen_90", "frozen_99", "frozen_100", "global_last_motion",
           "stillness_runs", "final_loss")


class SummaryError(ValueError):
  """A refused --summarize input; the message is one line naming the path or axis and the fix."""


@dataclasses.dataclass(frozen=True)
class RunRow:
  """One run's figures."""

  label: str
  path: str
  framework: str  # "jax" | "torch"
  steps: int
  seed: int
  data_seed: int
  precision: str
  learning_rate: float
  weight_decay: float
  frozen_50: Optional[int]
  frozen_90: Optional[int]
  frozen_99: Optional[int]
  frozen_100: Optional[int]
  global_last_motion: Optional[int]
  stillness_runs: Optional[int]
  final_loss: Optional[float]
  cpu_model: Optional[str]
  wall_time_s: Optional[float]


@dataclasses.dataclass(frozen=True)
class Stat:
  mean: Optional[float]
  sd: Optional[float]  # ddof = 1; None for one run
  min: Optional[float]
  max: Optional[float]
  n: int

  @classmethod
  def of(cls, values) -> "Stat":
    x = np.asarray([v for v in values if v is not None], np.float64)
    if not x.size:
      return cls(None, None, None, None, 0)
    return cls(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else None,
               float(x.min()), float(x.max()), int(x.size))


@dataclasses.dataclass(frozen=True)
class Group:
  key: dict  # axis -> value
  labels: tuple
  stats: dict  # figure -> Stat


# --- Inputs ----------------------------------------------------------------------------


def _metadata(folder: str) -> Optional[dict]:
  try:
    return metadata_lib.read_metadata(folder)
  except Exception:  # pylint: disable=broad-except  # not a run folder: the caller says so
    return None


def run_folders(path: str) -> list:
  """The finished run folders of PATH: itself, or a sweep folder's members in member order.

  Raises:
    SummaryError: a missing path, a folder that is neither, or an unfinished member.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise SummaryError(f"--summarize path {path} is not a run or sweep folder (it does not "
                       "exist or is a file); pass finished run folders")
  if os.path.exists(os.path.join(path, metadata_lib.METADATA_FILE)):
    return [path]
  members = []
  for name in sorted(os.listdir(path)):
    meta = _metadata(os.path.join(path, name))
    if meta is not None and isinstance(meta.get("sweep"), dict):
      members.append((meta["sweep"].get("member") or 0, os.path.join(path, name)))
  if not members:
    raise SummaryError(f"--summarize path {path} holds no run (no metadata.json) and no sweep "
                       "members; pass a finished jaxdt run folder or a sweep folder")
  return [p for _, p in sorted(members)]


def check_finished(folder: str) -> dict:
  try:
    meta = metadata_lib.read_metadata(folder)
  except disk.StoreError as e:  # missing, or a file jaxdt cannot read: say which
    raise SummaryError(f"{folder} is not a jaxdt run ({str(e).split('; ')[0]}); pass a run "
                       "folder jaxdt or torch_peer.py wrote") from None
  config = meta.get("config")
  if not isinstance(config, dict):
    raise SummaryError(f"{folder} is not a jaxdt run (its metadata.json has no config); pass "
                       "a run folder jaxdt or torch_peer.py wrote")
  name = (config.get("store") or {}).get("trajectory_name")
  if not metadata_lib.is_complete(folder, name or ""):
    raise SummaryError(f"{folder} is unfinished (or its trajectory is missing or .partial); "
                       f"{locks.unfinished_advice(folder)}, then summarize it")
  return meta


# --- Rows ------------------------------------------------------------------------------


def row_of(folder: str, meta: dict, summary: metrics.Summary) -> RunRow:
  cfg = meta["config"]
  ff = summary.frozen_fraction
  fc, st = summary.fimbulwinter_check, summary.stillness
  optim = cfg.get("optim") or {}
  milestone = lambda p: None if ff is None else ff.milestone(p)
  return RunRow(
      label=os.path.basename(folder), path=folder, framework=meta.get("framework", "jax"),
      steps=summary.steps, seed=cfg.get("seed"),
      data_seed=cfg.get("data_seed") if cfg.get("data_seed") is not None else cfg.get("seed"),
      precision=cfg.get("precision"), learning_rate=optim.get("learning_rate"),
      weight_decay=optim.get("weight_decay"), frozen_50=milestone(50), frozen_90=milestone(90),
      frozen_99=milestone(99), frozen_100=milestone(100),
      global_last_motion=None if fc is None else fc.global_last_motion,
      stillness_runs=None if st is None else st.count,
      final_loss=None if summary.loss is None else summary.loss.final,
      cpu_model=meta.get("cpu_model"), wall_time_s=meta.get("wall_time_s"))


def analyse(folder: str, meta: dict, *, block_steps: Optional[int] = None) -> tuple:
  """(RunRow, per-step frozen fraction [T]) of one finished run folder (streamed)."""
  try:
    summary, series = metrics.measure(folder, block_steps=block_steps)
  except trajectory.AnalysisError as e:
    raise SummaryError(f"{folder}: {e}") from None
  return row_of(folder, meta, summary), series.get("frozen_fraction")


def groups(rows: Sequence[RunRow], axes: Sequence[str]) -> list:
  """Rows grouped by the values of `axes`, in order of first appearance, with statistics."""
  by: dict = {}
  for r in rows:
    by.setdefault(tuple(getattr(r, a) for a in axes), []).append(r)
  return [Group(dict(zip(axes, key)), tuple(r.label for r in members),
                {f: Stat.of(getattr(r, f) for r in members) for f in FIGURES})
          for key, members in by.items()]


def check_axes(axes: Sequence[str]) -> None:
  unknown = [a for a in axes if a not in AXES]
  if unknown:
    raise SummaryError(f"--group_by axis {unknown[0]!r} is unknown; use one of {', '.join(AXES)}")


# --- Output ----------------------------------------------------------------------------


def _cell(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
  return str(v)


def format_table(rows: Sequence[RunRow], grouped: Sequence[Group]) -> str:
  """The printed table: one row per run, then one block per group."""
  cols = ("label", "framework", "steps", "seed", "data_seed", "precision", "learning_rate",
          "weight_decay") + FIGURES
  heads = ("run", "fw", "steps", "seed", "data", "prec", "lr", "wd", "50%", "90%", "99%",
           "100%", "last motion", "still runs", "final loss")
  widths = [max(len(h), *(len(_cell(getattr(r, c))) for r in rows)) for h, c in zip(heads, cols)]
  line = lambda cells: "  ".join(f"{c:>{w}}" if i else f"{c:<{w}}"
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  out = [line(heads)] + [line([_cell(getattr(r, c)) for c in cols]) for r in rows]
  for g in grouped:
    name = ", ".join(f"{k}={_cell(v)}" for k, v in g.key.items())
    out += ["", f"group {name} ({len(g.labels)} runs)"]
    for f in FIGURES:
      s = g.stats[f]
      out.append(f"  {f:<20} mean {_cell(s.mean)}  sd {_cell(s.sd)}  min {_cell(s.min)}  "
                 f"max {_cell(s.max)}")
  return "\n".join(out)


def write_plot(rows: Sequence[RunRow], curves: Sequence, grouped: Sequence[Group],
               path: str) -> Optional[str]:
  """Frozen fraction against step, one line per run, one colour per group."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  colour = {label: f"C{i % 10}" for i, g in enumerate(grouped) for label in g.labels}
  if not any(g.key for g in grouped):  # no --group_by: a colour per run
    colour = {r.label: f"C{i % 10}" for i, r in enumerate(rows)}
  fig, ax = plt.subplots(figsize=(8, 4.5))
  seen = set()
  for r, f in zip(rows, curves):
    if f is None:
      continue
    c = colour.get(r.label, "C0")
    g = next((g for g in grouped if r.label in g.labels), None)
    name = ", ".join(f"{k}={_cell(v)}" for k, v in g.key.items()) if g and g.key else r.label
    ax.plot(np.arange(1, len(f) + 1), f, lw=0.8, color=c, alpha=0.8,
            label=None if name in seen else name)
    seen.add(name)
  ax.set(xlabel="step", ylabel="frozen fraction (‖ΔW′_i‖₂ < 0.1)", ylim=(0, 1.02),
         title="Dead rows frozen, per step")
  ax.legend(fontsize=7, loc="lower right")
  return plots_lib.save_png(fig, path)


def summarize(paths: Sequence[str], out_dir: str, group_by: Sequence[str] = (), *,
              echo: Callable[[str], None] = print, block_steps: Optional[int] = None) -> dict:
  """Analyses every run of `paths`, prints the table, writes summary.json and the PNG.

  Raises:
    SummaryError: a refused path or axis (one line); nothing was written.
  """
  check_axes(group_by)
  folders = [f for p in paths for f in run_folders(p)]
  metas = [check_finished(f) for f in folders]  # every input refused before any analysis
  outputs_lib.check_outputs(out_dir, (SUMMARY_FILE, PLOT_FILE), SUMMARY_FILE,
                            ("paths", "group_by", "runs"), "--output_dir")
  analysed = [analyse(f, m, block_steps=block_steps) for f, m in zip(folders, metas)]
  rows = [r for r, _ in analysed]
  grouped = groups(rows, group_by) if group_by else [Group({}, tuple(r.label for r in rows), {})]
  result = {"paths": [os.path.abspath(p) for p in paths], "group_by": list(group_by),
            "runs": [dataclasses.asdict(r) for r in rows],
            "groups": [dataclasses.asdict(g) for g in grouped] if group_by else []}
  os.makedirs(out_dir, exist_ok=True)
  outputs_lib.write_json(os.path.join(out_dir, SUMMARY_FILE), result)
  plot = write_plot(rows, [c for _, c in analysed], grouped, os.path.join(out_dir, PLOT_FILE))
  echo(format_table(rows, grouped if group_by else []))
  echo(f"\nWrote {os.path.join(out_dir, SUMMARY_FILE)}" + (f" and {plot}" if plot else ""))
  return result
