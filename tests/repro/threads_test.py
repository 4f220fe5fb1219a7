"""Recorded diagnostics do not depend on the CPU thread count (docs/adamw.md §Determinism).

XLA:CPU splits f32 reductions by thread count; jaxdt's recorded sums go through
`jaxdt.numerics.ordered`, so a 1-core and a 2-core process must print the same bits.
"""

import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np

from jaxdt import config as config_lib
from jaxdt.numerics import ordered
from jaxdt.optim import accounting
rng = np.random.default_rng(0)
w = jnp.asarray((rng.standard_normal((3708, 64)) * 0.02).astype(jnp.bfloat16))
m = jnp.asarray((rng.standard_normal((3708, 64)) * 1e-4).astype(jnp.bfloat16))
v = jnp.asarray((np.abs(rng.standard_normal((3708, 64))) * 1e-8).astype(jnp.bfloat16))
hp = config_lib.OptimConfig(1e-3)
w2 = accounting.replay(w, m, v, jnp.int32(7), hp)
out = jax.jit(lambda *a: accounting.metrics(*a, hp))(w, w2, m, v, jnp.int32(7))
cen = jax.jit(ordered.mean_rows)(w2)
print(" ".join(np.asarray(x, np.float32).tobytes().hex() for x in [*out.values(), cen]))
"""


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_accounting_and_centroid_bits_match_on_one_and_all_cores():
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs at least 2 cores to compare against 1")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  one = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", SCRIPT], env=env,
                       capture_output=True, text=True, check=True).stdout
  all_ = subprocess.run([sys.executable, "-c", SCRIPT], env=env,
                        capture_output=True, text=True, check=True).stdout
  assert one == all_
