"""IEEE f32 results with subnormals kept, on backends that flush them (XLA:CPU's FTZ/DAZ).

torch's CPU kernels keep f32 subnormals; XLA:CPU flushes every subnormal input
and result of an f32 operation to zero (`--xla_cpu_ftz=false` does not change
that). Conversions between bf16 and f32 are bit shifts and keep them. So an
f32 op whose operands or result can be subnormal is done here in a scaled
copy of the arithmetic, where nothing is subnormal:

  1. Scale: a value x becomes x·2^s, built from its bits (an integer
     significand times a power of two), never by a float multiply of a
     subnormal.
  2. Compute the op on the scaled values. Scaling by a power of two commutes
     with IEEE rounding wherever the unscaled result is normal, so the scaled
     result is torch's, scaled. The FMA's and product's exact rounding error
     comes from error-free transformations (`two_sum`, `two_prod`).
  3. Where the unscaled result is below 2^-126, torch's f32 rounds the exact
     value to the subnormal grid 2^-149 instead: `as_f32` re-rounds to that
     grid (2^(s-149) scaled), breaking the ties a first rounding created with
     the sign of the exact error.
  4. Round to bf16 as torch stores it (`bf16_of`): 8 significant bits for
     normal values, the subnormal grid 2^-133 below 2^-126; then unscale to
     bf16 bits with integer ops (`bf16_bits`).

Every helper is exact for scaled magnitudes within f32's normal range, which
the callers guarantee by choosing s and falling back to plain f32 for values
that would overflow. Products are split into 12-bit halves by bit masks, so
their partial products are exact and LLVM's FMA contraction (which XLA:CPU
applies under jit) cannot change them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdt.numerics import lattice

F32_MIN_NORMAL_LOG2 = -126  # 2^-126: below it, f32 is subnormal
F32_SUBNORMAL_LOG2 = -149  # the f32 subnormal grid
BF16_SUBNORMAL_LOG2 = -133  # the bf16 subnormal grid


def _opaque(x):
  """Identity that LLVM cannot see through (no FMA contraction across it)."""
  bits = lattice.f32_bits(x) | jnp.isnan(x).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def scaled(x, s: int) -> jax.Array:
  """x·2^s as f32, exactly, from the bits of f32 or bf16 x (subnormals included).

  Exact when |x|·2^s is a normal f32; the caller keeps it so.
  """
  x = jnp.asarray(x)
  u = lattice.f32_bits(x.astype(jnp.float32))  # bf16 -> f32 is a bit shift: kept
  e = ((u >> 23) & 0xFF).astype(jnp.int32)
  sig = (u & 0x7FFFFF) | jnp.where(e > 0, 0x800000, 0).astype(jnp.uint32)
  mag = sig.astype(jnp.float32) * lattice.pow2(jnp.maximum(e, 1) - 150 + s)
  return jnp.where((u >> 31) != 0, -mag, mag)


def two_sum(a, b):
  """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth; no underflow)."""
  s = a + b
  bb = s - a
  e = (a - (s - bb)) + (b - bb)
  return s, e


def split(x):
  """(hi, lo) with x = hi + lo exactly and at most 12 significant bits each (bit mask)."""
  hi = jax.lax.bitcast_convert_type(lattice.f32_bits(x) & jnp.uint32(0xFFFFF000), jnp.float32)
  return hi, x - hi


def two_prod(a, b):
  """(p, e) with p = fl(a·b) and a·b = p + e exactly (Dekker, with exact partial products)."""
  # a fresh multiply of an opaque copy: XLA cannot merge it with the caller's a·b, whose
  # FMA contraction must stay as it is
  p = _opaque(_opaque(a) * b)
  ah, al = split(a)
  bh, bl = split(b)
  e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
  return p, e


def sign_of_sum(a, b, c):
  """The exact sign (-1, 0, +1, as f32) of a + b + c for f32 a, b, c (no underflow)."""
  v, ve = two_sum(a, b)
  w, we = two_sum(v, c)
  return jnp.where(w != 0, jnp.sign(w), jnp.sign(we + ve))


def fma_residual_sign(a, b, c, r):
  """The sign of (a·b + c) − r, exactly, for r close to a·b + c (an FMA's result)."""
  p, pe = two_prod(a, b)
  s, se = two_sum(p, c)
  return sign_of_sum(s - r, se, pe)


def round_to_grid(r, residual_sign, log2_q: int):
  """r rounded to a multiple of 2^log2_q, to nearest, ties to even, where r is a first
  rounding of an exact value x and `residual_sign` the sign of x − r (ties r creates
  are broken toward x). The result keeps r's sign when it is zero."""
  t = r * lattice.pow2(jnp.int32(-log2_q))  # exact: a power-of-two scaling
  fl = jnp.floor(t)
  frac = t - fl
  odd = jnp.remainder(fl, 2) != 0
  up = (frac > 0.5) | ((frac == 0.5) & ((residual_sign > 0) | ((residual_sign == 0) & odd)))
  out = (fl + up.astype(jnp.float32)) * lattice.pow2(jnp.int32(log2_q))
  return jnp.where(out == 0, jnp.copysign(jnp.float32(0), r), out)


def as_f32(r, residual_sign, s: int):
  """torch's f32 result of an op, scaled by 2^s, from its correctly rounded scaled result:
  below 2^-126 (unscaled) the exact value goes to the subnormal grid 2^-149 instead."""
  tiny = jnp.abs(r) < lattice.pow2(jnp.int32(s + F32_MIN_NORMAL_LOG2))
  return jnp.where(tiny, round_to_grid(r, residual_sign, s + F32_SUBNORMAL_LOG2), r)


def bf16_of(f, s: int):
  """The bf16 value torch stores for f32 value f (both scaled by 2^s), as scaled f32."""
  tiny = jnp.abs(f) < lattice.pow2(jnp.int32(s + F32_MIN_NORMAL_LOG2))
  normal = lattice.bf16_round_trip(f)  # 8 significant bits: scaling commutes
  return jnp.where(tiny, round_to_grid(f, jnp.zeros_like(f), s + BF16_SUBNORMAL_LOG2), normal)


def bf16_bits(b, s: int) -> jax.Array:
  """The bf16 bits of b·2^-s for a scaled bf16 value b (`bf16_of`), by integer ops."""
  u = lattice.f32_bits(b)
  sign = ((u >> 16) & 0x8000).astype(jnp.uint16)
  e = ((u >> 23) & 0xFF).astype(jnp.int32) - s  # the unscaled exponent field
  normal = (((u >> 16) & 0x7FFF).astype(jnp.int32) - (s << 7)).astype(jnp.uint16)
  k = jnp.abs(b) * lattice.pow2(jnp.int32(-(s + BF16_SUBNORMAL_LOG2)))  # 0..127, exact
  sub = k.astype(jnp.uint16)
  return jnp.where(e >= 1, normal, sub) | sign
