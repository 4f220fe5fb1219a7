"""A sweep's summary: per member the freeze figures and final loss, as JSON, a table and a plot.

Reads only the members' finished run folders (each analysed in one streaming
pass, `analysis.metrics.measure`), so it runs the same after a sweep, after a
resumed one, or on folders copied from other hosts.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

from jaxdt.analysis import metrics
from jaxdt.io import metadata as metadata_lib
from jaxdt.io import locks
from jaxdt.report import outputs as outputs_lib
from jaxdt.report import plots as plots_lib

SUMMARY_FILE = "sweep_summary.json"
PLOT_FILE = "sweep_summary.png"


def member_row(path: str) -> dict:
  """One member's figures from its finished run folder."""
  summary, _ = metrics.measure(path)
  meta = metadata_lib.read_metadata(path)
  ff = summary.frozen_fraction.milestones if summary.frozen_fraction is not None else {}
  return {
      "name": os.path.basename(os.path.normpath(path)), "path": os.path.abspath(path),
      "assignment": (meta.get("sweep") or {}).get("assignment"),
      "global_last_motion": meta.get("global_last_motion"),
      "fimbulwinter_duration": meta.get("fimbulwinter_duration"),
      "frozen_fraction_milestones": ff,
      "final_loss": meta.get("final_loss"), "steps": meta.get("steps_completed"),
      "diverged_at_step": meta.get("diverged_at_step"),
  }


def wait_for(out_root: str, names: Sequence[str], trajectory_name: str, *,
             idle_s: float = 120.0, poll_s: float = 2.0, echo: Callable[[str], None] = print):
  """Waits until every member is finished (members of other processes of a sweep).

  Raises:
    ValueError: members stayed unfinished with no process writing any of them for
      `idle_s` (a process died: the sweep resumes with --resume).
  """
  last_writer, said = time.monotonic(), 0.0
  while True:
    pending = [n for n in names
               if not metadata_lib.is_complete(os.path.join(out_root, n), trajectory_name)]
    if not pending:
      return
    now = time.monotonic()
    if any(locks.writer_of(os.path.join(out_root, n)) for n in pending):
      last_writer = now
    elif now - last_writer > idle_s:
      raise ValueError(f"sweep members {', '.join(pending)} are unfinished and no process is "
                       "writing them; run the sweep again with --resume")
    if now - said > 60:
      echo(f"waiting for {len(pending)} member(s) of other processes")
      said = now
    time.sleep(poll_s)


def summarize(out_root: str, names: Sequence[str], spec: str, *,
              echo: Callable[[str], None] = print, plot: bool = True) -> dict:
  """Writes `sweep_summary.json` (and the plot) under out_root; prints the table."""
  missing = [n for n in names
             if not os.path.exists(os.path.join(out_root, n, metadata_lib.METADATA_FILE))]
  if missing:
    raise ValueError(f"sweep members not finished yet: {', '.join(missing)}; run the sweep "
                     "again with --resume")
  # metrics.measure refuses an unfinished or corrupt member (one line) and verifies checksums.
  rows = [member_row(os.path.join(out_root, n)) for n in names]
  result = {"spec": spec, "root": os.path.abspath(out_root), "members": rows}
  outputs_lib.write_json(os.path.join(out_root, SUMMARY_FILE), result)
  echo(format_table(result))
  if plot:
    written = write_plot(result, out_root)
    echo(f"\nWrote {os.path.join(out_root, SUMMARY_FILE)}"
         + (f" and {written}" if written else " (no plot: matplotlib missing)"))
  return result


def _milestone(ff: dict, pct) -> str:
  v = ff.get(f"{pct}%")
  return "-" if v is None else str(v)


def format_table(result: dict) -> str:
  rows = result["members"]
  pcts = (50, 90, 99, 100)
  head = (f"{'member':<44} {'last motion':>11} {'Fimbulwinter':>12} "
          + " ".join(f"{f'{p}% frozen':>10}" for p in pcts) + f" {'final loss':>10}")
  lines = ["=" * len(head), f"SWEEP: {result['spec']}", "=" * len(head), head]
  for r in rows:
    loss = r["final_loss"]
    lines.append(f"{r['name'][:44]:<44} {str(r['global_last_motion']):>11} "
                 f"{str(r['fimbulwinter_duration']):>12} "
                 + " ".join(f"{_milestone(r['frozen_fraction_milestones'], p):>10}" for p in pcts)
                 + f" {'-' if loss is None else f'{loss:.4f}':>10}")
  return "\n".join(lines)


def write_plot(result: dict, out_root: str) -> Optional[str]:
  """Bars of each member's global last motion and Fimbulwinter duration."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  rows = result["members"]
  names = [r["name"] for r in rows]
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
  x = range(len(rows))
  last = [r["global_last_motion"] or 0 for r in rows]
  winter = [r["fimbulwinter_duration"] or 0 for r in rows]
  ax.bar(x, last, label="global last motion (step)")
  ax.bar(x, winter, bottom=last, label="Fimbulwinter (steps)", alpha=0.6)
  ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
  ax.set(ylabel="steps", title=f"sweep {result['spec']}")
  ax.legend(fontsize=8)
  return plots_lib.save_png(fig, os.path.join(out_root, PLOT_FILE))
