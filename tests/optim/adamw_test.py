"""Unit tests of jaxdt.optim that need no PyTorch (parity is in tests/parity)."""

import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from jaxdt import config as config_lib
from jaxdt.numerics import backend
from jaxdt.numerics import lattice
from jaxdt.optim import adamw

BF16 = ml_dtypes.bfloat16


def _params():
  return {"E": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros((3,), jnp.float32)}


def _tx():
  return adamw.adamw(1e-3)


# State.


def test_state_has_optax_fields_and_only_arrays():
  state = _tx().init(_params())
  assert state._fields == ("count", "mu", "nu", "coef")  # coefficients carried, as
  # optax.inject_hyperparams carries its hyperparameters
  assert float(state.coef.lr) == np.float32(1e-3) and state.coef.table.shape[1] == 4
  assert state.count.dtype == jnp.int32
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, jax.Array)
  mu = optax.tree_utils.tree_get(state, "mu")
  assert mu["E"].dtype == jnp.bfloat16  # moments follow the param dtype
  assert mu["b"].dtype == jnp.float32


def test_update_without_params_is_an_error():
  params, tx = _params(), _tx()
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state)


def test_second_jitted_update_does_not_recompile(caplog):
  params, tx = _params(), _tx()
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: adamw.step_params(p, g, s, tx))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  p, s = step(params, state, grads)
  with jax.log_compiles():
    with caplog.at_level(logging.WARNING):  # as unittest's assertNoLogs(level="WARNING")
      caplog.clear()
      p, s = step(p, s, grads)
      assert not caplog.records, caplog.text
  assert int(s.count) == 2


def test_runs_inside_scan():
  params, tx = _params(), _tx()
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full((5,) + p.shape, 0.25, p.dtype), params)

  def body(carry, g):
    p, s = carry
    return adamw.step_params(p, g, s, tx), None

  (p, s), _ = jax.jit(lambda c, g: jax.lax.scan(body, c, g))((params, state), grads)
  assert int(s.count) == 5
  assert p["E"].dtype == jnp.bfloat16


# Scalars.


@pytest.mark.parametrize("lr, b1, b2", [(1e-3, 0.9, 0.999), (3e-4, 0.9, 0.999), (1e-3, 0.8, 0.99)])
def test_table_rows_are_the_host_scalars_and_settle(lr, b1, b2):
  hp = config_lib.OptimConfig(lr, b1, b2)
  table = adamw.scalar_table(hp)
  for t in [t for t in (1, 2, 10, 2934, 4923) if t < len(table)] + [len(table) - 1]:
    np.testing.assert_array_equal(table[t], adamw.torch_step_scalars(hp, t))
  # Past the table every step uses its last row: check that this is right.
  for t in (table.shape[0], table.shape[0] + 1000, 10**6):
    np.testing.assert_array_equal(table[-1], adamw.torch_step_scalars(hp, t))
  got = jax.jit(lambda t: adamw.lookup_scalars(t, table))(jnp.int32(10**6))
  np.testing.assert_array_equal(np.asarray(got), table[-1])


def test_step_one_scalars_are_torch_floats():
  hp = config_lib.OptimConfig(1e-3)
  s = adamw.torch_step_scalars(hp, 1)
  assert s[adamw.NEG_STEP_SIZE] == np.float32(-1e-3 / (1 - 0.9))
  assert s[adamw.BC2_SQRT] == np.float32((1 - 0.999) ** 0.5)


def test_betas_too_close_to_one_are_refused():
  with pytest.raises(ValueError, match="do not settle"):
    adamw.adamw(1e-3, b2=0.9999999)


# Compiler.


def test_backend_contracts_fma():
  # adamw's exactness relies on it (lerp_ and addcmul_ are FMAs in torch).
  assert backend.fma_contracts()


def test_bias_correction_is_a_true_division_in_compiled_hlo():
  v = jnp.ones((8,), jnp.float32)
  hlo = jax.jit(lambda v, s: lattice.true_divide(v, s)).lower(v, jnp.float32(0.5)).compile().as_text()
  assert "divide" in hlo


def test_true_division_differs_from_reciprocal_multiply():
  # The rewrite x * (1/s) flips bf16 results at t = 2934 (docs/adamw.md).
  rng = np.random.default_rng(0)
  x = rng.uniform(1, 2, 1 << 16).astype(np.float32)
  s = np.float32(0.7)
  got = np.asarray(jax.jit(lattice.true_divide)(x, s))
  np.testing.assert_array_equal(got, x / s)  # numpy divides per element


# Behaviour.


def test_first_step_moves_every_coordinate_by_lr():
  # At t=1 bias correction cancels: m̂ = g, v̂ = g², so |ΔW| ≈ lr (docs/adamw.md).
  rng = np.random.default_rng(0)
  p = jnp.asarray((rng.standard_normal((64, 64)) * 0.02 + 1.0).astype(np.float32))
  z = rng.standard_normal((64, 64))
  g = jnp.asarray((np.sign(z) * 1e-3 * (1 + np.abs(z))).astype(np.float32))
  tx = adamw.adamw(1e-3)
  new, _ = adamw.step_params(p, g, tx.init(p), tx)
  np.testing.assert_allclose(np.abs(np.asarray(new - p)), 1e-3, rtol=1e-3)


def test_sub_half_ulp_updates_are_rounded_away_in_bf16():
  p = jnp.full((4,), 1.0, jnp.bfloat16)  # ULP 2^-7: an lr=1e-4 step is < ULP/2
  g = jnp.full((4,), 1.0, jnp.bfloat16)
  tx = adamw.adamw(1e-4)
  new, state = adamw.step_params(p, g, tx.init(p), tx)
  np.testing.assert_array_equal(np.asarray(new).view(np.uint16), np.asarray(p).view(np.uint16))
  assert float(state.mu[0]) > 0  # the moments still move
