"""jaxdt's side of the Crucible 1 benchmark: `loop.train` as `run.py` runs it.

The experiment's own config (experiments/<name>.py, all its probes, streaming
to disk, chunk overlap) with the benchmark's sizes and step count. Timing comes
from the run's own `on_chunk` callback, called once per chunk after that
chunk's records are on disk, so the span from the first
update to the last is steady state (compile and the first chunk excluded) with
the I/O overlap included. Compile time comes from JAX's monitoring events.

Not part of the library. Run by `benchmarks/crucible1_bench.py` in its own
process; prints one JSON line.

    python benchmarks/jax_crucible1.py --corpus_path=c.txt --tokenizer_path=t.json \\
        --vocab=10000 --batch=128 --seq=128 --steps=300 --chunk=100 --out_dir=/tmp/x
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app
from absl import flags


from jaxdt.numerics import backend
from jaxdt.training import loop

backend.configure()  # as run.py: XLA_FLAGS before JAX starts

import jax  # pylint: disable=g-import-not-at-top

import experiments  # pylint: disable=g-import-not-at-top
from jaxdt import config as config_lib  # pylint: disable=g-import-not-at-top
from jaxdt import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from procstat import (  # pylint: disable=g-import-not-at-top
    context_switches, cpu_seconds, peak_rss_bytes, rss_bytes)

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", "crucible1", None)
flags.DEFINE_string("corpus_path", None, None)
flags.DEFINE_string("tokenizer_path", None, None)
flags.DEFINE_string("data_dir", None, None)
flags.DEFINE_integer("vocab", 10000, None)
flags.DEFINE_integer("hidden", 64, None)
flags.DEFINE_integer("batch", 128, None)
flags.DEFINE_integer("seq", 128, None)
flags.DEFINE_integer("steps", 300, None)
flags.DEFINE_integer("chunk", 100, None)
flags.DEFINE_integer("stop_after", None, "stop (unfinished) after this many steps of a --steps run")
flags.DEFINE_bool("checkpoints", False,
                  "keep the experiment's checkpoint steps (off: a timing run saves none)")
flags.DEFINE_string("out_dir", None, None)
flags.mark_flag_as_required("out_dir")
flags.DEFINE_bool("progress", False, "show the progress bar on stderr")
flags.DEFINE_enum("gemm_operands", "auto", ["auto", "float32", "bfloat16"],
                  "the run's model.gemm_operands (auto: by the CPU's bf16 units)")


def mark(marks: list):
  """An `on_chunk` callback stamping every chunk: (time, steps done, RSS, peak RSS, loss,
  CPU s, context switches)."""

  def on_chunk(done: int, loss: float):
    marks.append((time.perf_counter(), done, rss_bytes(), peak_rss_bytes(), loss,
                  cpu_seconds(), context_switches()))

  return on_chunk


def bench_config(args):
  cfg = config_lib.with_steps(experiments.load(args.experiment), args.steps,
                             None if args.checkpoints else ())
  return dataclasses.replace(
      cfg,
      model=dataclasses.replace(cfg.model, vocab_size=args.vocab, hidden_dim=args.hidden,
                                gemm_operands=args.gemm_operands,
                                max_seq_len=args.seq),  # the lab's TinyLM(..., SEQ_LEN)
      data=dataclasses.replace(cfg.data, batch_size=args.batch, seq_len=args.seq,
                               corpus_path=args.corpus_path, tokenizer_path=args.tokenizer_path,
                               data_dir=args.data_dir),
      store=dataclasses.replace(cfg.store, chunk_steps=args.chunk))




def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")

  compile_s = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compile_s.append((event, secs)))
  cfg = bench_config(FLAGS)
  marks = []
  t0 = time.perf_counter()
  result = loop.train(cfg, FLAGS.out_dir, progress=FLAGS.progress, stop_after=FLAGS.stop_after,
                       log=lambda s: None, on_chunk=mark(marks))
  wall = time.perf_counter() - t0
  first, last = marks[0], marks[-1]
  steady = (last[1] - first[1]) / (last[0] - first[0]) if len(marks) > 1 else None
  backend_compile = sum(s for e, s in compile_s if e.endswith("backend_compile_duration"))
  trace = sum(s for e, s in compile_s if "trace" in e or "lower" in e or "jaxpr" in e)
  dev = jax.devices()[0]
  print(json.dumps({
      "side": "jaxdt", "experiment": FLAGS.experiment, "device": dev.platform,
      "device_kind": dev.device_kind, "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps": FLAGS.steps, "chunk": FLAGS.chunk,
      "gemm_operands": backend.gemm_path(FLAGS.gemm_operands),
      "steps_per_s": steady, "wall_s": wall, "first_chunk_s": first[0] - t0,
      "compile_s": backend_compile, "trace_lower_s": trace,
      "marks": [(round(t - t0, 3), d, r, pk) for t, d, r, pk, *_ in marks],
      # CPU seconds per wall second over the steady span: how many cores the run kept busy.
      "cores_busy": (last[5] - first[5]) / (last[0] - first[0]) if len(marks) > 1 else None,
      # Context switches (voluntary: a thread slept; involuntary) and minor page
      # faults per step over the steady span.
      "csw_per_step": [(b - a) / max(last[1] - first[1], 1) for a, b in zip(first[6], last[6])],
      "peak_rss": peak_rss_bytes(), "final_loss": last[4],
      "completed": result is not None,
      "trajectory_bytes": os.path.getsize(result.trajectory) if result else None,
  }))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
