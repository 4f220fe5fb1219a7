"""Finiteness of per-step series (a run's loss): where a run diverged."""

from __future__ import annotations

from typing import Optional

import numpy as np


def first_nonfinite(values: np.ndarray, first_step: int = 0) -> Optional[int]:
  """The step of the first non-finite value of a per-step series, or None."""
  bad = ~np.isfinite(np.asarray(values, np.float64))
  return int(np.argmax(bad)) + first_step if bad.any() else None
