"""Batches as pure functions of (key, step), traced inside the step.

As in levanter: a keyed Feistel permutation of the sequence index, reseeded
per epoch, so any step's batch can be recomputed on resume without saved
iterator state.

Index vocabulary: `step` t is 1-based (the lab's step 1 is the first update);
step t draws batch index t-1; `epoch` = (t-1) // batches_per_epoch.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdt.config import DataConfig
from jaxdt.data import vocabulary


# --- Batch sampling -----------------------------------------------------------


_FEISTEL_ROUNDS = 6


class Batch(NamedTuple):
  """One training batch. The loss scores logits[:, :L'] against `targets`."""

  inputs: jax.Array  # int32 [B, L]
  targets: jax.Array  # int32 [B, L']


def check_scheme(cfg: DataConfig) -> None:
  if cfg.scheme not in ("chunks", "windows"):
    raise vocabulary.DataError(f"data scheme {cfg.scheme!r} is unknown; "
                    "use 'chunks' (Crucible, Thimble 8/9) or 'windows' (Thimble 1/6)")
  if cfg.batch_size < 1 or cfg.seq_len < 3:
    raise vocabulary.DataError(f"batch_size={cfg.batch_size}, seq_len={cfg.seq_len} is unusable; "
                    "use batch_size >= 1 and seq_len >= 3")


def num_sequences(n_tokens: int, cfg: DataConfig) -> int:
  """Sequences one epoch shuffles: chunks N // L, windows N - L (the lab's N - 128)."""
  if cfg.scheme == "chunks":
    return n_tokens // cfg.seq_len
  return max(0, n_tokens - cfg.seq_len)


def batches_per_epoch(n_tokens: int, cfg: DataConfig) -> int:
  """Full batches per epoch (drop_last): 10,713 chunks of 128 -> 83 batches of 128."""
  return num_sequences(n_tokens, cfg) // cfg.batch_size


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (xorshift-multiply finalizer); wraps mod 2^32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def feistel_permute(key: jax.Array, index: jax.Array, n: int) -> jax.Array:
  """A keyed bijection of [0, n), evaluated at `index` without a permutation table.

  A balanced Feistel network on 2h bits (2^(2h) >= n) is a bijection of
  [0, 2^(2h)) for any round function; re-applying it to outputs >= n
  ("cycle walking") restricts it to a bijection of [0, n). Expected walks are
  below 4 since 2^(2h) < 4n.

  Args:
    key: a JAX PRNG key; it fixes the permutation.
    index: int array of positions in [0, n).
    n: static domain size (>= 1).

  Returns:
    int32 array shaped like `index`: the permuted positions.
  """
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  mask = jnp.uint32((1 << half) - 1)
  round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)

  def encrypt(x):
    left, right = x >> half, x & mask
    for r in range(_FEISTEL_ROUNDS):
      left, right = right, left ^ (_mix32(right ^ round_keys[r]) & mask)
    return (left << half) | right

  def walk(x):
    return jnp.where(x >= n, encrypt(x), x)

  x = encrypt(jnp.asarray(index).astype(jnp.uint32))
  x = jax.lax.while_loop(lambda x: jnp.any(x >= n), walk, x)
  return x.astype(jnp.int32)


def make_sampler(tokens: np.ndarray, cfg: DataConfig) -> Callable[[jax.Array, jax.Array], Batch]:
  """A pure batch function `sample(key, step) -> Batch` over `tokens`.

  Schemes:
    chunks (Crucible, Thimble 8/9): non-overlapping seq_len chunks, a fresh
      shuffle each epoch, drop_last. inputs = chunk [B, L]; targets =
      chunk[:, 1:] [B, L-1] (the lab's `logits[:, :-1]` vs `input_ids[:, 1:]`).
    windows (Thimble 1/6): every window of seq_len+1 tokens, shuffled.
      inputs = w[:, :-1] [B, L]; targets = w[:, 1:] [B, L], true next-token.
  double_shift_labels: targets start one token later (w[:, 2:], chunk[:, 2:]).
    That is what the lab's GPT2 runs trained on: they passed labels = w[1:] to
    HF GPT2, whose loss shifts labels again, so each position predicted the
    token two ahead (docs/definitions.md §Steps and files). Use it only for faithful replays.

  Step t (1-based) uses batch index t-1 of epoch (t-1) // batches_per_epoch;
  the epoch's order is `feistel_permute(fold_in(key, epoch), ...)`, so no
  permutation is stored and any step can be recomputed on resume.

  Args:
    tokens: int [N] token ids (host array); copied to the device once.
    cfg: data config (scheme, batch_size, seq_len, double_shift_labels).

  Returns:
    `sample(key, step)`, jittable and usable inside `lax.scan`; `step` may be a
    traced int32 scalar.
  """
  check_scheme(cfg)
  n_seq = num_sequences(len(tokens), cfg)
  per_epoch = batches_per_epoch(len(tokens), cfg)
  if per_epoch < 1:
    raise vocabulary.DataError(f"{len(tokens):,} tokens give fewer than one {cfg.scheme} batch of "
                    f"{cfg.batch_size} x {cfg.seq_len}; use a longer corpus or a smaller batch")
  chunks = cfg.scheme == "chunks"
  span = cfg.seq_len if chunks else cfg.seq_len + 1
  stride = cfg.seq_len if chunks else 1
  first_target = 2 if cfg.double_shift_labels else 1
  data = jnp.asarray(np.asarray(tokens, np.int32))
  offsets = jnp.arange(span, dtype=jnp.int32)
  lanes = jnp.arange(cfg.batch_size, dtype=jnp.int32)

  def sample(key, step):
    index = jnp.asarray(step, jnp.int32) - 1
    epoch, within = index // per_epoch, index % per_epoch
    seq = feistel_permute(jax.random.fold_in(key, epoch), within * cfg.batch_size + lanes, n_seq)
    rows = data[seq[:, None] * stride + offsets[None, :]]  # (B, span)
    inputs = rows if chunks else rows[:, :-1]  # (B, L)
    return Batch(inputs, rows[:, first_target:])  # (B, L')

  return sample
