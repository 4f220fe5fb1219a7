"""bf16 lattice tools: bit views, the lab's ULP, lattice displacement, exact rounding.

Every function here is exact: it is built from integer bit operations and
multiplications by powers of two, so it gives the same bits on CPU (which
flushes f32 subnormals) and on GPU/TPU. Inputs may be numpy or JAX arrays.

Definitions (docs/definitions.md §ULP and ΔW′):

  E      = (bits(W) >> 7) & 0xFF               raw 8-bit exponent
  ULP    = 2^(max(E, 1) - 134)                  134 = 127 bias + 7 mantissa bits
  ΔW′[t] = (W[t] - W[t-1]) / ULP(W[t-1])        f32, "cells"
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The ULP of a bf16 value is 2^(max(E,1) - ULP_BIAS).
ULP_BIAS = 134


def bf16_to_bits(x) -> jax.Array:
  """Views bf16 values as their uint16 bit patterns (no conversion)."""
  x = jnp.asarray(x)
  if x.dtype != jnp.bfloat16:
    raise TypeError(f"bf16_to_bits needs bfloat16 input, got {x.dtype}")
  return jax.lax.bitcast_convert_type(x, jnp.uint16)


def bits_to_bf16(u) -> jax.Array:
  """Views uint16 bit patterns as bf16 values (no conversion)."""
  u = jnp.asarray(u)
  if u.dtype != jnp.uint16:
    raise TypeError(f"bits_to_bf16 needs uint16 input, got {u.dtype}")
  return jax.lax.bitcast_convert_type(u, jnp.bfloat16)


def f32_bits(x) -> jax.Array:
  """Views f32 values as uint32 bit patterns."""
  return jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)


def exponent_field(w) -> jax.Array:
  """The raw 8-bit exponent E of bf16 values, as int32."""
  return ((bf16_to_bits(w).astype(jnp.int32) >> 7) & 0xFF)


def pow2(e) -> jax.Array:
  """2^e as f32 for integer e in [-149, 127], built from bits (exact, even for subnormals)."""
  e = jnp.asarray(e, jnp.int32)
  normal = jnp.left_shift(jnp.clip(e + 127, 1, 254), 23)
  subnormal = jnp.left_shift(1, jnp.clip(e + 149, 0, 22))
  bits = jnp.where(e >= -126, normal, subnormal).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def ulp(w) -> jax.Array:
  """The lab's bf16 ULP of each element, as f32: 2^(max(E,1) - 134).

  Equals ml_dtypes' `np.spacing(|w|)` for every finite bf16 value except ±max,
  where numpy's spacing is inf (the next value up overflows) and this is 2^120.
  For E = 255 (inf, NaN) it returns 2^121, as the lab's formula does.

  Args:
    w: bf16 array.

  Returns:
    f32 array of the same shape; subnormal for |w| < 2^-119 (exact bits).
  """
  e = jnp.maximum(exponent_field(w), 1) - ULP_BIAS
  return pow2(e)


def _mantissa_units(w):
  """(integer significand with sign, max(E,1)) so that w = sig * 2^(max(E,1) - 134)."""
  u = bf16_to_bits(w).astype(jnp.int32)
  e_raw = (u >> 7) & 0xFF
  frac = u & 0x7F
  sig = jnp.where(e_raw > 0, frac | 0x80, frac)
  sig = jnp.where((u & 0x8000) != 0, -sig, sig)
  return sig, jnp.maximum(e_raw, 1)


def _ldexp_f32(x, d):
  """x * 2^d for f32 x and int d in [-252, 254], in two normal-range multiplies.

  The product is exact whenever the result is a normal f32; overflow gives ±inf.
  """
  d = jnp.clip(d, -252, 254)
  half = d // 2
  return (x * pow2(half)) * pow2(d - half)


def lattice_displacement(w_prev, w_next) -> jax.Array:
  """ΔW′ = (W_next − W_prev) / ULP(W_prev) as f32, bit-identical to the lab's f32 formula.

  The lab computes `(W_next.float() - W_prev.float()) / ulp(W_prev)` in f32 on a
  device that keeps subnormals. Here both values are written as integer
  significands in units of ULP(W_prev), so the one f32 rounding happens on the
  same real number and no subnormal intermediate is ever formed. Results are
  therefore the lab's bits on XLA:CPU too, whose f32 arithmetic flushes
  subnormals (`(a - b) / ulp` there gives 0 for |W| < 2^-126).

  A one-cell step up gives +1; a step down from a power of two gives -0.5.

  Args:
    w_prev: bf16 array, W[t-1].
    w_next: bf16 array, W[t] (same shape).

  Returns:
    f32 array of displacements in cells (±inf where the lab's value overflows).
  """
  sig_p, e_p = _mantissa_units(w_prev)
  sig_n, e_n = _mantissa_units(w_next)
  # w_next / ulp(w_prev) = sig_n * 2^(e_n - e_p); w_prev / ulp(w_prev) = sig_p.
  # If e_n < e_p then e_p >= 2, so |sig_p| >= 128 and the clipped tail of the
  # first term lies far below the rounding of the difference.
  scaled_next = _ldexp_f32(sig_n.astype(jnp.float32), e_n - e_p)
  cells = scaled_next - sig_p.astype(jnp.float32)
  # The lab's f32 difference itself overflows only for |W| near bf16 max.
  raw = jnp.asarray(w_next).astype(jnp.float32) - jnp.asarray(w_prev).astype(jnp.float32)
  return jnp.where(jnp.isinf(raw), raw, cells)


def in_ulps(x, w) -> jax.Array:
  """x / ULP(w) for f32 x, as an exact power-of-two scaling (no subnormal divisor).

  Works for bf16 w (the lab's ULP) and f32 w (f32 spacing 2^(max(E,1) - 150)).
  """
  w = jnp.asarray(w)
  if w.dtype == jnp.bfloat16:
    e = jnp.maximum(exponent_field(w), 1) - ULP_BIAS
  elif w.dtype == jnp.float32:
    e = jnp.maximum(((f32_bits(w) >> 23) & 0xFF).astype(jnp.int32), 1) - 150
  else:
    raise TypeError(f"in_ulps needs bf16 or f32 w, got {w.dtype}")
  return _ldexp_f32(jnp.asarray(x, jnp.float32), -e)


def round_to_bf16(x) -> jax.Array:
  """Rounds f32 to bf16 (round to nearest, ties to even) with integer ops.

  Bit-identical to a correctly rounded f32 -> bf16 conversion, including
  subnormal inputs, and immune to XLA's excess-precision rewrites (which may
  drop a `convert` pair). NaN stays NaN (quiet).

  Args:
    x: f32 array.

  Returns:
    bf16 array.
  """
  u = f32_bits(x)
  lsb = (u >> 16) & 1
  rounded = (u + jnp.uint32(0x7FFF) + lsb) >> 16
  is_nan = (u & 0x7FFFFFFF) > 0x7F800000
  out = jnp.where(is_nan, (u >> 16) | 0x0040, rounded).astype(jnp.uint16)
  return bits_to_bf16(out)


def bf16_round_trip(x) -> jax.Array:
  """f32 -> bf16 -> f32 with `round_to_bf16`: the f32 value of the nearest bf16."""
  return round_to_bf16(x).astype(jnp.float32)


def np_bits(x: np.ndarray) -> np.ndarray:
  """numpy: the unsigned-integer view of an array's bits (uint8/16/32/64 by item size:
  uint16 for bf16, uint32 for f32), for bit-exact comparisons."""
  x = np.asarray(x)
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def true_divide(x, s):
  """x / s as an IEEE division; a bare `x / scalar` becomes x · (1/s) in XLA."""
  return x / (s + x * 0)
