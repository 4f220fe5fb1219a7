"""Precision policies: one config value picks how params, moments and compute are typed.

- `bf16`  : the lab's runs (`model.to(torch.bfloat16)`): params, Adam moments
            and compute all bf16; every optimizer op rounds to bf16, so dead rows
            live on the bf16 lattice and freeze once updates fall below ULP/2.
- `fp32`  : everything f32 (the lab's Thimble 2).
- `mixed` : f32 master params and f32 moments, a bf16 copy for the forward and
            backward pass (true AMP, HF `bf16=True`). The lab's first open
            question — do dead tokens still freeze with f32 master weights? —
            is `--precision=mixed` against `--precision=bf16`.

The optimizer needs no policy of its own: `jaxdt.optim.adamw` rounds in each
parameter's dtype, so bf16 params get bf16 moments and f32 params f32 ones.
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


POLICIES = {
    "bf16": Policy("bf16", jnp.bfloat16, jnp.bfloat16),
    "fp32": Policy("fp32", jnp.float32, jnp.float32),
    "mixed": Policy("mixed", jnp.float32, jnp.bfloat16),
}


def get_policy(name: str) -> Policy:
  """The policy called `name` ("bf16", "fp32" or "mixed")."""
  if name not in POLICIES:
    raise ValueError(f"unknown precision {name!r}; use one of {sorted(POLICIES)}")
  return POLICIES[name]


def cast_params(params, policy: Policy):
  """Casts freshly initialised (f32) params to the stored dtype, as `model.to(dtype)` does."""
  return jax.tree.map(lambda p: p.astype(policy.param_dtype), params)


def compute_params(params, policy: Policy):
  """The copy the model runs on. Under `mixed` its gradient flows back to the
  f32 master through the cast, so grads arrive in f32 holding bf16-computed values."""
  return jax.tree.map(lambda p: p.astype(policy.compute_dtype), params)
