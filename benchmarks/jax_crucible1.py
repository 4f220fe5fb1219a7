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

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdt.model import tinylm
from jaxdt.numerics import backend
from jaxdt.training import loop

backend.configure()  # as run.py: XLA_FLAGS before JAX starts

import jax  # pylint: disable=g-import-not-at-top

import experiments  # pylint: disable=g-import-not-at-top
from jaxdt import config as config_lib  # pylint: disable=g-import-not-at-top
from procstat import (  # pylint: disable=g-import-not-at-top
    context_switches, cpu_seconds, peak_rss_bytes, rss_bytes)


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
                                max_seq_len=args.seq),  # the seed's TinyLM(..., SEQ_LEN)
      data=dataclasses.replace(cfg.data, batch_size=args.batch, seq_len=args.seq,
                               corpus_path=args.corpus_path, tokenizer_path=args.tokenizer_path,
                               data_dir=args.data_dir),
      store=dataclasses.replace(cfg.store, chunk_steps=args.chunk))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--experiment", default="crucible1")
  p.add_argument("--corpus_path", default=None)
  p.add_argument("--tokenizer_path", default=None)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--vocab", type=int, default=10000)
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--chunk", type=int, default=100)
  p.add_argument("--stop_after", type=int, default=None,
                 help="stop (unfinished) after this many steps of a --steps run")
  p.add_argument("--checkpoints", action="store_true",
                 help="keep the experiment's checkpoint steps (off: a timing run saves none)")
  p.add_argument("--out_dir", required=True)
  p.add_argument("--progress", action="store_true", help="show the progress bar on stderr")
  p.add_argument("--gemm_operands", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="force the GEMM operand dtype (tinylm.GEMM_OPERAND_DTYPE); auto: per backend")
  args = p.parse_args(argv)
  if args.gemm_operands != "auto":
    tinylm.GEMM_OPERAND_DTYPE = args.gemm_operands

  compile_s = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compile_s.append((event, secs)))
  cfg = bench_config(args)
  marks = []
  t0 = time.perf_counter()
  result = loop.train(cfg, args.out_dir, progress=args.progress, stop_after=args.stop_after,
                       log=lambda s: None, on_chunk=mark(marks))
  wall = time.perf_counter() - t0
  first, last = marks[0], marks[-1]
  steady = (last[1] - first[1]) / (last[0] - first[0]) if len(marks) > 1 else None
  backend_compile = sum(s for e, s in compile_s if e.endswith("backend_compile_duration"))
  trace = sum(s for e, s in compile_s if "trace" in e or "lower" in e or "jaxpr" in e)
  dev = jax.devices()[0]
  print(json.dumps({
      "side": "jaxdt", "experiment": args.experiment, "device": dev.platform,
      "device_kind": dev.device_kind, "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps": args.steps, "chunk": args.chunk,
      "gemm_operands": str(tinylm._gemm_dtype(jax.numpy.bfloat16)),  # pylint: disable=protected-access
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
  main()
