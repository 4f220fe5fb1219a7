"""In-scan Adam accounting: replay is exact, textbook metrics behave as the lab saw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdt import config as config_lib
from jaxdt.optim import accounting
from jaxdt.optim import adamw

ROWS, DIM, STEPS = 64, 16, 60


def trajectory(lr=1e-3, wd=0.0, dtype=jnp.bfloat16, seed=0):
  """W[0..T], m[1..T], v[1..T] from our (torch-exact) optimizer on a toy stream."""
  hp = config_lib.OptimConfig(lr, weight_decay=wd)
  key = jax.random.key(seed)
  w = (jax.random.normal(key, (ROWS, DIM)) * 0.02).astype(dtype)
  grads = (jax.random.normal(jax.random.fold_in(key, 1), (STEPS, ROWS, DIM)) * 1e-4).astype(dtype)
  tx = adamw.adamw(lr, weight_decay=wd)

  def body(carry, g):
    w, s = carry
    w2, s2 = adamw.step(hp, w, g, s)
    return (w2, s2), (w, w2, s2.mu, s2.nu)

  _, ys = jax.lax.scan(body, (w, tx.init(w)), grads)
  return hp, ys


def test_replay_match_is_one_on_every_step():
  for dtype in (jnp.bfloat16, jnp.float32):
    hp, (w_prev, w_next, m, v) = trajectory(dtype=dtype)
    ts = jnp.arange(1, STEPS + 1)
    out = jax.jit(jax.vmap(lambda *a: accounting.metrics(*a, hp)))(w_prev, w_next, m, v, ts)
    np.testing.assert_array_equal(np.asarray(out["replay_match"]), 1.0)


def test_fractions_are_exact_at_the_lab_size():
  # jnp.mean multiplies by 1/n: 237,312 matches gave 0.99999994, not 1.0.
  hp = config_lib.OptimConfig(1e-3)
  w = jnp.full((3708, 64), 0.5, jnp.bfloat16)
  m = jnp.zeros_like(w)
  v = jnp.ones_like(w)
  out = jax.jit(lambda *a: accounting.metrics(*a, hp))(w, w, m, v, jnp.int32(100))
  assert float(out["replay_match"]) == 1.0
  assert float(out["swallowed"]) == 0.0


def test_replay_detects_a_wrong_state():
  hp, (w_prev, w_next, m, v) = trajectory()
  out = accounting.metrics(w_prev[5], w_next[5], -m[5], v[5], 6, hp)
  assert float(out["replay_match"]) < 0.5


def test_step_one_textbook_agrees_with_the_realized_step():
  # The lab's t=1: cosine 0.999925, ratio 1.012 (docs/definitions.md §Adam accounting).
  hp, (w_prev, w_next, m, v) = trajectory(lr=1e-3)
  first = accounting.metrics(w_prev[0], w_next[0], m[0], v[0], 1, hp)
  assert float(first["cosine"]) > 0.99
  assert float(first["norm_ratio"]) == pytest.approx(1.0, abs=0.05)


def test_sub_ulp_updates_are_counted_as_swallowed():
  # lr=1e-4 at |W|~0.02 (ULP ~1.2e-4): many updates are below ULP/2 and vanish.
  hp, (w_prev, w_next, m, v) = trajectory(lr=1e-4)
  first = accounting.metrics(w_prev[0], w_next[0], m[0], v[0], 1, hp)
  assert float(first["swallowed"]) > 0.05
  # max_ulp_error is max |realized − textbook| / ULP(W[t-1]), recomputed here.
  realized = np.asarray(w_next[0], np.float32) - np.asarray(w_prev[0], np.float32)
  text = np.asarray(accounting.textbook_delta(w_prev[0], m[0], v[0], 1, hp))
  bits = np.asarray(w_prev[0]).view(np.uint16).astype(np.int32)
  ulp = 2.0 ** (np.maximum((bits >> 7) & 0xFF, 1) - 134)
  assert float(first["max_ulp_error"]) == np.float32(np.max(np.abs(realized - text) / ulp))


def test_frozen_rows_give_nan_cosine_and_inf_ratio():
  hp = config_lib.OptimConfig(1e-3)
  w = jnp.ones((4, 4), jnp.bfloat16)
  m = jnp.full((4, 4), 1e-9, jnp.bfloat16)
  v = jnp.full((4, 4), 1.0, jnp.bfloat16)
  out = accounting.metrics(w, w, m, v, 100, hp)
  assert np.isnan(float(out["cosine"]))
  assert np.isinf(float(out["norm_ratio"]))
  assert float(out["swallowed"]) == 1.0
  assert float(out["replay_match"]) == 1.0


def test_textbook_matches_formula():
  hp = config_lib.OptimConfig(1e-3, weight_decay=0.1)
  w = jnp.float32([[0.5, -0.25]])
  m = jnp.float32([[1e-3, -2e-3]])
  v = jnp.float32([[1e-6, 4e-6]])
  t = 3
  want = (-1e-3 * (np.float32(m) / (1 - 0.9**t)) / (np.sqrt(np.float32(v) / (1 - 0.999**t)) + 1e-8)
          - 1e-3 * 0.1 * np.float32(w))
  np.testing.assert_allclose(np.asarray(accounting.textbook_delta(w, m, v, t, hp)), want, rtol=1e-5)
