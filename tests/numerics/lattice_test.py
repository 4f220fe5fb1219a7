"""Exhaustive checks of the bf16 lattice tools over all 65,536 bit patterns."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxdt.numerics import lattice

BF16 = ml_dtypes.bfloat16
ALL_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
ALL = ALL_BITS.view(BF16)
FINITE = np.isfinite(ALL.astype(np.float32))
BF16_MAX = float(ml_dtypes.finfo(BF16).max)


def lab_ulp_numpy(w):
  """The lab's compute_ulp_bf16 (docs/definitions.md §ULP and ΔW′), in numpy f32 (keeps subnormals)."""
  e = (w.view(np.uint16).astype(np.int32) >> 7) & 0xFF
  e = np.where(e == 0, 1, e)
  return np.power(np.float32(2.0), (e - 134).astype(np.float32))


def lab_delta_w_prime_numpy(w_prev, w_next):
  """The lab's ΔW′ = (W_next.float() − W_prev.float()) / ulp, numpy f32."""
  with np.errstate(over="ignore", invalid="ignore"):
    return (w_next.astype(np.float32) - w_prev.astype(np.float32)) / lab_ulp_numpy(w_prev)


# Bits.


def test_bits_round_trip_every_pattern():
  bits = np.asarray(lattice.bf16_to_bits(jnp.asarray(ALL)))
  np.testing.assert_array_equal(bits, ALL_BITS)
  back = np.asarray(lattice.bits_to_bf16(jnp.asarray(ALL_BITS)))
  np.testing.assert_array_equal(back.view(np.uint16), ALL_BITS)


def test_wrong_dtypes_are_rejected():
  with pytest.raises(TypeError):
    lattice.bf16_to_bits(np.zeros(3, np.float32))
  with pytest.raises(TypeError):
    lattice.bits_to_bf16(np.zeros(3, np.int32))


# ULP.


def test_ulp_equals_numpy_spacing_for_every_finite_value_but_max():
  ulp = np.asarray(jax.jit(lattice.ulp)(ALL))
  with np.errstate(invalid="ignore"):
    spacing = np.abs(np.spacing(ALL)).astype(np.float32)
  is_max = np.abs(ALL.astype(np.float32)) == BF16_MAX
  check = FINITE & ~is_max
  assert check.sum() == 65536 - 256 - 2  # 256 inf/NaN patterns, ±max
  np.testing.assert_array_equal(lattice.np_bits(ulp[check]), lattice.np_bits(spacing[check]))
  # Documented exception: numpy says inf at ±max (the next value overflows);
  # the lab's formula gives 2^(254 - 134).
  np.testing.assert_array_equal(ulp[is_max], np.float32(2.0**120))
  assert np.all(np.isinf(spacing[is_max]))


def test_ulp_matches_the_lab_formula_bitwise_for_all_patterns():
  ulp = np.asarray(jax.jit(lattice.ulp)(ALL))
  np.testing.assert_array_equal(lattice.np_bits(ulp), lattice.np_bits(lab_ulp_numpy(ALL)))


def test_sanity_values():
  w = np.array([1.0, 0.01, 0.0, -1.0], BF16)
  np.testing.assert_array_equal(np.asarray(lattice.ulp(w)),
                                np.float32([2.0**-7, 2.0**-14, 2.0**-133, 2.0**-7]))


# Lattice displacement.


def _step(toward):
  x = ALL[FINITE]
  y = np.nextafter(x, np.array(toward, BF16))
  ok = np.isfinite(y.astype(np.float32)) & (y.view(np.uint16) != x.view(np.uint16))
  d = np.asarray(jax.jit(lattice.lattice_displacement)(x[ok], y[ok]))
  return x[ok], y[ok], d


def test_one_step_away_from_zero_is_exactly_one_cell():
  for toward in (np.inf, -np.inf):
    x, y, d = _step(toward)
    away = np.abs(y.astype(np.float32)) > np.abs(x.astype(np.float32))
    np.testing.assert_array_equal(np.abs(d[away]), 1.0)
    np.testing.assert_array_equal(np.sign(d[away]), np.sign(toward))


def test_one_step_toward_zero_is_one_cell_or_half_from_a_power_of_two():
  for toward in (np.inf, -np.inf):
    x, y, d = _step(toward)
    xf = np.abs(x.astype(np.float32))
    inward = (np.abs(y.astype(np.float32)) < xf) & (xf > 0)
    frac = x.view(np.uint16) & 0x7F
    expo = (x.view(np.uint16) >> 7) & 0xFF
    power_of_two = (frac == 0) & (expo > 1)  # the gap below 2^e (e > -126) is half a ULP
    np.testing.assert_array_equal(np.abs(d[inward & power_of_two]), 0.5)
    np.testing.assert_array_equal(np.abs(d[inward & ~power_of_two]), 1.0)
    assert (inward & power_of_two).sum() > 250


def test_matches_the_lab_f32_formula_bitwise_on_random_pairs():
  # Includes subnormals, zeros and huge values; numpy keeps f32 subnormals as
  # the lab's device did, while XLA:CPU flushes them: the bit-built version
  # must not care.
  rng = np.random.default_rng(0)
  fin = ALL_BITS[FINITE]
  a = fin[rng.integers(0, fin.size, 1_000_000)].view(BF16)
  b = fin[rng.integers(0, fin.size, 1_000_000)].view(BF16)
  # Also pairs one or a few cells apart, the case that matters in training.
  near = (a.view(np.uint16).astype(np.int32) + rng.integers(-3, 4, a.size))
  near = np.clip(near, 0, 65535).astype(np.uint16).view(BF16)
  near_ok = np.isfinite(near.astype(np.float32))
  for prev, nxt in ((a, b), (a[near_ok], near[near_ok])):
    ours = np.asarray(jax.jit(lattice.lattice_displacement)(prev, nxt))
    np.testing.assert_array_equal(lattice.np_bits(ours),
                                  lattice.np_bits(lab_delta_w_prime_numpy(prev, nxt)))


def test_subnormal_steps():
  tiny = np.array([0.0, 2.0**-133, 2.0**-130, -(2.0**-133)], np.float32).astype(BF16)
  up = np.nextafter(tiny, np.array(np.inf, BF16))
  np.testing.assert_array_equal(np.asarray(lattice.lattice_displacement(tiny, up)), 1.0)


# Rounding.


def test_round_to_bf16_matches_ml_dtypes_rne():
  rng = np.random.default_rng(1)
  x = rng.standard_normal(1_000_000).astype(np.float32)
  x *= np.float32(10.0) ** rng.integers(-45, 38, x.size).astype(np.float32)
  x = np.concatenate([x, np.float32([0, -0.0, np.inf, -np.inf, 3.3961776e38]),
                      # exact ties, to even both ways
                      (ALL_BITS[FINITE].astype(np.uint32) << 16 | 0x8000).view(np.float32)])
  ours = np.asarray(jax.jit(lattice.round_to_bf16)(x))
  np.testing.assert_array_equal(ours.view(np.uint16), x.astype(BF16).view(np.uint16))


def test_nan_stays_nan():
  x = np.array([np.nan, -np.nan], np.float32)
  assert np.all(np.isnan(np.asarray(lattice.round_to_bf16(x)).astype(np.float32)))


def test_in_ulps_is_exact_scaling():
  w = ALL[FINITE]
  x = np.ones(w.shape, np.float32)
  got = np.asarray(jax.jit(lattice.in_ulps)(x, w))
  with np.errstate(over="ignore"):
    want = x / lab_ulp_numpy(w)
  np.testing.assert_array_equal(lattice.np_bits(got), lattice.np_bits(want))
