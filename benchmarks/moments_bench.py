"""The cost of subnormal-exact moments: the full-size step with and without them, side by side.

    python benchmarks/moments_bench.py [--steps=20] [--repeats=3] [--size=full|small]

Compiles the Crucible 1 chunk three times in one process: as it runs (torch's
m and v kept exact through the subnormal range by `adamw.exact_moments`, whose
branch runs on steps where some value is tiny), forced (that branch every
step: the worst case), and with the plain f32 moments alone (the arithmetic
before, which XLA:CPU's flush makes inexact there). Times `--steps`-step chunks
of each in turn, `--repeats` times, and prints ms/step (median), the CPU,
`forced_exact_time_ratio=<x>` and `exact_moments_time_ratio=<x>` (as run over
plain; the target is at most 1.02).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app
from absl import flags


import jaxdt  # noqa: E402,F401  pylint: disable=unused-import  (configures XLA before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import experiments  # noqa: E402
from jaxdt import config as config_lib  # noqa: E402
from jaxdt.data import corpus as corpus_lib  # noqa: E402
from jaxdt.numerics import backend  # noqa: E402
from jaxdt.optim import adamw  # noqa: E402
from jaxdt.training import layout as layout_lib  # noqa: E402
from jaxdt.training import initial  # noqa: E402
from jaxdt.training import step as step_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 20, "steps per timed chunk")
flags.DEFINE_integer("repeats", 3, "timed chunks per variant (alternating)")
flags.DEFINE_enum("size", "full", ["full", "small"], "full: Crucible 1; small: batch 16 x 64")


def _program(cfg, corpus, lay, variant: str):
  """A compiled chunk and its inputs. variant: "as run" (exact moments where some value is
  tiny), "forced" (the exact branch every step: the worst case), "plain" (none)."""
  real, real_needs = adamw._exact_leaves, adamw.needs_exact  # pylint: disable=protected-access
  if variant == "plain":
    adamw._exact_leaves = lambda gs, ms, vs, r: [None] * len(ms)  # pylint: disable=protected-access
  if variant == "forced":
    adamw.needs_exact = lambda *a, **k: jnp.asarray(True)
  try:
    mesh = Mesh(np.array(jax.local_devices()[:1]), ("m",))
    chunk = step_lib.make_chunk(cfg, corpus.tokens, lay.rows, mesh)
    stack = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)
    state = stack(initial.init_state(cfg, lay.dims))
    data = stack(initial.member_data(cfg))
    t = time.perf_counter()
    compiled = chunk.lower(state, data, jnp.int32(0), FLAGS.steps).compile()
    return compiled, state, data, time.perf_counter() - t
  finally:
    adamw._exact_leaves, adamw.needs_exact = real, real_needs  # pylint: disable=protected-access


def main(argv):
  del argv
  cfg = experiments.load("crucible1")
  if FLAGS.size == "small":
    cfg = config_lib.override(config_lib.override(cfg, "data.batch_size=16"), "data.seq_len=64")
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  lay = layout_lib.layout(cfg, corpus)
  cpu = backend.cpu_description()
  print(f"CPU: {cpu['cpu_model']}; features {' '.join(cpu['cpu_features'])}; "
        f"{backend.cpu_threads()} threads; GEMMs {backend.gemm_path()}")
  progs = {name: _program(cfg, corpus, lay, name) for name in ("plain", "as run", "forced")}
  for name, (_, _, _, secs) in progs.items():
    print(f"compile {name}: {secs:.1f} s")
  times = {name: [] for name in progs}
  states = {name: p[1] for name, p in progs.items()}
  for name, (compiled, _, data, _) in progs.items():  # warm-up
    states[name], out = compiled(states[name], data, jnp.int32(0))
    jax.block_until_ready(out)
  for r in range(FLAGS.repeats):
    for name, (compiled, _, data, _) in progs.items():
      t = time.perf_counter()
      states[name], out = compiled(states[name], data, jnp.int32(FLAGS.steps * (r + 1)))
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t) / FLAGS.steps * 1e3)
  for name, ts in times.items():
    print(f"{name}: {statistics.median(ts):.1f} ms/step (runs: "
          f"{', '.join(f'{t:.0f}' for t in ts)})")
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"forced_exact_time_ratio={med['forced'] / med['plain']:.4f}")
  print(f"exact_moments_time_ratio={med['as run'] / med['plain']:.4f}")


if __name__ == "__main__":
  from jaxdt.cli import parse_flags  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags)
