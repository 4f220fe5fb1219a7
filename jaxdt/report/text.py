"""The printed analysis: the lab-style blocks of a `metrics.Summary` and of a comparison.

Every block formats one typed result (`jaxdt.analysis.freeze`, `phases`,
`checks`); the lab's FIMBULWINTER CHECK and STILLNESS PERIOD ANALYSIS are
printed as the Crucible 1 notebook printed them.
"""

from __future__ import annotations

from typing import Optional

from jaxdt.analysis import checks
from jaxdt.analysis import freeze
from jaxdt.analysis import metrics
from jaxdt.analysis import phases

RULE = "=" * 60
PHASES = ("Early", "Midlife", "Late", "Fimbulwinter")


def _block(title: str, lines: list) -> str:
  return "\n".join([RULE, title, RULE] + lines)


def _pct(x: Optional[float], digits: int = 1) -> str:
  return "n/a" if x is None else f"{x:.{digits}%}"


def _num(x, fmt: str = "") -> str:
  return "n/a" if x is None else format(x, fmt)


def format_fimbulwinter_check(r: freeze.FimbulwinterCheck) -> str:
  """The lab's printed FIMBULWINTER CHECK block (Crucible 1)."""
  lines = ["=" * 60, "FIMBULWINTER CHECK", "=" * 60,
           f"Last motion (any token): step {r.global_last_motion}",
           f"Fimbulwinter duration: {r.fimbulwinter_duration} steps",
           f"Fimbulwinter fraction: {r.fimbulwinter_fraction:.1%}",
           "", "Freeze time distribution:",
           f"  Earliest freeze: step {r.earliest_freeze}",
           f"  Median freeze: step {r.median_freeze:.0f}",
           f"  Latest freeze: step {r.latest_freeze}"]
  if r.never_moved > 0:
    lines += ["", f"⚠️  {r.never_moved} tokens never moved (unexpected!)"]
  else:
    lines += ["", f"✓ All {r.n_rows} tokens moved at least once"]
  return "\n".join(lines)


def format_stillness(st: freeze.Stillness) -> str:
  """The lab's printed STILLNESS PERIOD ANALYSIS block (Crucible 1)."""
  runs = st.runs
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


def format_header(s: metrics.Summary) -> str:
  """What was analysed: file, layout, sizes, conventions."""
  lines = [f"Layout: {s.layout} ({', '.join(s.keys)})",
           f"Steps: {s.steps}; rows analysed: {s.rows} of {s.rows_recorded} recorded; "
           f"hidden {s.hidden}; W: {s.w_format or 'absent'}"]
  if s.delta_w_prime:
    lines.append(f"ΔW′: {s.delta_w_prime}; motion: ‖ΔW′_i‖₂ ≥ {s.motion_threshold}; "
                 "steps are 1-based (ΔW′ row t-1 = step t)")
  lines += [f"Note: {n}" for n in s.notes]
  return _block(f"ANALYSIS: {s.file}", lines)


def format_loss(x: checks.LossSummary) -> str:
  lines = [f"Loss[{t}]: {v:.4f}" for t, v in x.at.items()]
  if x.min is not None:
    lines.append(f"Min loss: {x.min:.4f} at step {x.min_step}")
  if x.nonfinite_steps:
    lines.append(f"Non-finite loss at {x.nonfinite_steps} steps")
  return _block("LOSS", lines)


def format_global_freeze(g: freeze.GlobalFreeze) -> str:
  """`1.29c`'s global freeze fraction and freeze/thaw cycles."""
  lines = [f"Frozen steps: {g.frozen_steps}/{g.total_steps} ({_pct(g.fraction)})",
           f"Freeze/thaw cycles: {g.cycles}"]
  if g.longest:
    lg = g.longest
    lines += [f"Longest run: t={lg.start}→{lg.end} ({lg.length} steps)"
              + (", to the end of the run" if lg.end == g.total_steps else ""),
              f"Mean run: {g.mean_run:.1f} steps, median {g.median_run:.1f}",
              f"First frozen step: t={g.first_frozen_step}"]
  lines.append("Frozen fraction by window:")
  lines += [f"  t={w.start}–{w.end}: {w.fraction:.1%}" for w in g.windows]
  return _block("GLOBAL FREEZE (W[t] == W[t-1] bitwise for every row)", lines)


def format_frozen_fraction(f: freeze.FrozenFraction, threshold: float, n: int) -> str:
  """Per-step frozen fraction milestones (phase_transitions*) and re-heating."""
  first = f.first_frozen_token_step
  lines = [f"First frozen token: step {first}" if first else "No token is ever frozen"]
  for p, t in f.milestones.items():
    lines.append(f"{p} frozen at step {t}" if t else f"{p} frozen: never reached")
  moving = (f"step {t}: {k}/{n}" for t, k in f.moving_at.items())
  lines.append("Still moving: " + "; ".join(moving))
  r = f.reheat
  if r is not None and r.transitions:
    lines.append(f"Re-heating: {r.cold_to_hot:,} cold→hot ({r.cold_to_hot_fraction:.2%}) vs "
                 f"{r.hot_to_cold:,} hot→cold ({r.hot_to_cold_fraction:.2%}) of "
                 f"{r.transitions:,} token-step transitions")
  return _block(f"PER-STEP FROZEN FRACTION (‖ΔW′_i‖₂ < {threshold})", lines)


def _stat_line(label: str, x: Optional[phases.Stats], width: int = 34) -> str:
  if x is None:
    return f"  {label:<{width}} none"
  return (f"  {label:<{width}} median {x.median:.0f}, mean {x.mean:.1f}, "
          f"range {x.min}–{x.max} ({x.count} tokens)")


def format_lifecycle(x: phases.Lifecycle, hidden: int) -> str:
  """Lifecycle phases, last-exit rule (docs/definitions.md §Lifecycle phases), plus the
  second vocabulary's boundaries."""
  b, d = x.boundaries, x.durations
  lines = ["Last-exit steps (a row's phase ends at the last step it meets the criterion):",
           _stat_line(f"Last Early (‖ΔW′‖₂ > √{hidden})", b.last_early),
           _stat_line("Last Midlife (L∞ > 1)", b.last_midlife),
           _stat_line("Last motion (L1 > 0)", b.last_motion),
           _stat_line("Fimbulwinter onset (L1 = 0 after)", b.fimbulwinter_onset)]
  never = [f"{name}: {v}" for name, v in (("last early", b.last_early_never),
                                          ("last midlife", b.last_midlife_never),
                                          ("last motion", b.last_motion_never)) if v]
  if never:
    lines.append("  Never met: " + ", ".join(never))
  lines.append("Phase durations (steps):")
  lines += [_stat_line(p, getattr(d, p.lower())) for p in PHASES]
  if x.last_spherical is not None or x.last_hypernova is not None:
    lines += ["Other vocabulary (docs/definitions.md §Lifecycle phases):",
              _stat_line("Last Hypernova (‖ΔW′‖₂ > 1000)", x.last_hypernova),
              _stat_line("Last Spherical (L1 > 1)", x.last_spherical),
              _stat_line("Stumbling duration", x.stumbling)]
  return _block("LIFECYCLE PHASES (last-exit rule)", lines)


def format_centroid(c: phases.CentroidDrift) -> str:
  """Centroid drift and cloud radius (docs/definitions.md §Centroid drift)."""
  lines = [f"Centroid: {c.source}",
           f"‖c‖: {c.norm_start:.6f} → {c.norm_end:.6f}",
           f"Path length {c.path_length:.6f}; crow-flies {c.crow_flies:.6f}; "
           f"efficiency {_num(c.efficiency, '.4f')}",
           f"Consecutive-step cos(Δc): mean {_num(c.cos_mean, '.4f')} "
           f"(std {_num(c.cos_std, '.4f')}) over {c.cos_pairs} pairs",
           f"L2/L1 of the total displacement: {_num(c.l2_over_l1, '.4f')} "
           f"(uniform baseline {c.uniform_baseline:.4f})",
           f"Last centroid motion: step {c.last_motion_step}"]
  if c.radius_start is not None:
    lines += [f"Cloud radius (mean ‖w_i − c‖): {c.radius_start:.6f} → {c.radius_end:.6f} "
              f"({_num(c.radius_ratio, '.4f')}×)",
              f"Radius from origin (mean ‖w_i‖): {c.radius_origin_start:.6f} → "
              f"{c.radius_origin_end:.6f}",
              "Liftoff (origin outside the bounding sphere): "
              + (f"step {c.liftoff_step}" if c.liftoff_step is not None else "never")]
  return _block("CENTROID DRIFT AND CLOUD RADIUS", lines)


def format_accounting(a: checks.AccountingSummary) -> str:
  """Adam accounting (docs/definitions.md §Adam accounting), with Thimble 1's per-step lines."""
  T = a.steps
  lines = [f"Source: {a.source}"]
  if a.lab_validation:  # Thimble 1/6: the lab's own validation cell, with exact replay
    lines += ["", a.lab_validation, ""]
  else:
    lines += [f"t={x.t:3d}: ratio={x.ratio:.3f}, cosine={x.cosine:+.3f}" for x in a.samples]
  lines += [
      f"Exact replay (torch's bf16 arithmetic): {a.replay_exact_steps}/{T} steps bit-exact; "
      f"match mean {_num(a.replay_match_mean, '.6f')}, min {_num(a.replay_match_min, '.6f')}",
      f"Textbook f32 update vs realized ΔW: mean ratio {_num(a.ratio_mean, '.3f')}, "
      f"mean cosine {_num(a.cosine_mean, '.3f')}",
      f"{a.ratio_within_1pct}/{T} steps with ratio in [0.99, 1.01]; "
      f"{a.cosine_above_0_99}/{T} with cosine > 0.99",
      f"Swallowed (textbook ≠ 0, realized = 0): mean {_pct(a.swallowed_mean)} of elements",
      f"Max |realized − textbook|: {_num(a.max_ulp_error, '.1f')} ULP"]
  return _block("ADAM ACCOUNTING", lines)


def format_sanity_check(x: checks.SanityCheck) -> str:
  """Thimble 8's SANITY CHECK block (its labels said 3500; we print the last step)."""
  T = x.steps
  rule = "=" * 50
  lines = [rule, "SANITY CHECK", rule, f"Mean |W[{T}] - W[0]|: {x.mean_abs_dw:.6f}",
           f"Mean |m[{T}]|: {x.mean_abs_m:.6f}", f"Mean |v[{T}]|: {x.mean_abs_v:.6f}"]
  if x.loss_1 is not None:
    lines += [f"Loss[1]: {x.loss_1:.4f}", f"Loss[{T}]: {x.loss_T:.4f}"]
  lines += [f"m[0] all zero: {x.m0_zero}", f"v[0] all zero: {x.v0_zero}", "",
            "Sanity check complete!"]
  return "\n".join(lines)


def format_summary(s: metrics.Summary, header: bool = True) -> str:
  """The whole printed summary: every block the file supports, then what was skipped."""
  blocks = [format_header(s)] if header else []
  if s.diverged_at_step is not None:
    blocks.append(_block("DIVERGED", [
        f"The loss is non-finite from step {s.diverged_at_step} on (inf or NaN): the run "
        "diverged.", f"The analyses below cover steps 0..{s.steps}, before it."]))
  if s.fimbulwinter_check:  # the lab's two blocks first, in its order
    blocks.append(format_fimbulwinter_check(s.fimbulwinter_check))
  parts = ((s.stillness, format_stillness), (s.loss, format_loss),
           (s.global_freeze, format_global_freeze),
           (s.frozen_fraction, lambda f: format_frozen_fraction(f, s.motion_threshold, s.rows)),
           (s.lifecycle, lambda x: format_lifecycle(x, s.hidden)),
           (s.centroid, format_centroid), (s.accounting, format_accounting),
           (s.sanity_check, format_sanity_check))
  blocks += [fmt(block) for block, fmt in parts if block is not None]
  if s.skipped:
    blocks.append("\n".join(f"Skipped: {x.analysis} ({x.reason})" for x in s.skipped))
  return "\n\n".join(blocks)


def _run_line(label: str, r: dict) -> str:
  head = f"{label}: {r['file']} ({r['steps']} steps, {r['rows']} rows)"
  cpu = f", CPU {r['cpu_model']}" if r.get("cpu_model") else ""
  if r.get("framework") == "torch":
    return (f"{head}\n   torch {r.get('torch_version') or '?'}, "
            f"{r.get('torch_threads') or '?'} threads{cpu}")
  flags = r.get("xla_flags")
  if flags is None:
    return f"{head}\n   no metadata.json: backend, threads and XLA_FLAGS unknown"
  return (f"{head}\n   backend {r.get('backend') or '?'} ({r.get('device_kind') or '?'}), "
          f"{r.get('cpu_threads') or '?'} CPU threads, jax {r.get('jax_version') or '?'}, "
          f"XLA_FLAGS {flags!r}" + (f", GEMMs {r['gemm_path']}" if r.get("gemm_path") else "")
          + cpu)


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
  if c.get("gemm_paths_differ"):
    lines += ["", f"The runs used different GEMM paths (A: {c['a']['gemm_path']}; B: "
              f"{c['b']['gemm_path']}): the same values, summed in other orders, so their bits "
              "need not match"]
  if c.get("config_differences"):
    lines += ["", "The two runs' configs differ (so their bits are not expected to match):"]
    lines += [f"  {d}" for d in c["config_differences"]]
  div = c.get("divergence")
  if div is not None:
    lines += ["", "Divergence of B from A (W bitwise equal; ‖W_a − W_b‖ / ‖W_a − W_0‖):"]
    lines += [f"  step {x['step']:>6}: {x['equal_fraction']:>10.4%}   "
              f"{_num(x['relative_distance'], '.3e')}" for x in div["samples"]]
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
