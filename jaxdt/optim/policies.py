"""The optimizer step of each precision policy: torch's write-back, stochastic rounding, Kahan.

`step(policy, ...)` is the one optimizer call of the trained step. Under `bf16`, `mixed`
and `fp32` it is `adamw.apply` itself (torch's arithmetic, bit for bit) and the policy has
no state of its own. The two remedies for bf16's freeze keep bf16 parameters and bf16
moments, as the lab's runs do, and change how the new parameter is written back:

- `bf16_sr` follows torchao's `_AdamW(bf16_stochastic_round=True)` (its function
  single_param_adam, in its optim package): every op in f32 from the bf16 state, with no
  rounding between them. Decoupled decay p − (lr·wd)·p, in f32 (so, unlike under `bf16`,
  a small lr·wd is not lost before the write-back); m = lerp(m, g, 1 − β1) and
  v = lerp(v, g², 1 − β2) (a lerp for v too, not torch's mul_ + addcmul_);
  den = √v / √(1 − β2^t) + eps; p − lr·(m / (1 − β1^t)) / den. The moments are stored
  back to their bf16 buffers by a plain copy (`exp_avg.copy_(exp_avg_f32)`: round to
  nearest even, not stochastic), while the parameter update reads the unrounded f32
  moments of this step. The new parameter is written to bf16 by stochastic rounding: away
  from zero with probability (low 16 bits of its f32 pattern) / 2^16, as torchao's
  `_fp32_to_bf16_sr` does. Departures from torchao: the bias corrections are torch's
  float64 expressions rounded to f32 (`adamw.scalar_table`) where torchao raises its f32
  step tensor to a power, and the random bits come from a counter-based key (below)
  instead of torch's global generator. Like every f32 op on XLA:CPU, the f32 moments
  flush subnormals to zero.
- `bf16_kahan` follows optimi's Kahan summation (its Adam and AdamW, `kahan_sum=True`): the
  moments are torch's bf16 ops (`adamw.apply`'s, subnormals kept) and the Adam step
  s = (−step_size·m)/den is torch's f32 addcdiv term; the step is added into a bf16
  compensation buffer c first (optimi's addcdiv_ into kahan_comp, one rounding), the
  parameter takes p + c (one rounding), and what it could not take, c + (p_old − p_new),
  is kept in c for the next step. Decoupled decay rounds p·(1 − lr·wd) to bf16 first, as
  torch and optimi both do. Departure from optimi: torch's bias correction of the step
  size and its den = √v / √(1 − β2^t) + eps (`adamw.denominator`) instead of optimi's
  debiased betas and √v + eps, so the moments and the step are the lab's.

The stochastic bits of element e of parameter leaf i at step t are
`bits(fold_in(fold_in(sr_key, t), i), leaf shape)[e]`: a pure function of (SR key, t, leaf,
element), never of the chunk, the sweep or the process, so a run has the same bytes for any
`--chunk_steps`, as a sweep member and after a resume. The SR key is derived from the
config's `sr_seed` (default: the run's `seed`, with its own purpose constant,
`training.step.SR_PURPOSE`) and carried in the train state (`{"sr_key": key data}`), hence
in every checkpoint; the Kahan buffers are the state `{"kahan": bf16 tree like params}`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdt.numerics import lattice
from jaxdt.numerics import precision
from jaxdt.optim import adamw

SR_KEY, KAHAN = "sr_key", "kahan"  # keys of the policy state


def init(policy: precision.Policy, params, sr_key) -> dict:
  """The policy's own state at step 0: {} (torch's write-back), the SR key, or zero buffers.

  Args:
    policy: the precision policy.
    params: the step-0 params (already in the policy's dtype).
    sr_key: uint32 key data of the SR key (`jax.random.key_data`); read for `bf16_sr` only.
  """
  if policy.write_back == precision.STOCHASTIC:
    return {SR_KEY: jnp.asarray(sr_key, jnp.uint32)}
  if policy.write_back == precision.KAHAN:
    return {KAHAN: jax.tree.map(jnp.zeros_like, params)}
  return {}


def stochastic_round_bf16(x, rand) -> jax.Array:
  """f32 -> bf16 by stochastic rounding (torchao's `_fp32_to_bf16_sr`), in integer ops.

  Rounds away from zero when (rand mod 2^16) < the low 16 bits of x's f32 pattern, else
  toward zero: one of x's two bf16 neighbours, the one away from zero with probability
  (|x| − |toward-zero neighbour|) / their spacing, so E[result] = x exactly.
  A bf16 value stays put. Away from zero past the largest bf16 gives ±inf (as torchao);
  NaN stays NaN (quiet).

  Args:
    x: f32 array.
    rand: uint32 array of x's shape (its low 16 bits are used).

  Returns:
    bf16 array.
  """
  u = lattice.f32_bits(x)
  toward_zero = u & jnp.uint32(0xFFFF0000)
  away = (jnp.asarray(rand).astype(jnp.uint32) & 0xFFFF) < (u & 0xFFFF)
  out = jnp.where(away, toward_zero + jnp.uint32(0x10000), toward_zero) >> 16
  is_nan = (u & 0x7FFFFFFF) > 0x7F800000
  out = jnp.where(is_nan, (u >> 16) | 0x0040, out).astype(jnp.uint16)
  return lattice.bits_to_bf16(out)


def kahan_add(p, comp, update):
  """optimi's Kahan-compensated write-back of an f32 update to a bf16 value.

  Args:
    p: f32 array holding bf16 values (the parameter, after any decay).
    comp: f32 array holding bf16 values (the compensation buffer).
    update: f32 array (the step to add).

  Returns:
    (new p, new comp), f32 arrays holding bf16 values.
  """
  r = lattice.bf16_round_trip
  c = r(comp + update)  # kahan_comp.addcdiv_(...): the step joins the compensation
  new = r(p + c)  # param.add_(kahan_comp)
  return new, r(c + r(p - new))  # kahan_comp.add_(old − new): what p could not take


def sr_bits(sr_key, t, leaf: int, shape) -> jax.Array:
  """uint32 bits for leaf `leaf` at step t: a pure function of (key, t, leaf, element)."""
  key = jax.random.wrap_key_data(jnp.asarray(sr_key, jnp.uint32))
  key = jax.random.fold_in(jax.random.fold_in(key, t), leaf)
  return jax.random.bits(key, tuple(shape), jnp.uint32)


def _lerp(start, end, weight):
  """torch's lerp in f32: start + w·(end − start) for w < 0.5, else end − (1 − w)·(end −
  start)."""
  diff = end - start
  return jnp.where(weight < 0.5, start + weight * diff, end - (1 - weight) * diff)


def sr_leaf(leaf: adamw.Leaf, scalars, r: adamw.Rule, rand):
  """One leaf of torchao's f32 AdamW step from bf16 state: (new p, m, v), all bf16.

  `leaf`: the leaf's grad, param and bf16 (exp_avg, exp_avg_sq) before the step;
  `scalars`: `adamw.lookup_scalars` of the step; `rand`: uint32 bits of p's shape
  (`sr_bits`).
  """
  c = r.c
  f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
  g, p, m, v = f32(leaf.g), f32(leaf.p), f32(leaf.m), f32(leaf.v)
  if r.form.decays:
    p = p - c.lr_wd * p  # p_f32 - lr * weight_decay * p_f32
  diff = g - m  # lerp(m, g, 1 - b1) in torch's form for this b1 (`adamw.Form`)
  m = c.lerp_weight * diff + m if r.form.lerp_from_m else c.lerp_weight * diff + g
  v = _lerp(v, g * g, c.one_minus_b2)
  den = lattice.true_divide(jnp.sqrt(v), scalars[adamw.BC2_SQRT]) + c.eps_f32
  new = p - (c.lr * lattice.true_divide(m, scalars[adamw.BC1])) / den
  return stochastic_round_bf16(new, rand), lattice.round_to_bf16(m), lattice.round_to_bf16(v)


def _check_bf16(params, name: str) -> None:
  bad = [x.dtype for x in jax.tree.leaves(params) if x.dtype != jnp.bfloat16]
  if bad:
    raise TypeError(f"{name} needs bf16 params, got {bad[0]}")


def sr_step(form: adamw.Form, params, grads, state: adamw.AdamWState, sr_key):
  """torchao's AdamW with stochastic rounding of the parameters: (params, AdamWState)."""
  _check_bf16(params, "bf16_sr")
  count = state.count + 1
  r = adamw.Rule(state.coef, form)
  scalars = adamw.lookup_scalars(count, r.c.table)
  treedef = jax.tree.structure(params)
  ps = jax.tree.leaves(params)
  gs, ms, vs = (treedef.flatten_up_to(x) for x in (grads, state.mu, state.nu))
  outs = [sr_leaf(adamw.Leaf(g, p, m, v, None), scalars, r, sr_bits(sr_key, count, i, p.shape))
          for i, (g, p, m, v) in enumerate(zip(gs, ps, ms, vs))]
  new_params, mu, nu = (treedef.unflatten(x) for x in zip(*outs))
  return new_params, state._replace(count=count, mu=mu, nu=nu)


def kahan_step(form: adamw.Form, params, grads, state: adamw.AdamWState, comp):
  """torch's bf16 AdamW with optimi's Kahan write-back: (params, AdamWState, comp).

  The moments are `adamw.apply`'s (torch's ops, subnormals kept); its torch-rounded
  parameters are not used (XLA drops them), the step term is taken from
  `adamw.param_update` on the new moments and added through `kahan_add`.
  """
  _check_bf16(params, "bf16_kahan")
  _, _, new_state = adamw.apply(form, grads, state, params)
  r = adamw.Rule(state.coef, form)
  scalars = adamw.lookup_scalars(new_state.count, r.c.table)
  treedef = jax.tree.structure(params)
  f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
  ps = jax.tree.leaves(params)
  ms, vs, cs = (treedef.flatten_up_to(x) for x in (new_state.mu, new_state.nu, comp))
  new_ps, new_cs = [], []
  for p, m, v, c in zip(ps, ms, vs, cs):
    _, update, decayed = adamw.param_update(f32(p), (f32(m), f32(v)), scalars, r, jnp.bfloat16)
    new_p, new_c = kahan_add(decayed, f32(c), update)
    new_ps.append(new_p.astype(jnp.bfloat16))
    new_cs.append(new_c.astype(jnp.bfloat16))
  return treedef.unflatten(new_ps), new_state, treedef.unflatten(new_cs)


def step(policy: precision.Policy, form: adamw.Form, params, grads, states):
  """One optimizer step under `policy`: (params, AdamWState, policy state).

  Args:
    policy: the precision policy.
    form: torch's arithmetic form for the run's hyperparameters (`adamw.form`); the values
      are the coefficients in the AdamWState.
    params, grads: the parameter and gradient trees.
    states: (AdamWState, the policy's own state from `init`).
  """
  opt_state, own = states
  if policy.write_back == precision.STOCHASTIC:
    new_params, opt_state = sr_step(form, params, grads, opt_state, own[SR_KEY])
    return new_params, opt_state, own
  if policy.write_back == precision.KAHAN:
    new_params, opt_state, comp = kahan_step(form, params, grads, opt_state, own[KAHAN])
    return new_params, opt_state, {KAHAN: comp}
  new_params, _, opt_state = adamw.apply(form, grads, opt_state, params)
  return new_params, opt_state, own
