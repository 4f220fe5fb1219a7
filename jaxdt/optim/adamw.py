"""AdamW as an optax GradientTransformation, bit-exact against torch.optim.AdamW.

torch 2.13 on CPU runs `_single_tensor_adam` (docs/adamw.md). For a
bf16 parameter every torch op upcasts to f32, computes, and rounds to bf16 once
when it stores. We follow the same op order and round after each op:

  t        = count + 1                      (torch increments its step first)
  p        = R(p · f32(1 − lr·wd))           only if wd != 0
  m        = R(fma(f32(1−b1), g − m, m))     lerp_; for weight >= 0.5 torch uses
                                             R(fma(w − 1, g − m, g))
  v        = R(v · f32(b2))                  mul_
  v        = R(fma(f32(1−b2)·g, g, v))       addcmul_
  den      = R(R(R(√v) / f32(√(1−b2^t))) + f32(bf16(eps)))
  p        = R(p + (f32(−lr/(1−b1^t)) · m) / den)   addcdiv_: no separate rounding

R rounds f32 to the parameter dtype (bf16: round-to-nearest-even). The
per-step scalars are computed on the host in float64 exactly as torch computes
them, tabulated once per hyperparameter set (they are constant after ~17k steps
for b2 = 0.999) and looked up with the traced step, so the transformation works
under `jit` and inside `lax.scan` with no host callback.

What XLA needs for this to hold (each measured in docs/adamw.md):
- FMA: `a * b + c` must be contracted; XLA:CPU and XLA:GPU do so under jit.
  `jaxdt.numerics.backend.fma_contracts()` checks the current backend.
- A true division by the bias-correction scalar (XLA rewrites x / scalar as a
  multiply by the reciprocal, which flips bf16 results at t = 2934, 4923).
- fp32 only: separate torch ops must not be fused into one FMA; `_opaque`
  hides values from LLVM's contraction.

Known limit: XLA:CPU flushes f32 subnormals to zero; torch keeps them. A moment
whose value falls below 2^-126 (a row whose gradient stays exactly zero for
~700 steps at lr 1e-3) becomes 0 here. Parameters are unaffected; see
BUILD_NOTES.md for the measured bound.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from jaxdt.config import OptimConfig
from jaxdt.numerics import lattice
from jaxdt.numerics import subnormal

# Columns of the per-step scalar table.
NEG_STEP_SIZE, BC2_SQRT, BC1, BC2 = range(4)
_MAX_TABLE = 1 << 20


class AdamWState(NamedTuple):
  """State of `adamw`: torch's `step`, `exp_avg` and `exp_avg_sq`."""

  count: jax.Array  # shape=(), dtype=jnp.int32: steps taken (torch's `step`).
  mu: optax.Updates  # exp_avg, in each parameter's dtype.
  nu: optax.Updates  # exp_avg_sq, in each parameter's dtype.


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


def lookup_scalars(hp: OptimConfig, t, table=None) -> jax.Array:
  """The f32 [4] scalars for a traced 1-based step t (jit/scan safe).

  `table` (traced, e.g. a sweep member's) replaces `scalar_table(hp)`; a table
  padded with copies of its last row gives the same values.
  """
  table = scalar_table(hp) if table is None else table
  idx = jnp.clip(jnp.asarray(t, jnp.int32), 0, table.shape[0] - 1)
  return jnp.asarray(table)[idx]


class Coefficients(NamedTuple):
  """The f32 scalars AdamW's ops read, derived from the hyperparameters on the host.

  As numpy f32 scalars (`coefficients(hp)`) they are constants of the traced
  step, as in a solo run; a sweep passes the same values as traced arrays, one
  set per member, so members share one compiled program and each still does
  torch's arithmetic on its own values (the same f32 operands, the same ops).
  """

  lerp_weight: object  # f32(1 − b1), or f32(1 − b1) − 1 when 1 − b1 >= 0.5 (torch's lerp)
  b2: object  # f32(b2)
  one_minus_b2: object  # f32(1 − b2)
  eps_bf16: object  # eps as torch adds it to a bf16 tensor (a bf16 scalar)
  eps_f32: object
  decay: object  # f32(1 − lr·wd)
  lr: object  # f32(lr) and f32(lr·wd): the lab's textbook step (optim.accounting)
  lr_wd: object
  table: object  # f32 [T + 1, 4], `scalar_table`


def lerp_from_m(hp: OptimConfig) -> bool:
  """torch's lerp_ form: m + w·(g − m) for w < 0.5, else g + (w − 1)·(g − m) (structure)."""
  return abs(1 - hp.b1) < 0.5


@functools.lru_cache(maxsize=64)
def coefficients(hp: OptimConfig) -> Coefficients:
  """`hp`'s coefficients as numpy f32 scalars (each computed as torch computes it)."""
  weight = 1 - hp.b1  # Python float64, converted to f32 by the kernel
  lerp = np.float32(weight) if lerp_from_m(hp) else np.float32(weight) - np.float32(1)
  return Coefficients(
      lerp_weight=lerp, b2=np.float32(hp.b2), one_minus_b2=np.float32(1 - hp.b2),
      eps_bf16=np.float32(ml_dtypes.bfloat16(hp.eps)), eps_f32=np.float32(hp.eps),
      decay=np.float32(1 - hp.learning_rate * hp.weight_decay),
      lr=np.float32(hp.learning_rate), lr_wd=np.float32(hp.learning_rate * hp.weight_decay),
      table=scalar_table(hp))


def _opaque(x):
  """Identity that LLVM cannot see through, so it cannot fuse x into an FMA."""
  bits = lattice.f32_bits(x)
  bits = bits | jnp.isnan(x).astype(jnp.uint32)  # 0 except for NaN (stays NaN)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _rounder(dtype):
  """R(): store to `dtype` after a torch op, keeping the value in f32."""
  if dtype == jnp.bfloat16:
    return lattice.bf16_round_trip
  if dtype == jnp.float32:
    return _opaque
  raise TypeError(f"adamw supports bf16 and f32 parameters, got {dtype}")


def moments_update(g, m, v, hp: OptimConfig, dtype, coef: Coefficients | None = None):
  """torch's `exp_avg.lerp_` and `exp_avg_sq.mul_().addcmul_()`, in f32.

  Args:
    g, m, v: f32 arrays holding values of `dtype` (grad, exp_avg, exp_avg_sq).
    hp: hyperparameters (the structure; the values too unless `coef`).
    dtype: the parameter dtype (bf16 or f32): where each op rounds.
    coef: traced coefficients (a sweep member's); None = `coefficients(hp)`.

  Returns:
    (m, v) as f32 arrays holding values of `dtype`.
  """
  r = _rounder(dtype)
  c = coefficients(hp) if coef is None else coef
  diff = g - m
  if lerp_from_m(hp):
    m = r(c.lerp_weight * diff + m)  # contracted to fma(w, g − m, m)
  else:
    m = r(c.lerp_weight * diff + g)
  v = r(v * c.b2)
  v = r((c.one_minus_b2 * g) * g + v)  # contracted to fma(c·g, g, v)
  return m, v


# The exact moments run scaled by 2^MOMENT_SCALE (c·g by 2^(MOMENT_SCALE/2)): every bf16
# value and every torch f32 intermediate down to the subnormal grid 2^-149 is then a
# normal f32. Elements with larger magnitudes than these bounds keep the plain path (their
# arithmetic has no subnormal anywhere).
MOMENT_SCALE = 64
_M_BOUND, _V_BOUND = 2.0**60, 2.0**30


def exact_moments(g, m, v, hp: OptimConfig, coef: Coefficients | None = None):
  """torch's bf16 `exp_avg.lerp_` and `exp_avg_sq.mul_().addcmul_()`, subnormals kept.

  The same ops as `moments_update`, done in `numerics.subnormal`'s scaled
  arithmetic (docs/adamw.md, "Subnormals"): each f32 result torch computes is
  reproduced, subnormal ones on the 2^-149 grid, and each bf16 store rounds as
  torch's does, subnormal ones on the 2^-133 grid.

  Args:
    g, m, v: bf16 arrays (grad, exp_avg, exp_avg_sq before the step).
    hp: hyperparameters (the structure; the values too unless `coef`).
    coef: traced coefficients (a sweep member's); None = `coefficients(hp)`.

  Returns:
    (m, v) as bf16 bits (uint16), and the mask of elements these are valid for
    (False where a magnitude exceeds the scaled range: use `moments_update`).
  """
  c = coefficients(hp) if coef is None else coef
  S = MOMENT_SCALE
  g_s, m_s, v_s = (subnormal.scaled(x, S) for x in (g, m, v))
  diff = g_s - m_s  # exact when small; otherwise rounded as torch rounds it
  a, addend = (c.lerp_weight, m_s) if lerp_from_m(hp) else (c.lerp_weight, g_s)
  r = a * diff + addend  # contracted to fma, as in `moments_update`
  f = subnormal.as_f32(r, subnormal.fma_residual_sign(a, diff, addend, r), S)
  m_bits = subnormal.bf16_bits(subnormal.bf16_of(f, S), S)
  p, e = subnormal.two_prod(v_s, c.b2)  # mul_(b2)
  v1 = subnormal.bf16_of(subnormal.as_f32(p, jnp.sign(e), S), S)
  g_h = subnormal.scaled(g, S // 2)
  p, e = subnormal.two_prod(c.one_minus_b2, g_h)  # torch's f32 (1 - b2)·g
  cg = subnormal.as_f32(p, jnp.sign(e), S // 2)
  r = cg * g_h + v1  # contracted to fma(c·g, g, v)
  f = subnormal.as_f32(r, subnormal.fma_residual_sign(cg, g_h, v1, r), S)
  v_bits = subnormal.bf16_bits(subnormal.bf16_of(f, S), S)
  big = lambda x, bound: ~(jnp.abs(x.astype(jnp.float32)) < bound)  # NaN counts as big
  valid = ~(big(g, _V_BOUND) | big(m, _M_BOUND) | big(v, _V_BOUND))
  return m_bits, v_bits, valid


_TINY_EXPONENT = 127 - 100  # below 2^-100 a moment op may meet a subnormal


def needs_exact(g, m, v, hp: OptimConfig, coef: Coefficients | None = None) -> jax.Array:
  """Whether any element may need `exact_moments`: a nonzero input below 2^-100, or a plain
  result (`moments_update`) below 2^-100 or flushed to zero from nonzero inputs. Read from
  bits: XLA:CPU's comparisons treat subnormals as zero."""
  u = [lattice.f32_bits(jnp.asarray(x).astype(jnp.float32)) for x in (g, m, v)]
  f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
  m_p, v_p = (lattice.f32_bits(x) for x in moments_update(f32(g), f32(m), f32(v), hp,
                                                          jnp.bfloat16, coef))
  nonzero = lambda b: (b & 0x7FFFFFFF) != 0
  tiny = lambda b: nonzero(b) & (((b >> 23) & 0xFF) < _TINY_EXPONENT)
  flushed = ((~nonzero(m_p) & (nonzero(u[0]) | nonzero(u[1])))
             | (~nonzero(v_p) & (nonzero(u[0]) | nonzero(u[2]))))
  return jnp.any(tiny(u[0]) | tiny(u[1]) | tiny(u[2]) | tiny(m_p) | tiny(v_p) | flushed)


def denominator(v, bc2_sqrt, hp: OptimConfig, dtype, coef: Coefficients | None = None):
  """torch's `(exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`, in f32."""
  r = _rounder(dtype)
  c = coefficients(hp) if coef is None else coef
  # For bf16 tensors torch adds eps as a bf16 scalar: 1e-8 becomes 1.00117e-8.
  eps = c.eps_bf16 if dtype == jnp.bfloat16 else c.eps_f32
  return r(r(lattice.true_divide(r(jnp.sqrt(v)), bc2_sqrt)) + eps)


def param_update(p, m, v, scalars, hp: OptimConfig, dtype, coef: Coefficients | None = None):
  """torch's decoupled decay and `param.addcdiv_`, in f32.

  Args:
    p: f32 array holding the old parameter values (of `dtype`).
    m, v: the updated moments (f32 holding `dtype` values).
    scalars: f32 [4] from `lookup_scalars`.
    hp: hyperparameters.
    dtype: the parameter dtype.

  Returns:
    (new_p, step, decayed): new_p holds `dtype` values; step is the f32
    addcdiv term (f32(−step_size)·m)/den, which torch adds to `decayed` (p
    after weight decay, or p itself when wd = 0) before its one rounding.
  """
  r = _rounder(dtype)
  if hp.weight_decay != 0:
    p = r(p * (coefficients(hp) if coef is None else coef).decay)
  den = denominator(v, scalars[BC2_SQRT], hp, dtype, coef)
  step = (scalars[NEG_STEP_SIZE] * m) / den
  return r(p + step), step, p


def _leaf_update(g, p, moments, scalars, hp: OptimConfig, coef: Coefficients | None = None,
                 exact=None):
  """One parameter leaf: returns (new_param, updates, mu, nu).

  `moments`: the leaf's (exp_avg, exp_avg_sq) before the step; `exact`: its (m bits,
  v bits, valid) from `exact_moments` (bf16 leaves).
  """
  m, v = moments
  dtype = p.dtype
  f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
  m_plain, v_plain = moments_update(f32(g), f32(m), f32(v), hp, dtype, coef)
  if exact is not None:  # torch keeps subnormal moments; XLA:CPU would flush them
    m_bits, v_bits, valid = exact
    pick = lambda bits, plain: jnp.where(valid, lattice.bits_to_bf16(bits),
                                         plain.astype(dtype))
    m_out, v_out = pick(m_bits, m_plain), pick(v_bits, v_plain)
  else:
    m_out, v_out = m_plain.astype(dtype), v_plain.astype(dtype)
  m, v = f32(m_out), f32(v_out)  # what the parameter update reads (a bit shift: kept)
  p32 = f32(p)
  new_p, step, decayed = param_update(p32, m, v, scalars, hp, dtype, coef)
  # optax.apply_updates computes (p + u).astype(p.dtype) in f32. Without decay
  # u = step reproduces torch's single rounding of p + step exactly. With decay
  # try u = (decayed − p) + step, then the f32 difference new_p − p and its two
  # f32 neighbours (new_p − p is inexact when |p| and |new_p| are far apart, but
  # p + u then steps finer than new_p's rounding interval, so one of them lands).
  # _opaque keeps LLVM from re-associating p + ((decayed − p) + step) inside the
  # check (measured: without it the check passed values that then missed).
  diff = _opaque(new_p - p32)
  candidates = [jnp.nextafter(diff, -jnp.inf), jnp.nextafter(diff, jnp.inf), diff]
  candidates.append(step if hp.weight_decay == 0 else _opaque((decayed - p32) + step))
  target = lattice.f32_bits(new_p)
  u = candidates[0]
  for cand in candidates[1:]:  # the last (most natural) candidate has priority
    lands = lattice.f32_bits(_round_to(p32 + cand, dtype)) == target
    u = jnp.where(lands, cand, u)
  return new_p.astype(dtype), u, m_out, v_out


def _round_to(x, dtype):
  return lattice.bf16_round_trip(x) if dtype == jnp.bfloat16 else x


def adamw(learning_rate: float, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0
          ) -> optax.GradientTransformation:
  """torch.optim.AdamW (torch 2.13, CPU default path), bit for bit, as an optax transform.

  The trainer's one optimizer path is `init` + `step(hp, params, grads,
  state)`; this is the adapter for optax users, built on the same update
  (`_update_tree`) and tested on its own (tests/optim/adamw_test.py,
  tests/parity/optim_parity_test.py).

  Decay and the Adam step stay in one transformation because torch rounds the
  decayed parameter before `addcdiv_`, and the step is never rounded on its
  own (module docstring). Params may be bf16 (params, moments and rounding in
  bf16, the lab's runs) or f32 (exact except where torch's own f32 sqrt is not
  correctly rounded; BUILD_NOTES.md). Note torch's default weight_decay is
  1e-2; this factory's is 0.0, the lab's Crucible setting.

  Returned updates are f32 such that `optax.apply_updates(params, updates)`
  yields torch's parameters exactly for bf16 params (and for f32 params with
  wd = 0); `step` returns torch's parameters directly in every case.

  Args:
    learning_rate: lr (a constant, as in the lab's runs).
    b1: beta1.
    b2: beta2.
    eps: epsilon (added after the bias-corrected square root).
    weight_decay: decoupled weight decay λ; torch multiplies p by 1 − lr·λ.

  Returns:
    An optax.GradientTransformation whose state is `AdamWState`.
  """
  hp = OptimConfig(float(learning_rate), float(b1), float(b2), float(eps), float(weight_decay))
  scalar_table(hp)  # fail early on unsupported betas

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("adamw needs params: call update(grads, state, params)")
    _, u, state = _update_tree(updates, state, params, hp)
    return u, state

  return optax.GradientTransformation(init, update_fn)


def init(params) -> AdamWState:
  """torch's fresh AdamW state: step 0, exp_avg and exp_avg_sq zeros in each param's dtype."""
  zeros = lambda p: jnp.zeros_like(p)
  return AdamWState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                    nu=jax.tree.map(zeros, params))


def _exact_leaves(gs, ms, vs, hp: OptimConfig, coef) -> list:
  """`exact_moments` of every bf16 leaf, computed once over their concatenation (one
  copy of the scaled arithmetic in the program, not one per leaf); None for others."""
  idx = [i for i, m in enumerate(ms) if jnp.asarray(m).dtype == jnp.bfloat16]
  out = [None] * len(ms)
  if not idx:
    return out
  flat = lambda xs: jnp.concatenate([jnp.asarray(xs[i]).reshape(-1) for i in idx])
  # Only where some value is tiny (or a plain result flushed) does the scaled arithmetic run:
  # a conditional's branch is a computation of its own, so it costs nothing otherwise, and
  # its flat results are materialised once (inlined, XLA would fuse the whole scaled
  # arithmetic into every leaf's slice: a far slower compile).
  args = (flat(gs), flat(ms), flat(vs))
  skip = lambda a: (jnp.zeros(a[0].shape, jnp.uint16), jnp.zeros(a[0].shape, jnp.uint16),
                    jnp.zeros(a[0].shape, bool))
  parts = jax.lax.cond(needs_exact(*args, hp, coef), lambda a: exact_moments(*a, hp, coef),
                       skip, args)
  start = 0
  for i in idx:
    shape = jnp.shape(ms[i])
    n = int(np.prod(shape, dtype=np.int64))
    out[i] = tuple(x[start:start + n].reshape(shape) for x in parts)
    start += n
  return out


def _update_tree(grads, state: AdamWState, params, hp: OptimConfig,
                 coef: Coefficients | None = None):
  """(new_params, updates, new_state) for a whole pytree."""
  count = state.count + 1
  scalars = lookup_scalars(hp, count, None if coef is None else coef.table)
  treedef = jax.tree.structure(params)
  gs, ps = treedef.flatten_up_to(grads), jax.tree.leaves(params)
  ms, vs = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
  exact = _exact_leaves(gs, ms, vs, hp, coef)
  outs = [_leaf_update(g, p, (m, v), scalars, hp, coef, e)
          for g, p, m, v, e in zip(gs, ps, ms, vs, exact)]
  new_params, u, mu, nu = (treedef.unflatten(x) for x in zip(*outs))
  return new_params, u, AdamWState(count=count, mu=mu, nu=nu)


def step(hp: OptimConfig, params, grads, state: AdamWState, coef: Coefficients | None = None):
  """One AdamW step returning torch's new parameters directly: (params, state).

  Always bit-exact. `tx.update` + `optax.apply_updates` gives the same bits for
  bf16 params, and for f32 params when wd = 0; for f32 params with wd != 0 a
  few elements per step have no f32 `u` with p + u == torch's result (torch
  adds the step to the decayed p, not to p), so the trainer uses this.
  `coef`: a sweep member's traced coefficients (`hp` then gives the structure:
  wd = 0 or not, torch's lerp form).
  """
  new_params, _, state = _update_tree(grads, state, params, hp, coef)
  return new_params, state


def step_params(params, grads, state: AdamWState, tx: optax.GradientTransformation):
  """One step through the optax interface: `tx.update` then `optax.apply_updates`."""
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state
