"""Tied logits + cross entropy, blockwise, with a custom VJP.

`tied_logits_nll(h, E, targets)` is the mean next-token NLL of logits h @ E.T
without materialising the (B, T, V) logits; see the comment below.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxdt.model import tinylm


# -- Tied logits + cross entropy, blockwise ------------------------------------
# The tied logits are most of a lab-size step's FLOPs, and (B*T, V) f32 at
# B = T = 128, V = 10,000 is hundreds of MB: materialised, the logits, their
# log-softmax and their gradient stream several times that through memory every step. Here each block
# of rows does logits -> loss -> dlogits -> (dh, dE) while its (rows, V) slab is
# in cache, and the forward pass already computes the gradients (one pass over
# the logits instead of a recompute in the backward pass).
# Target rows per block (blocks are whole sequences), `config.ModelConfig.nll_block_rows`;
# its "auto" (0) by backend: on CPU a (rows, V) f32 slab that stays in the
# last-level cache (the size is a speed knob; BUILD_NOTES has the timings).
# Elsewhere one block: a GPU wants few, large GEMMs more than cache locality.
AUTO_BLOCK_ROWS = {"cpu": 512}
ONE_BLOCK = 0  # resolved value: all rows in one block


def resolve_block_rows(setting: int, backend: str) -> int:
  """The block size a run uses: `setting`, or for 0 (auto) the backend's (ONE_BLOCK = 0:
  all rows in one block). Resolved on the host, recorded in metadata, passed as a value."""
  return setting if setting else AUTO_BLOCK_ROWS.get(backend, ONE_BLOCK)


def _tied_nll_block(gemm, table, scale, h, targets):
  """(nll, dlogits as a GEMM operand, dh in f32) of one block; h (R, D), targets (R,)."""
  cd = h.dtype
  logits = tinylm.matmul(h, table, 1, gemm)  # (R, V) f32
  # torch's logits tensor is bf16 under bf16: round, but keep computing in f32.
  # Rounding is monotone, so the max of the rounded logits is the rounded max of
  # the GEMM's output: the max reads that output directly and the rounding fuses
  # into the passes that follow (no rounded copy of the slab is ever written).
  m = jax.lax.stop_gradient(
      jax.lax.reduce_precision(logits.max(-1, keepdims=True), *tinylm.bits(cd)))
  logits = jax.lax.reduce_precision(logits, *tinylm.bits(cd))
  e = jnp.exp(logits - m)
  s = e.sum(-1, keepdims=True)
  picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)  # (R, 1)
  nll = (m + jnp.log(s) - picked)[:, 0]  # (R,)
  onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[:, None]
  # d(mean nll)/d logits = (softmax - onehot) / N, rounded to the logits' dtype
  # as torch's autograd hands a bf16 gradient to the bf16 matmul.
  dlogits = tinylm.operand((e * (1 / s) - onehot) * scale, gemm, cd)  # (R, V)
  dh = tinylm.matmul(dlogits, table, 0, gemm)  # (R, D) f32
  return nll, dlogits, dh


def _tied_nll_scan(gemm, h, table, targets):
  """Loss and both gradients (for a unit cotangent), block by block."""
  nb, r, d = h.shape  # (blocks, rows, D)
  scale = jnp.float32(1 / (nb * r))

  def body(d_table_t, xs):
    hb, tb = xs
    nll, dlogits, dh = _tied_nll_block(gemm, table, scale, hb, tb)
    # dE^T += h^T dlogits, accumulated in f32 over blocks, rounded once at the end.
    # Kept as (D, V): contracting the block's rows with a (D, V) output runs on
    # XLA:CPU's fast GEMM kernel; the (V, D) layout falls back to a slower one.
    d_table_t = d_table_t + tinylm.matmul(hb.T, dlogits, 0, gemm)
    return d_table_t, (nll, dh)

  d_table_t, (nll, dh) = jax.lax.scan(
      body, jnp.zeros(table.shape[::-1], jnp.float32), (h, targets))
  return jnp.mean(nll), dh, d_table_t.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tied_nll(gemm, h, table, targets):
  """The mean NLL of (blocks, rows, D) h; `gemm` (a static value) is the GEMM operand dtype."""
  nll = jax.lax.map(lambda xs: _tied_nll_block(gemm, table, 0.0, *xs)[0], (h, targets))
  return jnp.mean(nll)


def _tied_nll_fwd(gemm, h, table, targets):
  loss, dh, d_table = _tied_nll_scan(gemm, h, table, targets)
  # Rounded here, once, to the primal dtypes (the cotangents' dtypes).
  return loss, (dh.astype(h.dtype), d_table.astype(table.dtype))


def _tied_nll_bwd(gemm, res, g):
  del gemm
  dh, d_table = res
  # value_and_grad's cotangent is 1.0, so g * x is exact and these are the bits
  # a separate backward pass would give; any other g rounds twice. Integer
  # targets get no cotangent.
  g = g.astype(jnp.float32)
  return ((g * dh.astype(jnp.float32)).astype(dh.dtype),
          (g * d_table.astype(jnp.float32)).astype(d_table.dtype), None)


_tied_nll.defvjp(_tied_nll_fwd, _tied_nll_bwd)


def _blocks(n_seq: int, seq_len: int, target_rows: int) -> int:
  """Sequences per block: the largest divisor of n_seq with at most target_rows rows."""
  best = 1
  for k in range(1, n_seq + 1):
    if n_seq % k == 0 and k * seq_len <= target_rows:
      best = k
  return best


def tied_logits_nll(h: jax.Array, table: jax.Array, targets: jax.Array, *, gemm: str,
                    block_rows: int) -> jax.Array:
  """Mean next-token cross entropy of the tied logits `h @ table.T`, blockwise.

  Equals `mean(-log_softmax(logits.astype(f32))[targets])` with
  `logits = (h @ table.T)` accumulated in f32 and rounded to h's dtype (what
  `apply` returns), up to f32 summation order, but never holds the (B, T, V)
  logits: blocks of whole sequences (about `block_rows` rows) go through
  logits, loss and gradient while they are in cache. Under `jax.grad` the
  forward pass computes the gradients too (the logits are made once): dlogits
  = (softmax - onehot) / N rounded to h's dtype, dh = dlogits @ table and
  dtable = dlogits^T @ h, both accumulated in f32 and rounded once.

  Args:
    h: (B, T, D) final hidden states (post-ln_f), any float dtype.
    table: (V, D) the tied token table, h's dtype.
    targets: (B, T) int target ids.
    gemm: operand dtype of bf16 GEMMs, "float32" or "bfloat16" (`tinylm.resolve_gemm`).
    block_rows: target rows per block (a speed knob: it changes only the f32
      summation order of dtable; `resolve_block_rows`); 0 = all rows in one block.

  Returns:
    f32 scalar, the mean over all B * T targets.
  """
  B, T, D = h.shape
  k = _blocks(B, T, block_rows or B * T)
  hb = h.reshape(B // k, k * T, D)  # (blocks, rows, D)
  tb = targets.reshape(B // k, k * T).astype(jnp.int32)
  return _tied_nll(gemm, hb, table, tb)
