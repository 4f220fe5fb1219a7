"""Reductions in a fixed order, so their bits are the same on every backend and thread count.

XLA may split a `reduce` across threads or GPU blocks in any order, so f32 sums
differ in their last bits between a 1- and a 2-core CPU, or CPU and GPU. These
helpers sum with explicit element-wise adds in one documented order — rows
zero-padded to a power of two, then row i + row i + half, halving until one row
is left — and have numpy twins that recompute the same bits from stored data.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdt.numerics import lattice


def _pairwise_sum(x, xp):
  n = x.shape[0]
  size = 1 << max(0, (n - 1).bit_length())
  x = xp.concatenate([x, xp.zeros((size - n,) + x.shape[1:], x.dtype)])
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    x = x[:half] + x[half:]
  return x[0]


def sum_rows(x):
  """f32 sum over axis 0 in the fixed pairwise order (jittable)."""
  return _pairwise_sum(jnp.asarray(x, jnp.float32), jnp)


def mean_rows(x):
  """f32 mean over axis 0: `sum_rows` then a true division by n (not a multiply by 1/n)."""
  x = jnp.asarray(x, jnp.float32)
  return lattice.true_divide(sum_rows(x), jnp.float32(x.shape[0]))


def np_sum_rows(x: np.ndarray) -> np.ndarray:
  """numpy twin of `sum_rows` (same adds, same order, same bits)."""
  return _pairwise_sum(np.asarray(x, np.float32), np)


def np_mean_rows(x: np.ndarray) -> np.ndarray:
  """numpy twin of `mean_rows`."""
  x = np.asarray(x, np.float32)
  return np_sum_rows(x) / np.float32(x.shape[0])
