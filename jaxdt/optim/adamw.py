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
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from jaxdt.config import OptimConfig
from jaxdt.numerics import lattice
from jaxdt.numerics import subnormal
from jaxdt.optim.scalars import (BC1, BC2, BC2_SQRT, NEG_STEP_SIZE, lookup_scalars,  # noqa: F401
                                 scalar_table, torch_step_scalars)



class Coefficients(NamedTuple):
  """The f32 scalars AdamW's ops read, derived from the hyperparameters on the host.

  They are carried in the optimizer's state (`AdamWState.coef`), as optax's
  `inject_hyperparams` carries its hyperparameters: a solo run's and a sweep
  member's values take one path (traced arrays either way), and each member does
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


class Form(NamedTuple):
  """The structure of torch's arithmetic for a hyperparameter set (static under jit)."""

  lerp_from_m: bool  # torch's lerp_ form: m + w·(g − m) for w < 0.5, else g + (w − 1)·(g − m)
  decays: bool  # weight decay != 0: p is decayed (and rounded) before addcdiv_


class Rule(NamedTuple):
  """What every op of the update reads: the coefficients (traced) and the form (static)."""

  c: Coefficients
  form: Form


class AdamWState(NamedTuple):
  """State of torch's AdamW: its `step`, `exp_avg`, `exp_avg_sq`, and the coefficients.

  `coef` is derived from the config, so a checkpoint stores the state without it
  (`without_coefficients`) and a restore takes it from the config again.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32: steps taken (torch's `step`).
  mu: optax.Updates  # exp_avg, in each parameter's dtype.
  nu: optax.Updates  # exp_avg_sq, in each parameter's dtype.
  coef: Coefficients | None = None


def form(hp: OptimConfig) -> Form:
  return Form(abs(1 - hp.b1) < 0.5, hp.weight_decay != 0)


@functools.lru_cache(maxsize=64)
def coefficients(hp: OptimConfig) -> Coefficients:
  """`hp`'s coefficients as numpy f32 scalars (each computed as torch computes it)."""
  weight = 1 - hp.b1  # Python float64, converted to f32 by the kernel
  lerp = np.float32(weight) if form(hp).lerp_from_m else np.float32(weight) - np.float32(1)
  return Coefficients(
      lerp_weight=lerp, b2=np.float32(hp.b2), one_minus_b2=np.float32(1 - hp.b2),
      eps_bf16=np.float32(ml_dtypes.bfloat16(hp.eps)), eps_f32=np.float32(hp.eps),
      decay=np.float32(1 - hp.learning_rate * hp.weight_decay),
      lr=np.float32(hp.learning_rate), lr_wd=np.float32(hp.learning_rate * hp.weight_decay),
      table=scalar_table(hp))


def rule(hp: OptimConfig) -> Rule:
  """`hp`'s own rule (its coefficients as constants): for host-side recomputation."""
  return Rule(coefficients(hp), form(hp))


def as_rule(r: "Rule | OptimConfig") -> Rule:
  """A rule, or hyperparameters' own rule (host-side callers may pass an OptimConfig)."""
  return rule(r) if isinstance(r, OptimConfig) else r


def pad_table(c: Coefficients, rows: int) -> Coefficients:
  """`c` with its scalar table padded to `rows` by copies of its last row (the lookup clips
  there, so every step reads the same values): sweep members' tables then stack."""
  t = np.asarray(c.table)
  return c._replace(table=np.concatenate([t, np.repeat(t[-1:], rows - len(t), axis=0)]))


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


def moments_update(g, m, v, r: Rule, dtype):
  """torch's `exp_avg.lerp_` and `exp_avg_sq.mul_().addcmul_()`, in f32.

  Args:
    g, m, v: f32 arrays holding values of `dtype` (grad, exp_avg, exp_avg_sq).
    r: the coefficients and the form.
    dtype: the parameter dtype (bf16 or f32): where each op rounds.

  Returns:
    (m, v) as f32 arrays holding values of `dtype`.
  """
  rnd, c = _rounder(dtype), r.c
  diff = g - m
  if r.form.lerp_from_m:
    m = rnd(c.lerp_weight * diff + m)  # contracted to fma(w, g − m, m)
  else:
    m = rnd(c.lerp_weight * diff + g)
  v = rnd(v * c.b2)
  v = rnd((c.one_minus_b2 * g) * g + v)  # contracted to fma(c·g, g, v)
  return m, v


# The exact moments run scaled by 2^MOMENT_SCALE (c·g by 2^(MOMENT_SCALE/2)): every bf16
# value and every torch f32 intermediate down to the subnormal grid 2^-149 is then a
# normal f32. Elements with larger magnitudes than these bounds keep the plain path (their
# arithmetic has no subnormal anywhere).
MOMENT_SCALE = 64
_M_BOUND, _V_BOUND = 2.0**60, 2.0**30


def exact_moments(g, m, v, r: Rule):
  """torch's bf16 `exp_avg.lerp_` and `exp_avg_sq.mul_().addcmul_()`, subnormals kept.

  The same ops as `moments_update`, done in `numerics.subnormal`'s scaled
  arithmetic (docs/adamw.md, "Subnormals"): each f32 result torch computes is
  reproduced, subnormal ones on the 2^-149 grid, and each bf16 store rounds as
  torch's does, subnormal ones on the 2^-133 grid.

  Args:
    g, m, v: bf16 arrays (grad, exp_avg, exp_avg_sq before the step).
    r: the coefficients and the form.

  Returns:
    (m, v) as bf16 bits (uint16), and the mask of elements these are valid for
    (False where a magnitude exceeds the scaled range: use `moments_update`).
  """
  c = r.c
  S = MOMENT_SCALE
  g_s, m_s, v_s = (subnormal.scaled(x, S) for x in (g, m, v))
  diff = g_s - m_s  # exact when small; otherwise rounded as torch rounds it
  a, addend = (c.lerp_weight, m_s) if r.form.lerp_from_m else (c.lerp_weight, g_s)
  res = a * diff + addend  # contracted to fma, as in `moments_update`
  f = subnormal.as_f32(res, subnormal.fma_residual_sign(a, diff, addend, res), S)
  m_bits = subnormal.bf16_bits(subnormal.bf16_of(f, S), S)
  p, e = subnormal.two_prod(v_s, c.b2)  # mul_(b2)
  v1 = subnormal.bf16_of(subnormal.as_f32(p, jnp.sign(e), S), S)
  g_h = subnormal.scaled(g, S // 2)
  p, e = subnormal.two_prod(c.one_minus_b2, g_h)  # torch's f32 (1 - b2)·g
  cg = subnormal.as_f32(p, jnp.sign(e), S // 2)
  res = cg * g_h + v1  # contracted to fma(c·g, g, v)
  f = subnormal.as_f32(res, subnormal.fma_residual_sign(cg, g_h, v1, res), S)
  v_bits = subnormal.bf16_bits(subnormal.bf16_of(f, S), S)
  big = lambda x, bound: ~(jnp.abs(x.astype(jnp.float32)) < bound)  # NaN counts as big
  valid = ~(big(g, _V_BOUND) | big(m, _M_BOUND) | big(v, _V_BOUND))
  return m_bits, v_bits, valid


_TINY_EXPONENT = 127 - 100  # below 2^-100 a moment op may meet a subnormal


def needs_exact(g, m, v, r: Rule) -> jax.Array:
  """Whether any element may need `exact_moments`: a nonzero input below 2^-100, or a plain
  result (`moments_update`) below 2^-100 or flushed to zero from nonzero inputs. Read from
  bits: XLA:CPU's comparisons treat subnormals as zero."""
  u = [lattice.f32_bits(jnp.asarray(x).astype(jnp.float32)) for x in (g, m, v)]
  f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
  m_p, v_p = (lattice.f32_bits(x) for x in moments_update(f32(g), f32(m), f32(v), r,
                                                          jnp.bfloat16))
  nonzero = lambda b: (b & 0x7FFFFFFF) != 0
  tiny = lambda b: nonzero(b) & (((b >> 23) & 0xFF) < _TINY_EXPONENT)
  flushed = ((~nonzero(m_p) & (nonzero(u[0]) | nonzero(u[1])))
             | (~nonzero(v_p) & (nonzero(u[0]) | nonzero(u[2]))))
  return jnp.any(tiny(u[0]) | tiny(u[1]) | tiny(u[2]) | tiny(m_p) | tiny(v_p) | flushed)


def denominator(v, bc2_sqrt, c: Coefficients, dtype):
  """torch's `(exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`, in f32."""
  rnd = _rounder(dtype)
  # For bf16 tensors torch adds eps as a bf16 scalar: 1e-8 becomes 1.00117e-8.
  eps = c.eps_bf16 if dtype == jnp.bfloat16 else c.eps_f32
  return rnd(rnd(lattice.true_divide(rnd(jnp.sqrt(v)), bc2_sqrt)) + eps)


def param_update(p, moments, scalars, r: Rule, dtype):
  """torch's decoupled decay and `param.addcdiv_`, in f32.

  Args:
    p: f32 array holding the old parameter values (of `dtype`).
    moments: the updated (m, v) (f32 holding `dtype` values).
    scalars: f32 [4] from `lookup_scalars`.
    r: the coefficients and the form.
    dtype: the parameter dtype.

  Returns:
    (new_p, step, decayed): new_p holds `dtype` values; step is the f32
    addcdiv term (f32(−step_size)·m)/den, which torch adds to `decayed` (p
    after weight decay, or p itself when wd = 0) before its one rounding.
  """
  rnd = _rounder(dtype)
  m, v = moments
  if r.form.decays:
    p = rnd(p * r.c.decay)
  den = denominator(v, scalars[BC2_SQRT], r.c, dtype)
  step = (scalars[NEG_STEP_SIZE] * m) / den
  return rnd(p + step), step, p


class Leaf(NamedTuple):
  """One parameter leaf's inputs: grad, param, the moments before the step, and its
  `exact_moments` result (m bits, v bits, valid) for bf16 leaves, else None."""

  g: jax.Array
  p: jax.Array
  m: jax.Array
  v: jax.Array
  exact: tuple | None


def _leaf_update(leaf: Leaf, scalars, r: Rule):
  """One parameter leaf: returns (new_param, updates, mu, nu)."""
  dtype = leaf.p.dtype
  f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
  m_plain, v_plain = moments_update(f32(leaf.g), f32(leaf.m), f32(leaf.v), r, dtype)
  if leaf.exact is not None:  # torch keeps subnormal moments; XLA:CPU would flush them
    m_bits, v_bits, valid = leaf.exact
    pick = lambda bits, plain: jnp.where(valid, lattice.bits_to_bf16(bits),
                                         plain.astype(dtype))
    m_out, v_out = pick(m_bits, m_plain), pick(v_bits, v_plain)
  else:
    m_out, v_out = m_plain.astype(dtype), v_plain.astype(dtype)
  m, v = f32(m_out), f32(v_out)  # what the parameter update reads (a bit shift: kept)
  p32 = f32(leaf.p)
  new_p, step, decayed = param_update(p32, (m, v), scalars, r, dtype)
  # optax.apply_updates computes (p + u).astype(p.dtype) in f32. Without decay
  # u = step reproduces torch's single rounding of p + step exactly. With decay
  # try u = (decayed − p) + step, then the f32 difference new_p − p and its two
  # f32 neighbours (new_p − p is inexact when |p| and |new_p| are far apart, but
  # p + u then steps finer than new_p's rounding interval, so one of them lands).
  # _opaque keeps LLVM from re-associating p + ((decayed − p) + step) inside the
  # check (measured: without it the check passed values that then missed).
  diff = _opaque(new_p - p32)
  candidates = [jnp.nextafter(diff, -jnp.inf), jnp.nextafter(diff, jnp.inf), diff]
  candidates.append(_opaque((decayed - p32) + step) if r.form.decays else step)
  target = lattice.f32_bits(new_p)
  u = candidates[0]
  for cand in candidates[1:]:  # the last (most natural) candidate has priority
    lands = lattice.f32_bits(_round_to(p32 + cand, dtype)) == target
    u = jnp.where(lands, cand, u)
  return new_p.astype(dtype), u, m_out, v_out


def _round_to(x, dtype):
  return lattice.bf16_round_trip(x) if dtype == jnp.bfloat16 else x


class TorchAdamW(NamedTuple):
  """torch.optim.AdamW as a pure pair over a parameter tree (`torch_adamw`)."""

  init: Callable  # init(params, coef=None) -> AdamWState; coef: a member's own values
  update: Callable  # update(grads, state, params) -> (new_params, updates, state)
  form: Form


def torch_adamw(hp: OptimConfig) -> TorchAdamW:
  """torch.optim.AdamW (torch 2.13, CPU default path) for `hp`, bit for bit.

  `init(params)` gives torch's fresh state (step 0, zero moments in each
  parameter's dtype) with `hp`'s coefficients in it; `init(params, coef)` a sweep
  member's own. `update(grads, state, params)` returns (torch's new params, f32
  updates for `optax.apply_updates`, new state): the step reads its coefficients
  from the state, so constants and traced values take one path. `hp` fixes the
  form (`Form`); its values are the defaults of `init`.
  """
  shape = form(hp)
  scalar_table(hp)  # fail early on unsupported betas

  def init(params, coef: Coefficients | None = None) -> AdamWState:
    zeros = lambda p: jnp.zeros_like(p)
    return AdamWState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                      nu=jax.tree.map(zeros, params),
                      coef=jax.tree.map(jnp.asarray, coefficients(hp) if coef is None else coef))

  return TorchAdamW(init, functools.partial(apply, shape), shape)


def apply(f: Form, grads, state: AdamWState, params):
  """One torch AdamW step of form `f` with the state's coefficients: (new_params, updates,
  new_state); new_params are torch's exactly (see `adamw` for the updates)."""
  return _update_tree(grads, state, params, Rule(state.coef, f))


def adamw(learning_rate: float, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0
          ) -> optax.GradientTransformation:
  """torch.optim.AdamW, bit for bit, as an optax GradientTransformation (`torch_adamw`).

  Decay and the Adam step stay in one transformation because torch rounds the
  decayed parameter before `addcdiv_`, and the step is never rounded on its
  own (module docstring). Params may be bf16 (params, moments and rounding in
  bf16, the lab's runs) or f32 (exact except where torch's own f32 sqrt is not
  correctly rounded; BUILD_NOTES.md). Note torch's default weight_decay is
  1e-2; this factory's is 0.0, the lab's Crucible setting.

  Returned updates are f32 such that `optax.apply_updates(params, updates)`
  yields torch's parameters exactly for bf16 params (and for f32 params with
  wd = 0); `torch_adamw(hp).update` returns torch's parameters directly in every
  case, and is what the trainer uses.

  Returns:
    An optax.GradientTransformation whose state is `AdamWState` (its coefficients
    carried in it).
  """
  opt = torch_adamw(OptimConfig(float(learning_rate), float(b1), float(b2), float(eps),
                                float(weight_decay)))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("adamw needs params: call update(grads, state, params)")
    _, u, state = opt.update(updates, state, params)
    return u, state

  return optax.GradientTransformation(opt.init, update_fn)


def init(params) -> AdamWState:
  """torch's fresh AdamW state (step 0, zero moments) without coefficients, for `step`."""
  return without_coefficients(torch_adamw(OptimConfig(1e-3)).init(params))


def step(hp: OptimConfig, params, grads, state: AdamWState):
  """One torch AdamW step of `hp` (`torch_adamw(hp)`): (torch's new params, state). A state
  without coefficients (`init`'s) is stepped with hp's own and comes back without them, so
  it can be a scan's carry."""
  full = state._replace(coef=coefficients(hp)) if state.coef is None else state
  new_params, _, new = apply(form(hp), grads, full, params)
  return new_params, new._replace(coef=state.coef)


def without_coefficients(state: AdamWState) -> AdamWState:
  """The state as a checkpoint stores it: count, mu, nu (the coefficients come from the
  config); its leaves and their names are the ones checkpoints always held."""
  return state._replace(coef=None)


def _exact_leaves(gs, ms, vs, r: Rule) -> list:
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
  parts = jax.lax.cond(needs_exact(*args, r), lambda a: exact_moments(*a, r), skip, args)
  start = 0
  for i in idx:
    shape = jnp.shape(ms[i])
    n = int(np.prod(shape, dtype=np.int64))
    out[i] = tuple(x[start:start + n].reshape(shape) for x in parts)
    start += n
  return out


def _update_tree(grads, state: AdamWState, params, r: Rule):
  """(new_params, updates, new_state) for a whole pytree."""
  count = state.count + 1
  scalars = lookup_scalars(count, r.c.table)
  treedef = jax.tree.structure(params)
  gs, ps = treedef.flatten_up_to(grads), jax.tree.leaves(params)
  ms, vs = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
  exact = _exact_leaves(gs, ms, vs, r)
  outs = [_leaf_update(Leaf(g, p, m, v, e), scalars, r)
          for g, p, m, v, e in zip(gs, ps, ms, vs, exact)]
  new_params, u, mu, nu = (treedef.unflatten(x) for x in zip(*outs))
  return new_params, u, state._replace(count=count, mu=mu, nu=nu)


def step_params(params, grads, state: AdamWState, tx: optax.GradientTransformation):
  """One step through the optax interface: `tx.update` then `optax.apply_updates`."""
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state
