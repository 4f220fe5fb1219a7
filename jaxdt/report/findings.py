"""A study's outputs: one summary JSON per member, the tables (markdown) and the PNGs.

Everything here reads and writes small files only. A member's summary
(`docs/findings/<member>.json`) holds its declaration, its command, the
`--summarize` row, the loss at step 500, the mean ‖ΔW′‖₂ over steps, the
per-step frozen counts (for the plots), the host it ran on and the SHA-256 of
its trajectory; `write_tables` builds docs/findings/tables.md and one PNG per
table from those files alone, so they regenerate after the run folders are
gone. Every file is written atomically (tmp, fsync, rename).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from jaxdt.analysis import metrics
from jaxdt.analysis import ranktest
from jaxdt.analysis import trajectory
from jaxdt.io import disk
from jaxdt.io import hosts
from jaxdt.io import metadata as metadata_lib
from jaxdt.report import summary as summary_lib

TABLES_FILE = "tables.md"
FIGURES = ("frozen_50", "frozen_90", "frozen_99", "frozen_100", "global_last_motion",
           "stillness_runs", "loss_500", "final_loss", "mean_dwp_l2", "mean_dwp_l2_late")
# The mean ‖ΔW′‖₂ over all steps is 93-99% the first 100 steps' (a row element near zero has
# a tiny ULP, so its first moves are thousands of cells); its mean after this step is the
# freeze phase's motion (session 12).
LATE_FROM = 500
# "moving_tail": the mean share of dead rows moving per step over a run's last TAIL_STEPS
# steps; the share at the last step alone swings with one step's re-heating (session 14).
TAIL_STEPS = 200
# A table's column head per figure (`Table.figures` picks them; FIGURES by default).
HEADS = {"frozen_50": "50%", "frozen_90": "90%", "frozen_99": "99%", "frozen_100": "100%",
         "global_last_motion": "last motion", "stillness_runs": "still runs",
         "loss_500": "loss@500", "final_loss": "final loss", "mean_dwp_l2": "mean ‖ΔW′‖₂",
         "mean_dwp_l2_late": f"mean ‖ΔW′‖₂ after {LATE_FROM}",
         "moving_last": "moving at end", "steps_per_s": "steps/s",
         "moving_tail": f"moving, last {TAIL_STEPS} steps",
         "state_bytes_per_param": "state B/param", "detect_recall_last": "detector recall",
         "mean_dwp_l2_bf16": "mean ‖ΔW′‖₂ (bf16 cells)",
         "mean_dwp_l2_late_bf16": f"mean ‖ΔW′‖₂ after {LATE_FROM} (bf16 cells)",
         "copy_rows_moved": "bf16 rows moved, last interval",
         "copy_elements_moved": "bf16 elements moved, last interval"}
DIGITS = {"loss_500": 4, "final_loss": 4, "mean_dwp_l2": 1, "mean_dwp_l2_late": 3,
          "mean_dwp_l2_bf16": 1, "mean_dwp_l2_late_bf16": 3,
          "moving_last": 3, "moving_tail": 4, "steps_per_s": 2, "copy_rows_moved": 3,
          "copy_elements_moved": 4,
          "state_bytes_per_param": 1, "detect_recall_last": 3}


def figure(s: dict, name: str):
  """A member summary's figure `name`, derived ones included (steps/s, share moving at end)."""
  if name == "steps_per_s":
    return s["steps"] / s["wall_time_s"] if s.get("wall_time_s") else None
  if name in ("moving_last", "moving_tail"):  # the share not frozen: last step, or the tail's mean
    n, rows = s.get("n_frozen"), s.get("rows")
    last = 1 if name == "moving_last" else TAIL_STEPS
    return 1.0 - float(np.mean(n[-last:])) / rows if n and rows else None
  if name == "mean_dwp_l2_late":
    late = [x for x in (s.get("dwp_l2_mean") or [])[LATE_FROM:] if x is not None]
    return float(np.mean(late)) if late else None
  if name.endswith("_bf16"):  # a ΔW′ figure in bf16 cells whatever lattice W is stored on
    v = figure(s, name[:-len("_bf16")])
    return None if v is None else v * _bf16_cells(s)
  return s.get(name)


def _bf16_cells(s: dict) -> float:
  """bf16 cells per cell of a member's stored W: under mixed and fp32 (f32 W) an f32 cell is
  exactly 2^-16 of the bf16 cell at the same value (7 against 23 fraction bits, subnormals too)."""
  return 2.0 ** -16 if s.get("precision") in ("mixed", "fp32") else 1.0
HOST_KEYS = ("cpu_model", "cpu_features", "gemm_path", "torch_gemm", "torch_device",
             "torch_version", "jaxlib_version", "device", "device_kind", "arithmetic_fingerprint",
             "backend")


class FindingsError(ValueError):
  """A refused member file or folder; one line naming it and the fix."""


def member_path(docs_dir: str, name: str) -> str:
  return os.path.join(docs_dir, f"{name}.json")


def read_member(docs_dir: str, name: str) -> Optional[dict]:
  """A member's committed summary, or None when there is none."""
  path = member_path(docs_dir, name)
  try:
    out = metadata_lib.read_json_object(path)
  except disk.StoreError as e:
    raise FindingsError(f"{path} is not a member summary ({e}); delete it and rerun --study")
  return out


def write_member(docs_dir: str, summary: dict) -> str:
  os.makedirs(docs_dir, exist_ok=True)
  path = member_path(docs_dir, summary["member"])
  text = json.dumps(metadata_lib.json_ready(summary), indent=1, allow_nan=False) + "\n"
  disk.atomic_write_text(path, text)
  return path


def check_checksum(summary: dict, folder: str, meta: dict) -> None:
  """Refuses a finished folder whose trajectory is not the file its summary was made from."""
  name = ((meta.get("config") or {}).get("store") or {}).get("trajectory_name") or ""
  actual = disk.sha256_file(os.path.join(folder, name))
  if actual != summary.get("trajectory_sha256") or actual != meta.get("trajectory_sha256"):
    raise FindingsError(
        f"member {summary.get('member')}: {folder}'s trajectory (sha256 {actual[:12]}…) is not "
        f"the one its summary was made from ({str(summary.get('trajectory_sha256'))[:12]}…); "
        "move the folder away to keep the summary, or delete the summary to redo it")


def summarize_member(study, member, folder: str, command: str) -> dict:
  """The summary of a finished member folder (streamed and checksum-verified)."""
  meta = summary_lib.check_finished(folder)
  summary, series = _measured(member.name, folder)
  row = dataclasses.asdict(summary_lib.row_of(folder, meta, summary))
  row.pop("path")
  loss = series.get("loss")
  n = summary.rows
  frozen = np.rint(np.asarray(series.get("frozen_fraction", []), np.float64) * n)
  mean_l2 = series.get("mean_l2")
  return {
      "study": study.name, "member": member.name, "declared": member.declared(),
      "command": command, "steps": summary.steps, "rows": n, **row,
      "loss_500": float(loss[500]) if loss is not None and len(loss) > 500 else None,
      "mean_dwp_l2": None if mean_l2 is None or not len(mean_l2) else float(np.mean(mean_l2)),
      "diverged_at_step": summary.diverged_at_step,
      "trajectory_sha256": meta.get("trajectory_sha256"),
      "host": {k: v for k in HOST_KEYS
               if (v := meta.get(k, hosts.host_of(meta).get(k))) is not None},
      "wall_time_s": meta.get("wall_time_s"), "date": meta.get("date"),
      "n_frozen": [int(x) for x in frozen],
      "dwp_l2_mean": dwp_series(mean_l2),
  }


def dwp_series(mean_l2) -> list:
  """The per-step mean ‖ΔW′‖₂ for a summary: 5 significant digits, None where not finite."""
  return [float(f"{x:.5g}") if np.isfinite(x) else None
          for x in np.asarray(mean_l2 if mean_l2 is not None else [], np.float64)]


def add_dwp_series(summary: dict, folder: str) -> dict:
  """A summary written before it kept the per-step mean ‖ΔW′‖₂, with it from its folder."""
  _, series = _measured(summary.get("member"), folder)
  return {**summary, "dwp_l2_mean": dwp_series(series.get("mean_l2"))}


def _measured(name: str, folder: str) -> tuple:
  """`metrics.measure` of a member's folder; a file it cannot read is a FindingsError."""
  try:
    return metrics.measure(folder)
  except trajectory.AnalysisError as e:
    raise FindingsError(f"member {name}: {e}") from None


def measured_rates(docs_dir: str, cpu_model: Optional[str]) -> dict:
  """{framework: steps/s} of the members that finished on this CPU model (for the plan)."""
  rates: dict = {}
  if not os.path.isdir(docs_dir):
    return rates
  for name in sorted(os.listdir(docs_dir)):
    if not name.endswith(".json"):
      continue
    try:
      s = read_member(docs_dir, name[:-len(".json")])
    except FindingsError:
      continue
    if not s or "member" not in s or (s.get("host") or {}).get("cpu_model") != cpu_model:
      continue
    if s.get("wall_time_s"):
      rates.setdefault(s["framework"], []).append(s["steps"] / s["wall_time_s"])
  return {k: float(np.median(v)) for k, v in rates.items()}


# --- Tables and plots ---------------------------------------------------------------------


def _cell(v, name: str = "") -> str:
  if v is None:
    return "–"
  if isinstance(v, float):
    return f"{v:,.{max(DIGITS.get(name, 0), 4 if name == 'mean_dwp_l2' else 0)}f}"
  return f"{v:,}" if isinstance(v, int) else str(v)


def _stat(values: Sequence, name: str = "") -> str:
  x = np.asarray([v for v in values if v is not None], np.float64)
  if not x.size:
    return "–"
  digits = DIGITS.get(name, 0)
  f = lambda v: f"{v:,.{digits}f}"
  if x.size == 1:
    return f(x[0]) + " (n=1)"
  return f"{f(x.mean())} ± {f(x.std(ddof=1))} ({f(x.min())}–{f(x.max())}, n={x.size})"


def _host(s: dict) -> str:
  """Where a row ran (the CPU model, or the accelerator), its GEMM route and its wall time."""
  h = s.get("host") or {}
  route = h.get("torch_gemm") or h.get("gemm_path") or ""
  route = route.split(" (")[0]
  where = h.get("cpu_model", "?")
  if h.get("device") not in (None, "cpu"):
    where = h.get("torch_device") or f"{h.get('device_kind') or '?'} ({h['device']})"
  wall = s.get("wall_time_s")
  return f"{where}; {route}; {wall / 60:.0f} min" if wall else where


def table_markdown(table, summaries: dict) -> str:
  """One table: a row per member (done or "not yet"), then each group's mean ± sd (min–max)."""
  figures = table.figures or FIGURES
  heads = [HEADS[f] for f in figures]
  out = [f"### {table.title}", "", "| member | group | " + " | ".join(heads) + " | host; GEMM "
         "route; wall |", "|---|---|" + "---|" * len(heads) + "---|"]
  for label, names in table.groups:
    for name in names:
      s = summaries.get(name)
      if s is None:
        out.append(f"| {name} | {label} | not yet |" + " |" * len(heads))
        continue
      cells = [f"> {s.get('steps'):,}" if f.startswith("frozen_") and s.get(f) is None
               else _cell(figure(s, f), f) for f in figures]  # a milestone not reached
      if s.get("diverged_at_step"):
        cells[-1] += f" (diverged at {s['diverged_at_step']})"
      out.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {_host(s)} |")
  out += ["", "Milestones: the first step with that share of the dead rows frozen (> T: not reached "
          "in the run's T steps); groups: mean ± sd (min–max, n) over the members in, a "
          "milestone not reached left out of its statistics." + _column_notes(
              figures, [summaries[n] for _, names in table.groups for n in names
                        if n in summaries]),
          "",
          "| group | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
  for label, names in table.groups:
    got = [summaries[n] for n in names if n in summaries]
    out.append(f"| {label} ({len(got)}/{len(names)} in) | "
               + " | ".join(_stat([figure(s, f) for s in got], f) for f in figures) + " |")
  if table.reference:
    out += ["", range_markdown(table, summaries)]
  return "\n".join(out)


def _column_notes(figures: Sequence[str], shown: Sequence[dict]) -> str:
  """What the bf16-cell, tail and bf16-copy columns measure, for a table that shows them."""
  note = ""
  if any(f.endswith("_bf16") for f in figures):
    note += (" ΔW′ in bf16 cells: under mixed (f32 W, f32 cells) divided by 2^16, exactly the "
             "bf16 cell at the same value.")
  if "moving_tail" in figures:
    note += (f" Moving, last {TAIL_STEPS} steps: the share of the dead rows not frozen, averaged "
             f"over the run's last {TAIL_STEPS} steps.")
  if any(f.startswith("copy_") for f in figures):
    windows = sorted({tuple(s["copy_window"]) for s in shown if s.get("copy_window")})
    where = ", ".join(f"{a:,}-{b:,}" for a, b in windows) or "the last checkpoint interval"
    note += (f" bf16 rows/elements moved: the share of the dead rows (of their elements) whose "
             f"bf16 weights differ between steps {where}: the stored W, or under mixed the bf16 "
             "copy the forward casts from the f32 master (jaxdt members only).")
  return note


def _ranged(s: dict, name: str) -> Optional[float]:
  """A figure as a number to range over: a milestone not reached counts as +inf (it lies
  beyond every step of the run), any other missing figure as None (left out)."""
  v = figure(s, name)
  if v is None and name.startswith("frozen_") and s.get("steps"):
    return float("inf")
  return None if v is None else float(v)


def _shown(v: float, name: str, steps: int) -> str:
  return f"> {steps:,}" if v == float("inf") else _cell(int(v) if float(v).is_integer()
                                                         and name not in DIGITS else v, name)


def range_markdown(table, summaries: dict) -> str:
  """Is each group inside the reference group's range? Per figure: the reference group's
  min–max over its members in, and for every other group how many of its members fall
  inside it (ends included), the ones outside named with their side."""
  figures = table.figures or FIGURES
  ref_names = dict(table.groups)[table.reference]
  ref = [summaries[n] for n in ref_names if n in summaries]
  head = (f"Inside the range of {table.reference} ({len(ref)}/{len(ref_names)} in)? Per "
          "figure: its min–max, and per group the members inside it (ends included); a "
          "milestone not reached counts as later than every step.")
  if not ref:
    return head + " Not yet: none of its members is in."
  n = len(ref)
  head += (f" Calibration: a further draw of the same law lands inside the range of {n} "
           f"with probability (n-1)/(n+1) = {(n - 1) / (n + 1):.2f} (ties aside), so "
           "members outside are expected even with no difference. Under each group, the "
           "exact two-sided rank-sum (Mann-Whitney) p against the reference, counted over "
           "every split of the pooled members (midranks for ties), with the smallest p the "
           "two sizes allow: a p at that minimum means the groups do not overlap at all.")
  steps = max(s.get("steps") or 0 for s in ref)
  ref_vals = {f: [v for s in ref if (v := _ranged(s, f)) is not None] for f in figures}
  bounds = {f: (min(x), max(x)) if x else None for f, x in ref_vals.items()}
  out = [head, "", "| group | " + " | ".join(HEADS[f] for f in figures) + " |",
         "|---|" + "---|" * len(figures),
         f"| {table.reference} range | " + " | ".join(
             "–" if bounds[f] is None else
             f"{_shown(bounds[f][0], f, steps)} – {_shown(bounds[f][1], f, steps)}"
             for f in figures) + " |"]
  for label, names in table.groups:
    if label == table.reference:
      continue
    got = [summaries[n] for n in names if n in summaries]
    if not got:
      out.append(f"| {label} | " + " | ".join("not yet" for _ in figures) + " |")
      continue
    cells, got_vals = [], {}
    for f in figures:
      vals = [(v, s.get("steps") or steps) for s in got if (v := _ranged(s, f)) is not None]
      got_vals[f] = [v for v, _ in vals]
      if bounds[f] is None or not vals:
        cells.append("–")
        continue
      lo, hi = bounds[f]
      outside = [f"{_shown(v, f, t)} {'below' if v < lo else 'above'}"
                 for v, t in vals if not lo <= v <= hi]
      cells.append(f"{len(vals) - len(outside)}/{len(vals)}"
                   + (f" ({', '.join(outside)})" if outside else ""))
    out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append(_rank_row(label, got_vals, ref_vals, figures))
  return "\n".join(out)


def _rank_row(label: str, got_vals: dict, ref_vals: dict, figures: Sequence[str]) -> str:
  """Per figure, the exact two-sided rank-sum p of a group's values against the
  reference's (both as `_ranged` gives them)."""
  cells = []
  for f in figures:
    t = ranktest.rank_sum(got_vals[f], ref_vals[f])
    cells.append("–" if t is None else f"{t.p:.3f} (min {t.p_min:.3f})")
  return f"| {label}: rank-sum p | " + " | ".join(cells) + " |"


def _plot(table, summaries: dict) -> Optional[bytes]:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  motion = any(f.endswith("_bf16") for f in (table.figures or ()))
  fig, axes = plt.subplots(1, 2 if motion else 1, figsize=(14 if motion else 8, 4.5))
  axes = np.atleast_1d(axes)
  _panel(axes[0], table, summaries, _frozen_curve, 0.8, "lower right", dict(
      xlabel="step", ylabel="dead rows frozen (‖ΔW′_i‖₂ < 0.1)", ylim=(0, 1.02),
      title=table.title[:80]))
  if motion:  # the dead rows' motion per step in bf16 cells, beside the frozen share
    _panel(axes[1], table, summaries, _motion_curve, 0.9, "upper right", dict(
        xlabel="step", yscale="log", ylabel="dead rows' mean ‖ΔW′‖₂, bf16 cells (50-step means)",
        title="motion per step, in bf16 cells"))
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  plt.close(fig)
  return buf.getvalue()


def _panel(ax, table, summaries: dict, curve, lw: float, loc: str, axis: dict) -> None:
  """Each member's `curve(summary)` ((x, y), or None to skip it), one colour and one legend
  entry (at `loc`) per group; `axis` holds the axes' labels, scale and limits."""
  for i, (label, names) in enumerate(table.groups):
    shown = False
    for name in names:
      xy = None if summaries.get(name) is None else curve(summaries[name])
      if xy is None:
        continue
      ax.plot(*xy, lw=lw, color=f"C{i % 10}", alpha=0.8, label=None if shown else label)
      shown = True
  ax.set(**axis)
  ax.legend(fontsize=7, loc=loc)


def _frozen_curve(s: dict):
  """Per step, the share of the dead rows frozen."""
  if not s.get("n_frozen") or not s.get("rows"):
    return None
  f = np.asarray(s["n_frozen"], np.float64) / s["rows"]
  return np.arange(1, f.size + 1), f


def _motion_curve(s: dict):
  """The dead rows' mean ‖ΔW′‖₂ per step in bf16 cells, as 50-step means (none where 0)."""
  if not s.get("dwp_l2_mean"):
    return None
  x = np.asarray([np.nan if v is None else v for v in s["dwp_l2_mean"]], np.float64)
  x = x * _bf16_cells(s)
  n = x.size // 50 * 50
  y = np.nanmean(x[:n].reshape(-1, 50), axis=1)
  return np.arange(25, n, 50), np.where(y > 0, y, np.nan)


BEGIN, END = "<!-- study tables: begin (generated by run.py --study; do not edit) -->", \
    "<!-- study tables: end -->"


def _into_document(docs_dir: str, body: str) -> Optional[str]:
  """Replaces the block between BEGIN and END in `<docs_dir>.md` (docs/findings.md for
  docs/findings/), links made relative to it; None when there is no such document."""
  doc = docs_dir.rstrip(os.sep) + ".md"
  try:
    text = open(doc, encoding="utf-8").read()
  except OSError:
    return None
  if BEGIN not in text or END not in text:
    return None
  sub = os.path.basename(docs_dir.rstrip(os.sep))
  body = body.replace("](", f"]({sub}/")
  head, rest = text.split(BEGIN, 1)
  disk.atomic_write_text(doc, head + BEGIN + "\n" + body + "\n" + END + rest.split(END, 1)[1])
  return doc


def write_tables(study, docs_dir: str, log: Callable[[str], None] = print) -> list:
  """tables.md and <table>.png in docs_dir from the member summaries there, and the same
  tables generated into `<docs_dir>.md` between its markers; returns the paths written."""
  summaries = {m.name: s for m in study.members
               if (s := read_member(docs_dir, m.name)) is not None
               and s.get("declared") == m.declared()}
  os.makedirs(docs_dir, exist_ok=True)
  parts = [f"<!-- generated by `python run.py --study={study.name}`; do not edit -->",
           f"## Study {study.name}: {len(summaries)}/{len(study.members)} members in", ""]
  written = []
  for table in study.tables:
    parts += [table_markdown(table, summaries), ""]
    png = _plot(table, summaries)
    if png is not None:
      path = os.path.join(docs_dir, f"{table.name}.png")
      disk.atomic_write_bytes(path, png)
      parts += [f"![{table.name}]({table.name}.png)", ""]
      written.append(path)
  path = os.path.join(docs_dir, TABLES_FILE)
  disk.atomic_write_text(path, "\n".join(parts))
  doc = _into_document(docs_dir, "\n".join(parts[1:]))
  log(f"tables: {path}{' and ' + doc if doc else ''} ({len(summaries)}/{len(study.members)} "
      "members in)")
  return [path] + written + ([doc] if doc else [])
