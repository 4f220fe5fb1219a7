"""Thimble 1's accounting check, as the lab's notebook printed it, with the exact replay beside.

The lab's Thimble 1 notebook ("Quick Validation: Test Adam Accounting") compared,
at t = 1, 10, 50, 100, 200, 500, 800, the observed ΔW with the continuous f32
AdamW update built from the recorded m and v, and printed
`t=  1: ratio=1.012, cosine=+1.000`. `accounting_rows` recomputes that from the
stored W, momentum_W and variance_W, and next to it the exact replay of
torch's bf16 arithmetic (`jaxdt.optim.accounting.replay`), which must give W[t]
bit for bit. Rows are read one step at a time from disk.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxdt import config as config_lib
from jaxdt.analysis import checks
from jaxdt.analysis import trajectory
from jaxdt.io import tensorfile
from jaxdt.numerics import lattice
from jaxdt.optim import accounting
from jaxdt.optim import adamw


class AccountingRow(NamedTuple):
  """One test step of the lab's accounting check, and our exact replay beside it."""

  t: int
  ratio: float  # ‖textbook ΔW‖ / ‖observed ΔW‖
  cosine: float  # cos(textbook ΔW, observed ΔW)
  replay_equal: int  # elements whose exact replay equals W[t] bitwise
  total: int


def accounting_row(reader: tensorfile.TrajectoryReader, t: int, hp: config_lib.OptimConfig) -> AccountingRow:
  """The lab's ratio and cosine at step t, and the exact replay's bitwise match.

  The lab's way (Thimble 1; docs/definitions.md §Adam accounting): observed ΔW = W[t] − W[t-1] in the stored dtype
  (a bf16 subtraction, rounded to bf16), then `.float()`; computed ΔW is the
  continuous f32 AdamW step from the recorded m_t, v_t
  (`accounting.textbook_delta`; it writes the decay as lr·wd·W where the lab
  wrote wd·W, the same at Thimble 1's wd = 0). Norms and the dot product run
  over every recorded element.

  Args:
    reader: a trajectory with W, momentum_W, variance_W (Thimble 1 or 6 layout).
    t: the step (1 <= t < rows of W).
    hp: the run's AdamW hyperparameters.

  Returns:
    The AccountingRow.
  """
  rule = adamw.rule(hp)
  w_prev, w_next = trajectory.read_state(reader, "W", t - 1, t + 1)
  m = trajectory.read_state(reader, "momentum_W", t, t + 1)[0].astype(w_prev.dtype)
  v = trajectory.read_state(reader, "variance_W", t, t + 1)[0].astype(w_prev.dtype)
  measured = (w_next.astype(np.float32) - w_prev.astype(np.float32)).astype(w_prev.dtype)
  measured = measured.astype(np.float64)
  computed = np.asarray(accounting.textbook_delta(jnp.asarray(w_prev), jnp.asarray(m),
                                                  jnp.asarray(v), t, rule), np.float64)
  measured_norm, computed_norm = np.linalg.norm(measured), np.linalg.norm(computed)
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = computed_norm / measured_norm
    cosine = float(computed.ravel() @ measured.ravel()) / (computed_norm * measured_norm)
  replayed = np.asarray(accounting.replay(jnp.asarray(w_prev), jnp.asarray(m), jnp.asarray(v),
                                          t, rule))
  equal = int((lattice.np_bits(replayed) == lattice.np_bits(w_next)).sum())
  return AccountingRow(t, float(ratio), float(cosine), equal, int(w_next.size))


def accounting_rows(reader: tensorfile.TrajectoryReader, hp: config_lib.OptimConfig,
                    steps=checks.ACCOUNTING_SAMPLE_STEPS) -> tuple:
  """`accounting_row` at each of `steps` the file holds (the lab skips t > NUM_STEPS)."""
  last = reader.shape("W")[0] - 1
  return tuple(accounting_row(reader, t, hp) for t in steps if 1 <= t <= last)


def format_accounting(rows) -> str:
  """The lab's validation cell output, with the exact replay beside each line."""
  lines = ["Validating Adam accounting...", ""]
  for r in rows:
    lines.append(f"t={r.t:3d}: ratio={r.ratio:.3f}, cosine={r.cosine:+.3f}   "
                 f"exact replay: {r.replay_equal:,} / {r.total:,} bitwise "
                 f"({r.replay_equal / r.total:.3%})")
  lines += ["", "(Ratio should be ~1.0, cosine should be ~1.0 for perfect match)",
            "(Exact replay: torch's bf16 AdamW arithmetic from W[t-1], m_t, v_t; "
            "100% = W[t] reproduced bit for bit)", "", "✓ Validation complete"]
  return "\n".join(lines)


def has_accounting_inputs(reader: tensorfile.TrajectoryReader) -> bool:
  """Whether a trajectory holds what `accounting_rows` reads (Thimble 1/6 layouts)."""
  return {"W", "momentum_W", "variance_W"} <= set(reader.keys())
