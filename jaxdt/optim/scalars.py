"""AdamW's per-step scalars as torch computes them: tabulated on the host, looked up traced.

torch's `_single_tensor_adam` computes −lr/(1−b1^t), √(1−b2^t) and the bias corrections
in float64 from its f32 step counter and hands them to its kernels as f32. They are
tabulated once per hyperparameter set (constant after ~17k steps for b2 = 0.999) and
looked up with the traced step (`lookup_scalars`), so the update runs under `jit` and
inside `lax.scan` with no host callback. `jaxdt.optim.adamw` re-exports every name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdt.config import OptimConfig

# Columns of the per-step scalar table.
NEG_STEP_SIZE, BC2_SQRT, BC1, BC2 = range(4)
_MAX_TABLE = 1 << 20


def torch_step_scalars(hp: OptimConfig, t: int) -> np.ndarray:
  """The per-step scalars of torch's `_single_tensor_adam`, in float64, as f32.

  Args:
    hp: hyperparameters.
    t: the 1-based step (torch's `step` after its increment).

  Returns:
    f32 [4]: −lr/(1−b1^t), √(1−b2^t), 1−b1^t, 1−b2^t (see the column constants).
  """
  step = float(t)  # torch reads its f32 step tensor back as a Python float
  bias_correction1 = 1 - hp.b1**step
  bias_correction2 = 1 - hp.b2**step
  step_size = hp.learning_rate / bias_correction1
  bias_correction2_sqrt = bias_correction2**0.5
  return np.array(
      [-step_size, bias_correction2_sqrt, bias_correction1, bias_correction2],
      np.float32)


@functools.lru_cache(maxsize=64)
def scalar_table(hp: OptimConfig) -> np.ndarray:
  """Rows t = 0..T of `torch_step_scalars`; row T serves every t >= T.

  T is the first step after which every f32 scalar stays at its limit (the
  float64 powers only shrink, so the f32 values are then constant).

  Args:
    hp: hyperparameters.

  Returns:
    f32 [T + 1, 4]; row 0 is unused (t starts at 1).
  """
  limit = np.array([-hp.learning_rate, 1.0, 1.0, 1.0], np.float32)
  rows = [np.full(4, np.nan, np.float32)]
  for t in range(1, _MAX_TABLE):
    row = torch_step_scalars(hp, t)
    rows.append(row)
    # b^t is below 2^-60 here, so every later row rounds to the same f32 limit.
    if np.array_equal(row, limit) and hp.b1**t < 2.0**-60 and hp.b2**t < 2.0**-60:
      return np.stack(rows)
  raise ValueError(
      f"b1={hp.b1}, b2={hp.b2}: bias corrections do not settle within "
      f"{_MAX_TABLE} steps; use betas further from 1")


def lookup_scalars(t, table) -> jax.Array:
  """The f32 [4] scalars of a traced 1-based step t from `table` (`scalar_table`, or a sweep
  member's traced copy; padded with copies of its last row it gives the same values)."""
  idx = jnp.clip(jnp.asarray(t, jnp.int32), 0, jnp.shape(table)[0] - 1)
  return jnp.asarray(table)[idx]
