"""The precision policies side by side: steps/s and bytes of training state per parameter.

    python benchmarks/policies_bench.py [--steps=20] [--rounds=3] [--size=full|small]

Each policy (bf16, mixed, bf16_sr, bf16_kahan; fp32 with --all) trains Crucible 1 with
the compact freeze record through the run's own compiled program (`runs.program`), no
folder written. After one warm-up chunk each, the policies take turns, a chunk of
--steps each per round, so every one meets the same load; steps/s is the median
over rounds, and its ratio to bf16 is the figure to quote. Bytes per parameter count
the parameters, the Adam moments and the policy's own state (SR key, Kahan buffers),
not the probes' trackers (`training.replay.bytes_per_param`). The CPU model and
features are printed beside the figures.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from absl import app
from absl import flags

import jax

import experiments
from jaxdt import cli
from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.numerics import backend
from jaxdt.training import layout as layout_lib
from jaxdt.training import replay
from jaxdt.training import runs
from jaxdt.training import initial

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 20, "steps per timed chunk")
flags.DEFINE_integer("rounds", 3, "rounds of one chunk per policy")
flags.DEFINE_enum("size", "full", ["full", "small"], "full: Crucible 1; small: batch 16 x 64")
flags.DEFINE_boolean("all", False, "fp32 too")
flags.DEFINE_string("data_dir", None, "the embedded default data's cache folder")

POLICIES = ("bf16", "mixed", "bf16_sr", "bf16_kahan")


def _config(policy: str) -> config_lib.ExperimentConfig:
  cfg = experiments.load("crucible1")
  if FLAGS.size == "small":
    cfg = config_lib.override(config_lib.override(cfg, "data.batch_size=16"), "data.seq_len=64")
  return dataclasses.replace(
      cfg, precision=policy, data=dataclasses.replace(cfg.data, data_dir=FLAGS.data_dir),
      probes=dataclasses.replace(cfg.probes, names=("freeze",)),
      store=dataclasses.replace(cfg.store, chunk_steps=FLAGS.steps, checkpoint_steps=()))


def main(argv):
  del argv
  cpu = backend.cpu_description()
  print(f"machine: {cpu['cpu_model']}, {jax.local_devices()[0].platform}, features "
        f"{' '.join(cpu['cpu_features'])}; GEMM path {backend.gemm_path('auto')}")
  policies = POLICIES + (("fp32",) if FLAGS.all else ())
  corpus = corpus_lib.load_corpus(_config("bf16").data, _config("bf16").model.vocab_size)
  devs = runs.program_devices(1, exact=True)
  prepared = {}
  for p in policies:
    cfg = _config(p)
    lay = layout_lib.layout(cfg, corpus)
    state = initial.init_state(cfg, lay.dims)
    dispatch, sharding = runs.program([cfg], corpus.tokens, lay.rows, devs)
    stacked = runs.stacked([state], sharding)
    t = time.perf_counter()
    stacked, out = dispatch(stacked, 0, FLAGS.steps)  # compile + warm-up
    jax.block_until_ready(out)
    prepared[p] = [dispatch, stacked, FLAGS.steps, [], replay.bytes_per_param(state)]
    print(f"{p}: compiled and warmed up in {time.perf_counter() - t:.1f} s", flush=True)
  for _ in range(FLAGS.rounds):
    for p in policies:
      dispatch, stacked, done, times, _ = prepared[p]
      t = time.perf_counter()
      stacked, out = dispatch(stacked, done, FLAGS.steps)
      jax.block_until_ready(out)
      times.append(FLAGS.steps / (time.perf_counter() - t))
      prepared[p][1], prepared[p][2] = stacked, done + FLAGS.steps
  base = statistics.median(prepared["bf16"][3])
  print(f"\n{'policy':<11} {'steps/s':>8} {'vs bf16':>8} {'state B/param':>14}")
  for p in policies:
    rate = statistics.median(prepared[p][3])
    print(f"{p:<11} {rate:>8.3f} {rate / base:>7.2f}x {prepared[p][4]:>14.2f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
