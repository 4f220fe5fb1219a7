"""Probes: what a training step records, declared per experiment, never coded into the loop.

A probe is a named group of series (one array per step, stacked by `lax.scan`)
and trackers (state carried in the scan, written once at the end). Every
function here is pure and runs inside the jitted scan body; the loop in
`jaxdt.train` only looks probes up by the names in `ProbeConfig.names`.

File layout follows the lab (REFERENCE §2.3): a series with an `initial`
function has T+1 rows, row 0 being the state before any step and row t the
state after step t; one without has T rows, row t-1 holding step t.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdt import accounting
from jaxdt import lattice
from jaxdt import optim


class Dims(NamedTuple):
  """Sizes a probe's shapes depend on."""

  rows: int  # recorded rows (n_dead, or the vocabulary)
  hidden: int
  param_dtype: np.dtype  # the stored embedding dtype (bf16 or f32)


class StepView(NamedTuple):
  """Everything a probe may read about step t (rows already gathered)."""

  t: jax.Array  # int32, 1-based step
  w_prev: jax.Array  # (R, D) embedding rows before the step
  w_next: jax.Array  # (R, D) after the step
  grad: jax.Array  # (R, D) the step's gradient rows
  m: jax.Array  # (R, D) exp_avg after the step
  v: jax.Array  # (R, D) exp_avg_sq after the step
  loss: jax.Array  # f32 scalar, the bf16-representable loss of step t
  h_mean: jax.Array  # (D,) mean post-LayerNorm hidden state of step t's forward
  hyper: optim.Hyper
  motion_threshold: float
  loss_initial: Optional[float]


@dataclasses.dataclass(frozen=True)
class Series:
  """One per-step record."""

  key: str
  dtype: Callable[[Dims], np.dtype]
  shape: Callable[[Dims], tuple]
  record: Callable[[StepView], jax.Array]
  initial: Optional[Callable[[jax.Array, StepView], jax.Array]] = None  # (w0 rows, view) -> row 0


@dataclasses.dataclass(frozen=True)
class Tracker:
  """State carried through the scan; its final value is written once."""

  key: str
  dtype: np.dtype
  shape: Callable[[Dims], tuple]
  init: Callable[[Dims], np.ndarray]
  update: Callable[[jax.Array, StepView], jax.Array]


# --- Pure record functions ---------------------------------------------------


def stored_bits(w) -> jax.Array:
  """bf16 rows as uint16 bits (the lab's storage); f32 rows unchanged."""
  return lattice.bf16_to_bits(w) if w.dtype == jnp.bfloat16 else w.astype(jnp.float32)


def displacement(w_prev, w_next) -> jax.Array:
  """ΔW′ in cells of the stored format's lattice (bf16: the lab's ULP; f32: f32 spacing)."""
  if w_prev.dtype == jnp.bfloat16:
    return lattice.lattice_displacement(w_prev, w_next)
  return lattice.in_ulps(w_next.astype(jnp.float32) - w_prev.astype(jnp.float32), w_prev)


def ordered_row_mean(x) -> jax.Array:
  """Mean over axis 0 in f32, summed in a fixed pairwise order.

  XLA may sum a `reduce` in any order (and differently on CPU and GPU); this
  uses explicit element-wise adds — rows padded with zeros to a power of two,
  then row i + row i + half, halving until one row is left — so the bits are
  the same on every backend and `np_ordered_row_mean` recomputes them.
  The division by n is a true division (not a multiply by 1/n).
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  size = 1 << max(0, (n - 1).bit_length())
  x = jnp.concatenate([x, jnp.zeros((size - n,) + x.shape[1:], x.dtype)])
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    x = x[:half] + x[half:]
  return optim._true_div(x[0], jnp.float32(n))


def np_ordered_row_mean(x: np.ndarray) -> np.ndarray:
  """numpy twin of `ordered_row_mean` (same adds, same order, same bits)."""
  x = np.asarray(x, np.float32)
  n = x.shape[0]
  size = 1 << max(0, (n - 1).bit_length())
  x = np.concatenate([x, np.zeros((size - n,) + x.shape[1:], np.float32)])
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    x = x[:half] + x[half:]
  return x[0] / np.float32(n)


def moved(view: StepView) -> jax.Array:
  """Per-row motion: ‖ΔW′_i‖₂ ≥ threshold (nonzero ΔW′ is ≥ 0.5, so: any bit changed)."""
  d = displacement(view.w_prev, view.w_next)
  return jnp.sqrt(jnp.sum(d * d, axis=-1)) >= view.motion_threshold


def _update_last_motion(state, view: StepView):
  return jnp.where(moved(view), view.t.astype(jnp.int32), state)


def _f32(x):
  return x.astype(jnp.float32)


_W_DTYPE = lambda d: np.dtype(np.uint16) if d.param_dtype == jnp.bfloat16 else np.dtype(np.float32)
_ROWS = lambda d: (d.rows, d.hidden)
_F32 = lambda d: np.dtype(np.float32)


def _accounting_series() -> tuple:
  out = []
  for name in accounting.METRIC_NAMES:
    out.append(Series(
        key=f"adam_{name}", dtype=_F32, shape=lambda d: (),
        record=lambda v, name=name: accounting.metrics(
            v.w_prev, v.w_next, v.m, v.v, v.t, v.hyper)[name]))
  return tuple(out)


# Probe name -> its series and trackers. Keys are the lab's file keys.
PROBES = {
    # Crucible / Thimble 8/9 names.
    "W": (Series("W", _W_DTYPE, _ROWS, lambda v: stored_bits(v.w_next),
                 initial=lambda w0, v: stored_bits(w0)),),
    "delta_W_prime": (Series("delta_W_prime", _F32, _ROWS,
                             lambda v: displacement(v.w_prev, v.w_next)),),
    "centroid": (Series("centroid", _F32, lambda d: (d.hidden,),
                        lambda v: ordered_row_mean(v.w_next),
                        initial=lambda w0, v: ordered_row_mean(w0)),),
    "loss": (Series("loss", _F32, lambda d: (), lambda v: v.loss,
                    initial=lambda w0, v: jnp.float32(
                        np.nan if v.loss_initial is None else v.loss_initial)),),
    "last_motion_step": (Tracker("last_motion_step", np.dtype(np.int32), lambda d: (d.rows,),
                                 lambda d: np.full((d.rows,), -1, np.int32),
                                 _update_last_motion),),
    # Thimble 8: m, v, g as f32 copies; row 0 is zeros (nothing before step 1).
    "m": (Series("m", _F32, _ROWS, lambda v: _f32(v.m), initial=lambda w0, v: jnp.zeros(w0.shape)),),
    "v": (Series("v", _F32, _ROWS, lambda v: _f32(v.v), initial=lambda w0, v: jnp.zeros(w0.shape)),),
    "g": (Series("g", _F32, _ROWS, lambda v: _f32(v.grad), initial=lambda w0, v: jnp.zeros(w0.shape)),),
    # Crucible 3/4: mean final hidden state, h_mean[t-1] for step t.
    "h_mean": (Series("h_mean", _F32, lambda d: (d.hidden,), lambda v: v.h_mean),),
    # In-scan Adam accounting over the recorded rows (jaxdt.accounting).
    "adam_accounting": _accounting_series(),
}


def resolve(names) -> tuple:
  """The Series and Trackers of the named probes, in order; unknown names are an error."""
  unknown = [n for n in names if n not in PROBES]
  if unknown:
    raise ValueError(f"unknown probes {unknown}; known: {sorted(PROBES)}")
  return tuple(item for n in names for item in PROBES[n])


def series_of(names) -> tuple:
  return tuple(p for p in resolve(names) if isinstance(p, Series))


def trackers_of(names) -> tuple:
  return tuple(p for p in resolve(names) if isinstance(p, Tracker))


def file_specs(names, dims: Dims, steps: int) -> dict:
  """Ordered {key: (dtype, full shape)} of the trajectory file for `steps` steps."""
  specs = {}
  for p in resolve(names):
    if isinstance(p, Series):
      n = steps + 1 if p.initial is not None else steps
      specs[p.key] = (p.dtype(dims), (n,) + tuple(p.shape(dims)))
    else:
      specs[p.key] = (p.dtype, tuple(p.shape(dims)))
  return specs


def file_row(series: Series, t: int) -> int:
  """The file row holding step t's record."""
  return t if series.initial is not None else t - 1
