"""The printed summary, summary.json and plots of an analysed trajectory.

`analyze(path)` runs `jaxdt.analysis.analyze` (one streaming pass), prints the
lab-style blocks (the seed's FIMBULWINTER CHECK and STILLNESS PERIOD ANALYSIS
verbatim, then the other analyses in the same style), and writes
`summary.json` and five PNGs next to the file or into `analysis_dir`.
`compare(a, b)` prints the cross-run (cross-backend) comparison of
`jaxdt.compare.compare`.

Plots use matplotlib's Agg backend, imported only when plotting.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional

import numpy as np

from jaxdt import analysis
from jaxdt import store
from jaxdt import compare as compare_lib

SUMMARY_FILE = "summary.json"
PLOT_FILES = {"loss": "loss.png", "frozen_fraction": "frozen_fraction.png",
              "freeze_steps": "freeze_steps.png", "phases": "phases.png",
              "centroid": "centroid.png"}
RULE = "=" * 60
PHASES = ("Early", "Midlife", "Late", "Fimbulwinter")


def _block(title: str, lines: list) -> str:
  return "\n".join([RULE, title, RULE] + lines)


def _pct(x: Optional[float], digits: int = 1) -> str:
  return "n/a" if x is None else f"{x:.{digits}%}"


def _num(x, fmt: str = "") -> str:
  return "n/a" if x is None else format(x, fmt)


def format_header(s: dict) -> str:
  """What was analysed: file, layout, sizes, conventions."""
  lines = [f"Layout: {s['layout']} ({', '.join(s['keys'])})",
           f"Steps: {s['steps']}; rows analysed: {s['rows']} of {s['rows_recorded']} recorded; "
           f"hidden {s['hidden']}; W: {s['w_format'] or 'absent'}"]
  if s["delta_w_prime"]:
    lines.append(f"ΔW′: {s['delta_w_prime']}; motion: ‖ΔW′_i‖₂ ≥ {s['motion_threshold']}; "
                 "steps are 1-based (ΔW′ row t-1 = step t)")
  lines += [f"Note: {n}" for n in s["notes"]]
  return _block(f"ANALYSIS: {s['file']}", lines)


def format_loss(x: dict) -> str:
  lines = [f"Loss[{t}]: {v:.4f}" for t, v in x["at"].items()]
  if x["min"] is not None:
    lines.append(f"Min loss: {x['min']:.4f} at step {x['min_step']}")
  if x["nonfinite_steps"]:
    lines.append(f"Non-finite loss at {x['nonfinite_steps']} steps")
  return _block("LOSS", lines)


def format_global_freeze(g: dict) -> str:
  """`1.29c`'s global freeze fraction and freeze/thaw cycles."""
  lines = [f"Frozen steps: {g['frozen_steps']}/{g['total_steps']} ({_pct(g['fraction'])})",
           f"Freeze/thaw cycles: {g['cycles']}"]
  if g["longest"]:
    lg = g["longest"]
    lines += [f"Longest run: t={lg['start']}→{lg['end']} ({lg['length']} steps)"
              + (", to the end of the run" if lg["end"] == g["total_steps"] else ""),
              f"Mean run: {g['mean_run']:.1f} steps, median {g['median_run']:.1f}",
              f"First frozen step: t={g['first_frozen_step']}"]
  lines.append("Frozen fraction by window:")
  lines += [f"  t={w['start']}–{w['end']}: {w['fraction']:.1%}" for w in g["windows"]]
  return _block("GLOBAL FREEZE (W[t] == W[t-1] bitwise for every row)", lines)


def format_frozen_fraction(f: dict, threshold: float, n: int) -> str:
  """Per-step frozen fraction milestones (phase_transitions*) and re-heating."""
  first = f["first_frozen_token_step"]
  lines = [f"First frozen token: step {first}" if first else "No token is ever frozen"]
  for p, t in f["milestones"].items():
    lines.append(f"{p} frozen at step {t}" if t else f"{p} frozen: never reached")
  moving = (f"step {t}: {k}/{n}" for t, k in f["moving_at"].items())
  lines.append("Still moving: " + "; ".join(moving))
  r = f["reheat"]
  if r["transitions"]:
    lines.append(f"Re-heating: {r['cold_to_hot']:,} cold→hot ({r['cold_to_hot_fraction']:.2%}) vs "
                 f"{r['hot_to_cold']:,} hot→cold ({r['hot_to_cold_fraction']:.2%}) of "
                 f"{r['transitions']:,} token-step transitions")
  return _block(f"PER-STEP FROZEN FRACTION (‖ΔW′_i‖₂ < {threshold})", lines)


def _stat_line(label: str, x: Optional[dict], width: int = 34) -> str:
  if x is None:
    return f"  {label:<{width}} none"
  return (f"  {label:<{width}} median {x['median']:.0f}, mean {x['mean']:.1f}, "
          f"range {x['min']}–{x['max']} ({x['count']} tokens)")


def format_lifecycle(x: dict, hidden: int) -> str:
  """Lifecycle phases, last-exit rule (docs/definitions.md §Lifecycle phases), plus the second vocabulary's boundaries."""
  b, d = x["boundaries"], x["durations"]
  lines = ["Last-exit steps (a row's phase ends at the last step it meets the criterion):",
           _stat_line(f"Last Early (‖ΔW′‖₂ > √{hidden})", b["last_early"]),
           _stat_line("Last Midlife (L∞ > 1)", b["last_midlife"]),
           _stat_line("Last motion (L1 > 0)", b["last_motion"]),
           _stat_line("Fimbulwinter onset (L1 = 0 after)", b["fimbulwinter_onset"])]
  never = [f"{k[:-len('_never')].replace('_', ' ')}: {v}" for k, v in b.items()
           if k.endswith("_never") and v]
  if never:
    lines.append("  Never met: " + ", ".join(never))
  lines.append("Phase durations (steps):")
  lines += [_stat_line(p, d[p.lower()]) for p in PHASES]
  if "last_hypernova" in x:
    lines += ["Other vocabulary (docs/definitions.md §Lifecycle phases):",
              _stat_line("Last Hypernova (‖ΔW′‖₂ > 1000)", x["last_hypernova"]),
              _stat_line("Last Spherical (L1 > 1)", x["last_spherical"]),
              _stat_line("Stumbling duration", x["stumbling"])]
  return _block("LIFECYCLE PHASES (last-exit rule)", lines)


def format_centroid(c: dict) -> str:
  """Centroid drift and cloud radius (docs/definitions.md §Centroid drift)."""
  lines = [f"Centroid: {c['source']}",
           f"‖c‖: {c['norm_start']:.6f} → {c['norm_end']:.6f}",
           f"Path length {c['path_length']:.6f}; crow-flies {c['crow_flies']:.6f}; "
           f"efficiency {_num(c['efficiency'], '.4f')}",
           f"Consecutive-step cos(Δc): mean {_num(c['cos_mean'], '.4f')} "
           f"(std {_num(c['cos_std'], '.4f')}) over {c['cos_pairs']} pairs",
           f"L2/L1 of the total displacement: {_num(c['l2_over_l1'], '.4f')} "
           f"(uniform baseline {c['uniform_baseline']:.4f})",
           f"Last centroid motion: step {c['last_motion_step']}"]
  if "radius_start" in c:
    lines += [f"Cloud radius (mean ‖w_i − c‖): {c['radius_start']:.6f} → {c['radius_end']:.6f} "
              f"({_num(c['radius_ratio'], '.4f')}×)",
              f"Radius from origin (mean ‖w_i‖): {c['radius_origin_start']:.6f} → "
              f"{c['radius_origin_end']:.6f}",
              "Liftoff (origin outside the bounding sphere): "
              + (f"step {c['liftoff_step']}" if c["liftoff_step"] is not None else "never")]
  return _block("CENTROID DRIFT AND CLOUD RADIUS", lines)


def format_accounting(a: dict) -> str:
  """Adam accounting (docs/definitions.md §Adam accounting), with Thimble 1's per-step lines."""
  T = a["steps"]
  lines = [f"Source: {a['source']}"]
  if a.get("seed_validation"):  # Thimble 1/6: the seed's own cell, with exact replay
    lines += ["", a["seed_validation"], ""]
  else:
    lines += [f"t={x['t']:3d}: ratio={x['ratio']:.3f}, cosine={x['cosine']:+.3f}"
              for x in a["samples"]]
  lines += [
      f"Exact replay (torch's bf16 arithmetic): {a['replay_exact_steps']}/{T} steps bit-exact; "
      f"match mean {_num(a['replay_match_mean'], '.6f')}, min {_num(a['replay_match_min'], '.6f')}",
      f"Textbook f32 update vs realized ΔW: mean ratio {_num(a['ratio_mean'], '.3f')}, "
      f"mean cosine {_num(a['cosine_mean'], '.3f')}",
      f"{a['ratio_within_1pct']}/{T} steps with ratio in [0.99, 1.01]; "
      f"{a['cosine_above_0_99']}/{T} with cosine > 0.99",
      f"Swallowed (textbook ≠ 0, realized = 0): mean {_pct(a['swallowed_mean'])} of elements",
      f"Max |realized − textbook|: {_num(a['max_ulp_error'], '.1f')} ULP"]
  return _block("ADAM ACCOUNTING", lines)


def format_sanity_check(x: dict) -> str:
  """Thimble 8's SANITY CHECK block (its labels said 3500; we print the last step)."""
  T = x["steps"]
  rule = "=" * 50
  lines = [rule, "SANITY CHECK", rule, f"Mean |W[{T}] - W[0]|: {x['mean_abs_dw']:.6f}",
           f"Mean |m[{T}]|: {x['mean_abs_m']:.6f}", f"Mean |v[{T}]|: {x['mean_abs_v']:.6f}"]
  if x["loss_1"] is not None:
    lines += [f"Loss[1]: {x['loss_1']:.4f}", f"Loss[{T}]: {x['loss_T']:.4f}"]
  lines += [f"m[0] all zero: {x['m0_zero']}", f"v[0] all zero: {x['v0_zero']}", "",
            "Sanity check complete!"]
  return "\n".join(lines)


def format_summary(s: dict, header: bool = True) -> str:
  """The whole printed summary: every block the file supports, then what was skipped."""
  blocks = [format_header(s)] if header else []
  if s.get("diverged_at_step") is not None:
    blocks.append(_block("DIVERGED", [
        f"The loss is non-finite from step {s['diverged_at_step']} on (inf or NaN): the run "
        "diverged.", f"The analyses below cover steps 0..{s['steps']}, before it."]))
  if s.get("fimbulwinter_check"):  # the seed's two blocks first, in its order
    blocks.append(analysis.format_fimbulwinter_check(s["fimbulwinter_check"]))
  if "stillness" in s:
    blocks.append(analysis.format_stillness(s["stillness"]["runs"]))
  if "loss" in s:
    blocks.append(format_loss(s["loss"]))
  if "global_freeze" in s:
    blocks.append(format_global_freeze(s["global_freeze"]))
  if "frozen_fraction" in s:
    blocks.append(format_frozen_fraction(s["frozen_fraction"], s["motion_threshold"], s["rows"]))
  if "lifecycle" in s:
    blocks.append(format_lifecycle(s["lifecycle"], s["hidden"]))
  if "centroid" in s:
    blocks.append(format_centroid(s["centroid"]))
  if "accounting" in s:
    blocks.append(format_accounting(s["accounting"]))
  if "sanity_check" in s:
    blocks.append(format_sanity_check(s["sanity_check"]))
  if s["skipped"]:
    blocks.append("\n".join(f"Skipped: {x['analysis']} ({x['reason']})" for x in s["skipped"]))
  return "\n\n".join(blocks)


def write_summary(summary: dict, out_dir: str) -> str:
  """Writes `out_dir/summary.json` (strict JSON: NaN and inf become null)."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, SUMMARY_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(store.json_ready(summary), f, indent=2, allow_nan=False)
    f.write("\n")
  return path


# --- Plots --------------------------------------------------------------------


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  return plt


def _save(fig, out_dir: str, name: str) -> str:
  path = os.path.join(out_dir, PLOT_FILES[name])
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  fig.clf()
  _pyplot().close(fig)
  return path


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
  ax.plot(t, f, lw=0.8, label=f"rows with ‖ΔW′‖₂ < {summary['motion_threshold']}")
  if "global_frozen" in series:
    g = series["global_frozen"]
    ax.fill_between(t, 0, 0.04, where=g, step="mid", color="k", alpha=0.6,
                    label="global freeze (W bitwise unchanged)")
  for p, step in summary["frozen_fraction"]["milestones"].items():
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
  top.stackplot(t, pops.T, labels=PHASES, step="mid")
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
    if missing or summary["steps"] == 0:
      skipped.append((name, f"no {', '.join(missing) or 'steps'}"))
      continue
    written.append(fn(plt, series, summary, out_dir))
  return written, skipped


# --- Entry points -------------------------------------------------------------


def output_dir(trajectory: str, analysis_dir: Optional[str]) -> str:
  """Where summary.json and the PNGs go: analysis_dir, else the file's folder."""
  return analysis_dir or os.path.dirname(os.path.abspath(trajectory))


def analyze(path: str, analysis_dir: Optional[str] = None, *, block_steps: Optional[int] = None,
            plots: bool = True, header: bool = True,
            echo: Callable[[str], None] = print,
            seed_validation: Optional[str] = None) -> dict:
  """Analyses a run folder or trajectory file: prints, writes summary.json and PNGs.

  Args:
    path: a run folder or .safetensors file (ours or the lab's layout).
    analysis_dir: where to write (default: beside the file).
    block_steps: steps per streamed block (default: about 64 MB of work).
    plots: write the PNGs.
    header: print the ANALYSIS header block.
    echo: where printed text goes.
    seed_validation: the seed's Thimble 1 accounting cell output
      (`verify.format_accounting`), printed in place of the per-step sample
      lines so the same figures are not printed twice.

  Returns:
    The summary dict (as saved, plus "outputs": the files written).

  Raises:
    analysis.AnalysisError: PATH is not an analysable trajectory.
  """
  summary, series = analysis.analyze(path, block_steps=block_steps)
  if seed_validation and "accounting" in summary:
    summary["accounting"]["seed_validation"] = seed_validation
  out = output_dir(summary["file"], analysis_dir)
  written, skipped = write_plots(series, summary, out) if plots else ([], [])
  summary["skipped"] += [{"analysis": f"plot {n}", "reason": why} for n, why in skipped]
  summary["outputs"] = {"summary": os.path.join(out, SUMMARY_FILE), "plots": written}
  write_summary(summary, out)
  echo(format_summary(summary, header=header))
  echo(f"\nWrote {summary['outputs']['summary']} and {len(written)} plots to {out}")
  return summary


def _run_line(label: str, r: dict) -> str:
  flags = r.get("xla_flags")
  return (f"{label}: {r['file']} ({r['steps']} steps, {r['rows']} rows)\n"
          f"   backend {r.get('backend') or '?'} ({r.get('device_kind') or '?'}), "
          f"{r.get('cpu_threads') or '?'} CPU threads, jax {r.get('jax_version') or '?'}, "
          f"XLA_FLAGS {flags!r}" if flags is not None else
          f"{label}: {r['file']} ({r['steps']} steps, {r['rows']} rows)\n"
          "   no metadata.json: backend, threads and XLA_FLAGS unknown")


def format_compare(c: dict) -> str:
  """The comparison in the style of Thimble 9's VERIFICATION block, with a verdict line."""
  T = c["steps_compared"]
  lines = [RULE, "COMPARISON: A vs B", RULE, _run_line("A", c["a"]), _run_line("B", c["b"]),
           f"Steps compared: 0..{T}" + ("" if c["a"]["steps"] == c["b"]["steps"] else
                                       f" (A has {c['a']['steps']}, B has {c['b']['steps']})"),
           "", f"{'key':<20} {'first diff':>11} {'identical elements':>18} "
           f"{'identical bits':>14} {'max |diff|':>11}"]
  for k in c["keys"]:
    if not k["comparable"]:
      lines.append(f"{k['key']:<20} not comparable: {k['reason']}")
      continue
    first = ("-" if k["identical"] else "static") if k["first_diff_step"] is None \
        else f"step {k['first_diff_step']}"
    lines.append(f"{k['key']:<20} {first:>11} {k['identical_element_fraction']:>18.6%} "
                 f"{k['identical_bit_fraction']:>14.6%} {k['max_abs_diff']:>11.4g}")
  for side in ("a", "b"):
    if c[f"only_in_{side}"]:
      lines.append(f"Only in {side.upper()}: {', '.join(c[f'only_in_{side}'])}")
  loss = c["loss"]
  if loss is not None:
    where = f" at step {loss['step']}" if loss["step"] else ""
    lines += ["", f"Largest |loss difference|: {loss['max_abs_diff']:.6f}{where} "
              f"({loss['steps_differing']} steps differ)"]
  if c.get("config_differences"):
    lines += ["", "The two runs' configs differ (so their bits are not expected to match):"]
    lines += [f"  {d}" for d in c["config_differences"]]
  lines += ["", "Freeze statistics (A → B, difference):"]
  fa, fb, fd = c["freeze"]["a"], c["freeze"]["b"], c["freeze"]["diff"]
  for k in fa:
    d = "" if fd[k] is None else f" ({fd[k]:+g})"
    lines.append(f"  {k.replace('_', ' ')}: {_num(fa[k], 'g')} → {_num(fb[k], 'g')}{d}")
  if c["identical"]:
    verdict = (f"VERDICT: IDENTICAL: every common key is bitwise equal over steps 0..{T}")
  elif c["first_difference"]:
    fdiff = c["first_difference"]
    verdict = (f"VERDICT: DIFFERENT: first difference at step {fdiff['step']} "
               f"(in {fdiff['key']})")
    w = next((k for k in c["keys"] if k["key"] == "W"), None)
    if fdiff["key"] != "W" and w is not None and w["comparable"]:  # e.g. only diagnostics differ
      verdict += ("; W bitwise identical" if w["identical"] else
                  f"; W first differs at step {w['first_diff_step']}")
  else:
    bad = [k["key"] for k in c["keys"] if k["identical"] is False]
    verdict = f"VERDICT: DIFFERENT: {', '.join(bad) or 'no common keys'}"
  return "\n".join(lines + ["", verdict])


def compare(path_a: str, path_b: str, analysis_dir: Optional[str] = None, *,
            block_steps: Optional[int] = None, echo: Callable[[str], None] = print) -> dict:
  """Compares two runs, prints the table and verdict; writes compare.json into analysis_dir.

  Raises:
    analysis.AnalysisError: either PATH is not an analysable trajectory.
  """
  result = compare_lib.compare(path_a, path_b, block_steps=block_steps)
  echo(format_compare(result))
  if analysis_dir:
    os.makedirs(analysis_dir, exist_ok=True)
    with open(os.path.join(analysis_dir, "compare.json"), "w", encoding="utf-8") as f:
      json.dump(store.json_ready(result), f, indent=2, allow_nan=False)
      f.write("\n")
  return result
