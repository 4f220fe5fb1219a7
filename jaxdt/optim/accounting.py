"""Adam accounting: does the recorded optimizer state explain the recorded motion?

Given W[t-1], the moments after step t (m_t, v_t) and t, two predictions of
ΔW = W[t] − W[t-1]:

- `replay`: torch's own bf16 arithmetic (`adamw.param_update`), which must
  reproduce W[t] bit for bit;
- `textbook_delta`: the continuous f32 AdamW update the lab used in Thimble 1
  (docs/definitions.md §Adam accounting): −lr·m̂/(√v̂ + ε) − lr·wd·W[t-1], m̂ = m/(1−b1^t),
  v̂ = v/(1−b2^t). (The lab's cell wrote the decay as wd·W without lr; its
  runs had wd = 0, where both agree. We use PyTorch's lr·wd.)

`metrics` compares both with the realized ΔW over a set of rows. All are pure
and jittable; the trainer calls `metrics` inside its scan body every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdt import config as config_lib
from jaxdt.numerics import lattice
from jaxdt.numerics import ordered
from jaxdt.optim import adamw

METRIC_NAMES = ("replay_match", "cosine", "norm_ratio", "swallowed", "max_ulp_error")


def replay(w_prev, m_t, v_t, t, r: adamw.Rule | config_lib.OptimConfig) -> jax.Array:
  """W[t] from W[t-1] and the step-t moments by torch's arithmetic (exact).

  Args:
    w_prev: params before step t (bf16 or f32).
    m_t, v_t: exp_avg, exp_avg_sq after step t (same dtype as w_prev).
    t: 1-based step (may be traced).
    r: the run's coefficients and form (in the scan, the member's own from its optimizer
      state), or its hyperparameters (their own, `adamw.rule`).

  Returns:
    W[t] in w_prev's dtype.
  """
  r = adamw.as_rule(r)
  dtype = w_prev.dtype
  f32 = lambda x: x.astype(jnp.float32)
  scalars = adamw.lookup_scalars(t, r.c.table)
  new_p, _, _ = adamw.param_update(f32(w_prev), (f32(m_t), f32(v_t)), scalars, r, dtype)
  return new_p.astype(dtype)


def textbook_delta(w_prev, m_t, v_t, t, r: adamw.Rule | config_lib.OptimConfig) -> jax.Array:
  """The lab's continuous f32 AdamW step (module docstring), f32."""
  c = adamw.as_rule(r).c
  s = adamw.lookup_scalars(t, c.table)
  w, m, v = (x.astype(jnp.float32) for x in (w_prev, m_t, v_t))
  m_hat = m / s[adamw.BC1]
  v_hat = v / s[adamw.BC2]
  adam_term = c.lr * m_hat / (jnp.sqrt(v_hat) + c.eps_f32)
  return -adam_term - c.lr_wd * w


def _fraction(mask) -> jax.Array:
  """Exact count / size (jnp.mean multiplies by 1/size, so all-true gave 0.99999994)."""
  count = jnp.sum(mask.astype(jnp.int32)).astype(jnp.float32)
  return lattice.true_divide(count, jnp.float32(mask.size))


def metrics(w_prev, w_next, m_t, v_t, t, r: adamw.Rule | config_lib.OptimConfig) -> dict:
  """Per-step accounting over a set of rows (all arrays [rows, D]).

  Returns:
    dict of f32 scalars:
      replay_match: fraction of elements whose exact replay equals W[t] bitwise.
      cosine: cos(textbook ΔW, realized ΔW) over all elements (NaN if either is 0).
      norm_ratio: ‖textbook‖ / ‖realized‖ (the lab's "ratio"; inf if nothing moved).
      swallowed: fraction of elements whose textbook update is non-zero but
        whose realized ΔW is exactly zero (rounded away).
      max_ulp_error: max |realized − textbook| / ULP(W[t-1]).
  """
  bits = lambda x: jax.lax.bitcast_convert_type(
      x, jnp.uint16 if x.dtype == jnp.bfloat16 else jnp.uint32)
  replayed = replay(w_prev, m_t, v_t, t, r)
  match = _fraction(bits(replayed) == bits(w_next))
  realized = w_next.astype(jnp.float32) - w_prev.astype(jnp.float32)
  text = textbook_delta(w_prev, m_t, v_t, t, r)
  # Fixed-order sums: a jnp.sum here differed by 1-2 ulps between 1 and 2 CPU threads.
  total = lambda x: ordered.sum_rows(x.reshape(-1))
  n_real = jnp.sqrt(total(realized * realized))
  n_text = jnp.sqrt(total(text * text))
  dot = total(realized * text)
  both = (n_real > 0) & (n_text > 0)
  cosine = jnp.where(both, dot / jnp.where(both, n_real * n_text, 1.0), jnp.nan)
  ratio = jnp.where(n_real > 0, n_text / jnp.where(n_real > 0, n_real, 1.0),
                    jnp.where(n_text > 0, jnp.inf, jnp.nan))
  swallowed = _fraction((text != 0) & (realized == 0))
  err = jnp.max(jnp.abs(lattice.in_ulps(realized - text, w_prev)))
  return dict(replay_match=match, cosine=cosine.astype(jnp.float32),
              norm_ratio=ratio.astype(jnp.float32), swallowed=swallowed,
              max_ulp_error=err)
