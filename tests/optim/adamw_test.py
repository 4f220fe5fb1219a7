"""Unit tests of jaxdt.optim that need no PyTorch (parity is in tests/parity)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from absl.testing import absltest, parameterized

from jaxdt import config as config_lib
from jaxdt.numerics import backend
from jaxdt.numerics import lattice
from jaxdt.optim import adamw

BF16 = ml_dtypes.bfloat16


class StateTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.params = {"E": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros((3,), jnp.float32)}
    self.tx = adamw.adamw(1e-3)

  def test_state_has_optax_fields_and_only_arrays(self):
    state = self.tx.init(self.params)
    self.assertEqual(state._fields, ("count", "mu", "nu"))
    self.assertEqual(state.count.dtype, jnp.int32)
    for leaf in jax.tree.leaves(state):
      self.assertIsInstance(leaf, jax.Array)
    mu = optax.tree_utils.tree_get(state, "mu")
    self.assertEqual(mu["E"].dtype, jnp.bfloat16)  # moments follow the param dtype
    self.assertEqual(mu["b"].dtype, jnp.float32)

  def test_update_without_params_is_an_error(self):
    state = self.tx.init(self.params)
    with self.assertRaisesRegex(ValueError, "needs params"):
      self.tx.update(self.params, state)

  def test_second_jitted_update_does_not_recompile(self):
    state = self.tx.init(self.params)
    step = jax.jit(lambda p, s, g: adamw.step_params(p, g, s, self.tx))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), self.params)
    p, s = step(self.params, state, grads)
    with jax.log_compiles():
      with self.assertNoLogs(level="WARNING"):
        p, s = step(p, s, grads)
    self.assertEqual(int(s.count), 2)

  def test_runs_inside_scan(self):
    state = self.tx.init(self.params)
    grads = jax.tree.map(lambda p: jnp.full((5,) + p.shape, 0.25, p.dtype), self.params)

    def body(carry, g):
      p, s = carry
      return adamw.step_params(p, g, s, self.tx), None

    (p, s), _ = jax.jit(lambda c, g: jax.lax.scan(body, c, g))((self.params, state), grads)
    self.assertEqual(int(s.count), 5)
    self.assertEqual(p["E"].dtype, jnp.bfloat16)


class ScalarsTest(parameterized.TestCase):

  @parameterized.parameters((1e-3, 0.9, 0.999), (3e-4, 0.9, 0.999), (1e-3, 0.8, 0.99))
  def test_table_rows_are_the_host_scalars_and_settle(self, lr, b1, b2):
    hp = config_lib.OptimConfig(lr, b1, b2)
    table = adamw.scalar_table(hp)
    for t in [t for t in (1, 2, 10, 2934, 4923) if t < len(table)] + [len(table) - 1]:
      np.testing.assert_array_equal(table[t], adamw.torch_step_scalars(hp, t))
    # Past the table every step uses its last row: check that this is right.
    for t in (table.shape[0], table.shape[0] + 1000, 10**6):
      np.testing.assert_array_equal(table[-1], adamw.torch_step_scalars(hp, t))
    got = jax.jit(lambda t: adamw.lookup_scalars(hp, t))(jnp.int32(10**6))
    np.testing.assert_array_equal(np.asarray(got), table[-1])

  def test_step_one_scalars_are_torch_floats(self):
    hp = config_lib.OptimConfig(1e-3)
    s = adamw.torch_step_scalars(hp, 1)
    self.assertEqual(s[adamw.NEG_STEP_SIZE], np.float32(-1e-3 / (1 - 0.9)))
    self.assertEqual(s[adamw.BC2_SQRT], np.float32((1 - 0.999) ** 0.5))

  def test_betas_too_close_to_one_are_refused(self):
    with self.assertRaisesRegex(ValueError, "do not settle"):
      adamw.adamw(1e-3, b2=0.9999999)


class CompilerTest(absltest.TestCase):

  def test_backend_contracts_fma(self):
    # adamw's exactness relies on it (lerp_ and addcmul_ are FMAs in torch).
    self.assertTrue(backend.fma_contracts())

  def test_bias_correction_is_a_true_division_in_compiled_hlo(self):
    v = jnp.ones((8,), jnp.float32)
    hlo = jax.jit(lambda v, s: lattice.true_divide(v, s)).lower(v, jnp.float32(0.5)).compile().as_text()
    self.assertIn("divide", hlo)

  def test_true_division_differs_from_reciprocal_multiply(self):
    # The rewrite x * (1/s) flips bf16 results at t = 2934 (docs/adamw.md).
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 2, 1 << 16).astype(np.float32)
    s = np.float32(0.7)
    got = np.asarray(jax.jit(lattice.true_divide)(x, s))
    np.testing.assert_array_equal(got, x / s)  # numpy divides per element


class BehaviourTest(absltest.TestCase):

  def test_first_step_moves_every_coordinate_by_lr(self):
    # At t=1 bias correction cancels: m̂ = g, v̂ = g², so |ΔW| ≈ lr (docs/adamw.md).
    rng = np.random.default_rng(0)
    p = jnp.asarray((rng.standard_normal((64, 64)) * 0.02 + 1.0).astype(np.float32))
    z = rng.standard_normal((64, 64))
    g = jnp.asarray((np.sign(z) * 1e-3 * (1 + np.abs(z))).astype(np.float32))
    tx = adamw.adamw(1e-3)
    new, _ = adamw.step_params(p, g, tx.init(p), tx)
    np.testing.assert_allclose(np.abs(np.asarray(new - p)), 1e-3, rtol=1e-3)

  def test_sub_half_ulp_updates_are_rounded_away_in_bf16(self):
    p = jnp.full((4,), 1.0, jnp.bfloat16)  # ULP 2^-7: an lr=1e-4 step is < ULP/2
    g = jnp.full((4,), 1.0, jnp.bfloat16)
    tx = adamw.adamw(1e-4)
    new, state = adamw.step_params(p, g, tx.init(p), tx)
    np.testing.assert_array_equal(np.asarray(new).view(np.uint16), np.asarray(p).view(np.uint16))
    self.assertGreater(float(state.mu[0]), 0)  # the moments still move


if __name__ == "__main__":
  absltest.main()
