"""Did the dead rows' bf16 weights move between two states? One measure for every policy.

The freeze record counts motion on the stored lattice: bf16's under `bf16`, `bf16_sr`
and `bf16_kahan`, f32's under `mixed` and `fp32`, where any nonzero f32 update is motion
and a row can never freeze. What the model computes with is the bf16 copy in every
policy but `fp32`: the stored W itself, or under `mixed` the copy the forward casts
from the f32 master (round to nearest even, `precision.compute_params`). So the
question the lab asked of master weights ("do the dead tokens freeze, or only get very
cold?") has a policy-blind answer: between two states, the share of the dead rows (and
of their elements) whose bf16 copy changed at all. An f32 master that creeps by a
fraction of a bf16 cell per step changes its copy once the creep crosses a rounding
boundary; a frozen bf16 row never does.

Exact: the copies are compared bit for bit (+0 and −0 are the same value).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True)
class CopyMotion:
  rows_moved: float  # share of the rows whose bf16 copy changed in any element
  elements_moved: float  # share of their elements whose bf16 copy changed
  rows: int


def bf16_copy_bits(table: np.ndarray) -> np.ndarray:
  """The bf16 copy (round to nearest even) of f32 or bf16 values as uint16 bits, −0 as +0."""
  bits = np.asarray(table).astype(ml_dtypes.bfloat16).view(np.uint16)
  return np.where(bits == 0x8000, np.uint16(0), bits)


def copy_motion(before: np.ndarray, after: np.ndarray) -> CopyMotion:
  """How many of the rows of `before` -> `after` ([rows, D], f32 or bf16 values) changed
  their bf16 copy between the two states."""
  before, after = np.asarray(before), np.asarray(after)
  if before.shape != after.shape or before.ndim != 2 or not before.shape[0]:
    raise ValueError(f"copy_motion needs two [rows, D] tables of one shape with rows, got "
                     f"{before.shape} and {after.shape}")
  changed = bf16_copy_bits(before) != bf16_copy_bits(after)
  return CopyMotion(rows_moved=float(changed.any(axis=1).mean()),
                    elements_moved=float(changed.mean()), rows=int(before.shape[0]))
