"""Precision policies: one config value picks how params, moments and compute are typed.

- `bf16`  : the lab's runs (`model.to(torch.bfloat16)`): params, Adam moments
            and compute all bf16; every optimizer op rounds to bf16, so dead rows
            live on the bf16 lattice and freeze once updates fall below ULP/2.
- `fp32`  : everything f32 (the lab's Thimble 2).
- `mixed` : f32 master params and f32 moments, a bf16 copy for the forward and
            backward pass (true AMP, HF `bf16=True`). The lab's first open
            question — do dead tokens still freeze with f32 master weights? —
            is `--precision=mixed` against `--precision=bf16`.
- `bf16_sr`   : bf16 params and moments; the AdamW update in f32 from the bf16
            state and the new parameter written back by stochastic rounding
            (torchao's `_AdamW(bf16_stochastic_round=True)`).
- `bf16_kahan`: bf16 params and moments (torch's ops) with a bf16 Kahan
            compensation buffer per parameter (optimi's `kahan_sum`).

For the first three the optimizer needs no policy of its own: `jaxdt.optim.adamw`
rounds in each parameter's dtype, so bf16 params get bf16 moments and f32 params
f32 ones. The two remedies differ only in the write-back (`Policy.write_back`),
done by `jaxdt.optim.policies`.

What "frozen" means (ΔW′ is always in cells of the stored lattice, `probes.displacement`):
under `bf16` a row is frozen once its updates stay below half a ULP, and then it never
moves again until they grow; under `bf16_sr` no update is rounded away for good: an
update of a fraction f of a ULP moves an element by one cell with probability f, so a
"frozen" step of a row is a step where no element happened to move, and a row whose
updates are small moves rarely rather than never; under `bf16_kahan` a sub-half-ULP
update is kept in the compensation buffer, which accumulates until the pending sum
crosses half a ULP and the row then moves by a whole cell, so a frozen row is one whose
pending sum has not yet reached half a ULP (or whose updates cancel). Under `mixed` and
`fp32` the stored lattice is f32's and a row moves whenever its f32 update is nonzero.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Policy(NamedTuple):
  """Dtypes of a precision policy."""

  name: str
  param_dtype: jnp.dtype  # stored params (and, through adamw, the moments)
  compute_dtype: jnp.dtype  # the copy the model runs on; grads come back in param_dtype
  # How the optimizer writes the new parameter back (`jaxdt.optim.policies`): ROUND
  # (torch's one rounding of p + step), STOCHASTIC or KAHAN.
  write_back: str = "round"


ROUND, STOCHASTIC, KAHAN = "round", "stochastic", "kahan"

POLICIES = {
    "bf16": Policy("bf16", jnp.bfloat16, jnp.bfloat16),
    "fp32": Policy("fp32", jnp.float32, jnp.float32),
    "mixed": Policy("mixed", jnp.float32, jnp.bfloat16),
    "bf16_sr": Policy("bf16_sr", jnp.bfloat16, jnp.bfloat16, STOCHASTIC),
    "bf16_kahan": Policy("bf16_kahan", jnp.bfloat16, jnp.bfloat16, KAHAN),
}


def get_policy(name: str) -> Policy:
  """The policy called `name` (a key of `POLICIES`)."""
  if name not in POLICIES:
    raise ValueError(f"unknown precision {name!r}; use one of {', '.join(POLICIES)}")
  return POLICIES[name]


def cast_params(params, policy: Policy):
  """Casts freshly initialised (f32) params to the stored dtype, as `model.to(dtype)` does."""
  return jax.tree.map(lambda p: p.astype(policy.param_dtype), params)


def compute_params(params, policy: Policy):
  """The copy the model runs on. Under `mixed` its gradient flows back to the
  f32 master through the cast, so grads arrive in f32 holding bf16-computed values."""
  return jax.tree.map(lambda p: p.astype(policy.compute_dtype), params)
