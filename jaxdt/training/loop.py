"""The one training loop: chunks of the jitted step, streamed into a run folder.

`train(cfg, out_dir)` is the host loop: it hands stacked records to the run
folder at chunk edges (while the next chunk computes) and checkpoints when a
chunk ends on a checkpoint step. `rundir.RunDir` owns the folder's protocol;
analyses run after the loop (run.py), never inside it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import signal
import sys
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.data import sampler
from jaxdt.io import disk
from jaxdt.io import rundir
from jaxdt.io import tensorfile
from jaxdt.numerics import backend
from jaxdt.numerics import precision
from jaxdt.training import probes as probes_lib
from jaxdt.training import step


# --- The host loop -----------------------------------------------------------

CHECKPOINT_DIR = rundir.CHECKPOINT_DIR
METADATA_FILE = rundir.METADATA_FILE


@dataclasses.dataclass(frozen=True)
class RunResult:
  """Where a finished run lives and what it measured."""

  run_dir: str
  trajectory: str
  metadata: dict


def _lab_metadata(cfg, corpus, dims, steps_done, per_epoch, final_loss, specs) -> dict:
  """The seed notebooks' metadata.json keys (Crucible 1 and Thimble 8; docs/experiments.md)."""
  return {
      "experiment": cfg.store.experiment_title, "series": cfg.store.series,
      "date": time.strftime("%Y-%m-%d"), "total_steps": cfg.steps,
      "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
      "learning_rate": cfg.optim.learning_rate, "weight_decay": cfg.optim.weight_decay,
      "beta1": cfg.optim.b1, "beta2": cfg.optim.b2, "epsilon": cfg.optim.eps,
      "vocab_size": cfg.model.vocab_size, "hidden_dim": cfg.model.hidden_dim,
      "num_layers": cfg.model.num_layers, "num_heads": cfg.model.num_heads,
      "random_seed": cfg.seed, "motion_threshold": cfg.probes.motion_threshold,
      "n_dead_tokens": corpus.n_dead, "checkpoint_steps": list(cfg.store.checkpoint_steps),
      "final_loss": final_loss, "total_epochs": -(-steps_done // per_epoch),
      "device": jax.devices()[0].platform,
      "data_shapes": {k: list(shape) for k, (_, shape) in specs.items()},
      "notes": cfg.store.notes,
  }


def _our_metadata(cfg, corpus, wall, completed) -> dict:
  """jaxdt's metadata keys: the config, the data, the backend (`backend.describe`)."""
  return {
      "completed": completed, "trajectory_bytes": None,
      "config": config_lib.to_dict(cfg), "data_files": corpus.files,
      "data_manifest": None if corpus.default is None else corpus.default.manifest,
      **backend.describe(), "jaxlib_version": jax.lib.__version__,
      "python": platform.python_version(), "wall_time_s": wall,
  }


class Progress:
  """A one-line progress bar on stderr: steps/s, loss and ETA, updated per chunk."""

  def __init__(self, total: int, start: int, enabled: bool):
    self.total, self.start, self.enabled = total, start, enabled
    self.t0 = time.perf_counter()
    self.dirty = False  # a bar is drawn and its line not ended

  def close(self):
    """Ends the bar's line if a run stops midway (so an error starts on its own line)."""
    if self.dirty:
      sys.stderr.write("\n")
      sys.stderr.flush()
      self.dirty = False

  def update(self, done: int, loss: float):
    if not self.enabled:
      return
    self.dirty = done != self.total
    rate = (done - self.start) / max(time.perf_counter() - self.t0, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    width = 30
    fill = int(width * done / self.total)
    sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
                     f"{rate:.2f} steps/s loss={loss:.4f} ETA {eta:.0f}s ")
    sys.stderr.flush()
    if done == self.total:
      sys.stderr.write("\n")


def describe_corpus(corpus: corpus_lib.Corpus) -> str:
  """One line: where the data came from and its counts."""
  d = corpus.default
  source = ("the lab's files" if d is None else
            f"embedded default, built in {d.seconds:.0f} s" if d.built else
            f"embedded default, reused from {d.directory}")
  return (f"{len(corpus.tokens):,} tokens, vocab {corpus.vocab_size:,}, {corpus.n_dead:,} dead "
          f"({source})")


class Layout(NamedTuple):
  """What a run records and where: rows, sizes, probes, the file's tensors."""

  rows: Optional[np.ndarray]  # recorded vocabulary rows (dead ids), None = all
  dims: probes_lib.Dims
  probes: probes_lib.Probes
  specs: dict  # the trajectory's {key: (dtype, shape)}, statics included
  static: dict  # {key: array} written once (masks, ids, the lab's scalars)
  chunk_bytes: int  # bytes of one step's records


def layout(cfg: config_lib.ExperimentConfig, corpus: corpus_lib.Corpus) -> Layout:
  """The run's file layout for this config and corpus (refuses colliding probes)."""
  rows = corpus.dead_indices if cfg.probes.rows == "dead" else None
  dims = probes_lib.Dims(rows=corpus.n_dead if rows is not None else cfg.model.vocab_size,
                         hidden=cfg.model.hidden_dim,
                         param_dtype=precision.get_policy(cfg.precision).param_dtype)
  built = probes_lib.of_config(cfg)
  specs = built.file_specs(dims, cfg.steps)
  static = {"dead_mask": corpus.dead_mask, "dead_indices": corpus.dead_indices.astype(np.int64)}
  static.update(built.static_arrays(probes_lib.StaticView(
      cfg, corpus.live_mask, corpus.dead_mask, corpus.live_indices, corpus.dead_indices)))
  for k, a in static.items():
    specs[k] = (a.dtype, a.shape)
  keys = {s.key for s in built.series}
  chunk_bytes = sum(int(np.prod(shape[1:])) * np.dtype(dt).itemsize
                    for k, (dt, shape) in specs.items() if k in keys)
  return Layout(rows, dims, built, specs, static, chunk_bytes)


FILE_METADATA = {"format": "pt"}  # the trajectory's safetensors metadata (the lab's)


def _state_bytes(state: step.TrainState) -> int:
  """Disk bytes of one checkpoint of `state` (arrays, header and marker, rounded up)."""
  leaves = jax.tree_util.tree_leaves(state)
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves) + (256 << 10)


def train(cfg: config_lib.ExperimentConfig, out_dir: str, *, resume: bool = False,
          progress: bool = True, stop_after: Optional[int] = None,
          log=print, on_chunk: Optional[Callable[[int, float], None]] = None
          ) -> Optional[RunResult]:
  """Runs an experiment to completion, streaming its trajectory into `out_dir`.

  Every input is checked (the config on construction, the data and an
  `--init_checkpoint` here) before `rundir.RunDir` touches the folder; the
  folder's protocol (lock, resume, checkpoints, checksums, the commit point)
  is RunDir's.

  Args:
    cfg: the experiment.
    out_dir: the run folder (created); holds the trajectory, metadata.json and
      checkpoints/.
    resume: continue the unfinished run in out_dir from its newest intact
      checkpoint (from step 0 when there is none).
    progress: print the progress bar.
    stop_after: stop (unfinished, as if killed) once this many steps are done;
      for tests of resume.
    log: where one-line notes go (phases, resume point, divergence).
    on_chunk: called as on_chunk(steps done, last loss) after each chunk's
      records are written (benchmarks time the run with it).

  Returns:
    RunResult (metadata has "completed": True), or None when stopped early.

  Raises:
    disk.StoreError, vocabulary.DataError, ValueError: bad input or folder (one
      line); nothing in the folder changed.
    rundir.Interrupted: SIGINT/SIGTERM; the folder is resumable.
  """
  t_start = time.perf_counter()
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  log(f"data: {describe_corpus(corpus)}")
  lay = layout(cfg, corpus)
  rows, dims, specs, static, series = lay.rows, lay.dims, lay.specs, lay.static, lay.probes.series
  per_epoch = sampler.batches_per_epoch(len(corpus.tokens), cfg.data)
  state = step.init_state(cfg, dims)  # loads --init_checkpoint: a bad one fails here
  checkpoint_steps = sorted(c for c in set(cfg.store.checkpoint_steps) if 0 <= c <= cfg.steps)
  inputs = {"data_files": corpus.files,
            "init_checkpoint_sha256": disk.sha256_file(cfg.init_checkpoint)
            if cfg.init_checkpoint else None}
  running_meta = {**_lab_metadata(cfg, corpus, dims, 0, per_epoch, None, specs),
                  **_our_metadata(cfg, corpus, None, False), **inputs}
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  done, last_loss, diverged, bar = 0, float("nan"), None, None
  with rundir.RunDir(out_dir, cfg.store.trajectory_name, log=log) as run:
    try:
      start, restored = run.begin(
          experiment=cfg.name, config=config_lib.to_dict(cfg), inputs=inputs, specs=specs,
          file_metadata=FILE_METADATA, metadata=running_meta, like_state=state, resume=resume,
          checkpoint_steps=checkpoint_steps, checkpoint_bytes=_state_bytes(state),
          ram_bytes=3 * lay.chunk_bytes * min(cfg.store.chunk_steps, cfg.steps))
      done = start
      log(f"run folder: {run.path} ({os.path.basename(run.partial)}, "
          f"{disk.fmt_bytes(tensorfile.estimate_bytes(specs, FILE_METADATA))})")
      if restored is None:
        for k, a in step.initial_records(cfg, state, rows).items():
          run.write_rows(k, 0, a[None])
      else:
        state = restored
      for k, a in static.items():  # a resume rewrites the same bytes
        run.write(k, a)
      disk.fault_point("initial_rows_written")
      if restored is None and 0 in checkpoint_steps:
        run.checkpoint(0, jax.device_get(state))

      run_chunk = step.make_run_chunk(step.make_step(cfg, corpus.tokens, rows))
      bar = Progress(cfg.steps, start, progress)
      plan = step.chunk_plan(start, end, cfg.store.chunk_steps, checkpoint_steps)
      t_compile = time.perf_counter()
      pending = run_chunk(state, jnp.int32(plan[0][0]), plan[0][1]) if plan else None
      if plan:  # the first call traces and compiles before it dispatches
        log(f"compiled the {plan[0][1]}-step chunk in {time.perf_counter() - t_compile:.1f} s; "
            f"training steps {start + 1}..{end}")
      for i, (s, n) in enumerate(plan):
        state, (records, losses) = pending
        # The next chunk donates `state`: copy a checkpoint's state to the host first.
        host_state = jax.device_get(state) if s + n in checkpoint_steps else None
        # Dispatch the next chunk before touching this one's records on the host.
        pending = (run_chunk(state, jnp.int32(plan[i + 1][0]), plan[i + 1][1])
                   if i + 1 < len(plan) else None)
        for ser in series:
          run.write_rows(ser.key, probes_lib.file_row(ser, s + 1), np.asarray(records[ser.key]))
        disk.fault_point("rows_written")
        done = s + n
        losses = np.asarray(losses)
        if diverged is None and (diverged := rundir.first_nonfinite(losses, s + 1)) is not None:
          log(f"loss became {losses[diverged - s - 1]} at step {diverged}; the run goes on "
              "recording (metadata: diverged_at_step)")
        if host_state is not None:  # rows 0..s+n are written: now the checkpoint
          run.checkpoint(s + n, host_state)
        last_loss = float(losses[-1])
        for key in ("loss", "losses"):  # the recorded (bf16) loss, as the lab's final_loss
          if key in records:
            last_loss = float(np.asarray(records[key])[-1])
        bar.update(done, last_loss)
        if on_chunk is not None:
          on_chunk(done, last_loss)
      if done < cfg.steps:
        return None

      for k, a in state.probe_state.items():
        run.write(k, np.asarray(a))
      disk.fault_point("final_tensors_written")
      meta = {**running_meta,  # the backend facts are the start's; commit sets completed
              **_lab_metadata(cfg, corpus, dims, cfg.steps, per_epoch, last_loss, specs),
              "wall_time_s": time.perf_counter() - t_start, "steps_completed": cfg.steps,
              "diverged_at_step": diverged}
      if "last_motion_step" in state.probe_state:  # the seed's Crucible metadata keys
        meta["global_last_motion"] = int(np.max(state.probe_state["last_motion_step"]))
        meta["fimbulwinter_duration"] = cfg.steps - meta["global_last_motion"]
      meta = run.commit(meta)
    except KeyboardInterrupt as e:
      raise rundir.Interrupted(getattr(e, "signum", signal.SIGINT), done, run.resume_from,
                               run.path if run.committed else None) from None
    finally:
      if bar is not None:
        bar.close()
  return RunResult(out_dir, run.trajectory, meta)
