"""The lab's analyses (REFERENCE §3), in numpy, streaming over trajectory files.

Each analysis is a pure function of arrays plus a small streaming driver that
reads a file in row blocks, so files larger than memory work. Printing lives
in `report`-style functions that reproduce the seeds' printed text.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

BLOCK_BYTES = 64 << 20  # rows read per block: about this many bytes


def torch_median(x: np.ndarray) -> float:
  """torch.median: the lower of the two middle values for an even count."""
  s = np.sort(np.asarray(x).ravel())
  return float(s[(s.size - 1) // 2])


def fimbulwinter_check(last_motion_step: np.ndarray, total_steps: int) -> dict:
  """Crucible 1's FIMBULWINTER CHECK numbers (REFERENCE §3.2)."""
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


def step_blocks(n_steps: int, row_bytes: int) -> Iterator[tuple]:
  """(start, stop) blocks of steps of about BLOCK_BYTES each."""
  per = max(1, BLOCK_BYTES // max(row_bytes, 1))
  for s in range(0, n_steps, per):
    yield s, min(n_steps, s + per)


def any_motion_per_step(reader, threshold: float = 0.1, key: str = "delta_W_prime") -> np.ndarray:
  """bool [T]: did any row move at step t (‖ΔW′_i‖₂ ≥ threshold), streamed from a file."""
  n, rows, dim = reader.shape(key)
  out = np.zeros(n, bool)
  for s, e in step_blocks(n, rows * dim * 4):
    d = reader.rows(key, s, e).astype(np.float32)
    out[s:e] = (np.sqrt(np.sum(d * d, axis=2)) >= threshold).any(axis=1)
  return out


def stillness_runs(any_motion: np.ndarray) -> list:
  """Maximal runs of steps with no motion, longest first (the seed's loop)."""
  runs, current = [], 0
  for m in np.asarray(any_motion, bool):
    if not m:
      current += 1
    else:
      if current > 0:
        runs.append(current)
      current = 0
  if current > 0:
    runs.append(current)
  return sorted(runs, reverse=True)


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
