"""The one training loop: chunks of the jitted step, streamed into a run folder.

`train(cfg, out_dir)` is the host loop: it hands stacked records to the run
folder at chunk edges (while the next chunk computes) and checkpoints when a
chunk ends on a checkpoint step. `rundir.RunDir` owns the folder's protocol;
`layout` decides what the file holds; analyses run after the loop (run.py),
never inside it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.io import disk
from jaxdt.io import rundir
from jaxdt.io import tensorfile
from jaxdt.numerics import backend
from jaxdt.training import layout as layout_lib
from jaxdt import probes as probes_lib
from jaxdt.training import step


@dataclasses.dataclass(frozen=True)
class RunResult:
  """Where a finished run lives and what it measured."""

  run_dir: str
  trajectory: str
  metadata: dict


@dataclasses.dataclass
class Position:
  """Where the loop is: steps written, the last recorded loss, the first non-finite step."""

  done: int = 0
  last_loss: float = float("nan")
  diverged: Optional[int] = None


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
      records are written (the progress bar and benchmarks use it).

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
  lay = layout_lib.layout(cfg, corpus)
  state = step.init_state(cfg, lay.dims)  # loads --init_checkpoint: a bad one fails here
  backend.release_heap()  # what tokenizing and the init's compile freed
  checkpoint_steps = sorted(c for c in set(cfg.store.checkpoint_steps) if 0 <= c <= cfg.steps)
  inputs, running_meta = start_metadata(cfg, corpus, lay)
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  pos, bar = Position(), None
  with rundir.RunDir(out_dir, cfg.store.trajectory_name, log=log) as run:
    try:
      state = _begin(run, cfg, lay, state, inputs, running_meta, checkpoint_steps, resume, pos,
                     log)
      bar = Progress(cfg.steps, pos.done, progress)
      callbacks = [bar.update] + ([on_chunk] if on_chunk is not None else [])
      plan = chunk_plan(pos.done, end, cfg.store.chunk_steps, checkpoint_steps)
      state = _run_chunks(run, cfg, corpus, lay, state, plan, checkpoint_steps, pos, log,
                          callbacks)
      if pos.done < cfg.steps:
        return None
      meta = finish(run, cfg, corpus, lay, state, pos, running_meta, t_start)
    except KeyboardInterrupt as e:
      raise rundir.Interrupted.from_signal(e, pos.done, run.resume_from,
                                           run.path if run.committed else None) from None
    finally:
      if bar is not None:
        bar.close()
  return RunResult(out_dir, run.trajectory, meta)


def start_metadata(cfg, corpus, lay) -> tuple[dict, dict]:
  """(inputs a resume must find unchanged, metadata.json while running)."""
  inputs = {"data_files": corpus.files,
            "init_checkpoint_sha256": disk.sha256_file(cfg.init_checkpoint)
            if cfg.init_checkpoint else None,
            # A resume on a host that resolves another GEMM path is refused (other bits).
            "gemm_path": backend.gemm_path(cfg.model.gemm_operands)}
  return inputs, {**layout_lib.lab_metadata(cfg, corpus, lay, 0, None),
                  **layout_lib.our_metadata(cfg, corpus), **inputs}


def _begin(run, cfg, lay, state, inputs, running_meta, checkpoint_steps, resume, pos, log):
  """Opens (or resumes) the folder; writes row 0, the static tensors and checkpoint 0."""
  start, restored = run.begin(
      experiment=cfg.name, config=config_lib.to_dict(cfg), inputs=inputs, specs=lay.specs,
      file_metadata=layout_lib.FILE_METADATA, metadata=running_meta, like_state=state,
      resume=resume, checkpoint_steps=checkpoint_steps,
      checkpoint_bytes=layout_lib.state_bytes(state),
      ram_bytes=3 * lay.chunk_bytes * min(cfg.store.chunk_steps, cfg.steps))
  pos.done = start
  log(f"run folder: {run.path} ({os.path.basename(run.partial)}, "
      f"{disk.fmt_bytes(tensorfile.estimate_bytes(lay.specs, layout_lib.FILE_METADATA))})")
  return write_start(run, cfg, lay, state, restored, checkpoint_steps)


def write_start(run, cfg, lay, state, restored, checkpoint_steps):
  """Row 0 and checkpoint 0 of a fresh run (or the restored state), and the static tensors."""
  if restored is None:
    for k, a in step.initial_records(cfg, state, lay.rows).items():
      run.write_rows(k, 0, a[None])
  else:
    state = restored
  for k, a in lay.static.items():  # a resume rewrites the same bytes
    run.write(k, a)
  disk.fault_point("initial_rows_written")
  if restored is None and 0 in checkpoint_steps:
    run.checkpoint(0, jax.device_get(state))
  return state


def _run_chunks(run, cfg, corpus, lay, state, plan, checkpoint_steps, pos, log, callbacks):
  """A solo run's chunks: `run_chunks` with one member."""
  run_chunk = step.make_run_chunk(step.make_step(cfg, corpus.tokens, lay.rows))
  return run_chunks(lambda st, s, n: run_chunk(st, jnp.int32(s), n), state, plan,
                    checkpoint_steps, lay.probes.series, [Target(run, pos)], log, callbacks)


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one member's records go: its run folder, its position, its name in notes."""

  run: rundir.RunDir
  pos: Position
  label: str = ""


def run_chunks(dispatch, state, plan, checkpoint_steps, series, targets, log, callbacks,
               split=None):
  """The chunk loop of a solo run and of a sweep group (one loop; members differ in where
  their rows go).

  Each chunk's records are written while the next one computes.

  Args:
    dispatch: dispatch(state, start, length) -> (state, (records, losses)), asynchronous.
    state: the (stacked, for a group) state at plan[0]'s start.
    plan: `chunk_plan`'s [(start, length)].
    checkpoint_steps: steps to checkpoint at (a chunk ends on each).
    series: the probes' series (`lay.probes.series`).
    targets: one `Target` per member, in the order of the outputs' leading axis.
    log, callbacks: notes; callbacks(steps done, mean last loss) after every chunk.
    split: split(tree, i) -> member i's part of a chunk's outputs; None: one member, whose
      outputs are its own.

  Returns:
    the state after the plan.
  """
  split = split or (lambda tree, i: tree)
  t_compile = time.perf_counter()
  pending = dispatch(state, *plan[0]) if plan else None
  if plan:  # the first call traces and compiles before it dispatches
    log(f"compiled the {plan[0][1]}-step chunk in {time.perf_counter() - t_compile:.1f} s; "
        f"training steps {plan[0][0] + 1}..{plan[-1][0] + plan[-1][1]}")
    backend.release_heap()  # the compiler's garbage, before the chunk's buffers fill
  for k, (s, n) in enumerate(plan):
    state, outputs = pending
    # The next chunk donates `state`: copy a checkpoint's state to the host first.
    host_state = jax.device_get(state) if s + n in checkpoint_steps else None
    # Dispatch the next chunk before touching this one's records on the host.
    pending = dispatch(state, *plan[k + 1]) if k + 1 < len(plan) else None
    loss = _write_chunk(s, n, outputs, host_state, series, targets, log, split)
    del outputs, host_state
    rundir.check_signals()  # a signal whose exception Python lost (`rundir.raise_on_signals`)
    backend.release_heap()  # this chunk's host copies
    for fn in callbacks:
      fn(s + n, loss)
  return state


def _write_chunk(s, n, outputs, host_state, series, targets, log, split) -> float:
  """Writes one chunk's rows (and checkpoint) for every target; returns their mean last loss."""
  records, losses = jax.device_get(outputs[0]), np.asarray(outputs[1])
  parts = [(split(records, i), split(losses, i)) for i in range(len(targets))]
  for t, (mine, _) in zip(targets, parts):
    for ser in series:
      t.run.write_rows(ser.key, probes_lib.file_row(ser, s + 1), np.asarray(mine[ser.key]))
  disk.fault_point("rows_written")
  for i, (t, (mine, my_losses)) in enumerate(zip(targets, parts)):
    t.pos.done = s + n
    if t.pos.diverged is None:
      t.pos.diverged = rundir.first_nonfinite(my_losses, s + 1)
      if t.pos.diverged is not None:
        log(f"{t.label + ': ' if t.label else ''}loss became "
            f"{my_losses[t.pos.diverged - s - 1]} at step {t.pos.diverged}; the run goes on "
            "recording (metadata: diverged_at_step)")
    if host_state is not None:  # rows 0..s+n are written: now the checkpoint
      t.run.checkpoint(s + n, split(host_state, i))
    t.pos.last_loss = recorded_loss(mine, my_losses)
  return float(np.mean([t.pos.last_loss for t in targets]))


def recorded_loss(records, losses) -> float:
  """The chunk's last loss as recorded (bf16, the lab's final_loss), else the f32 one."""
  for key in ("loss", "losses"):
    if key in records:
      return float(np.asarray(records[key])[-1])
  return float(losses[-1])


def finish(run, cfg, corpus, lay, state, pos, running_meta, t_start) -> dict:
  """Writes the trackers' final tensors and commits the folder with its final metadata."""
  for k, a in state.probe_state.items():
    run.write(k, np.asarray(a))
  disk.fault_point("final_tensors_written")
  meta = {**running_meta,  # the backend facts are the start's; commit sets completed
          **layout_lib.lab_metadata(cfg, corpus, lay, cfg.steps, pos.last_loss),
          "wall_time_s": time.perf_counter() - t_start, "steps_completed": cfg.steps,
          "diverged_at_step": pos.diverged}
  if "last_motion_step" in state.probe_state:  # the lab's Crucible metadata keys
    meta["global_last_motion"] = int(np.max(state.probe_state["last_motion_step"]))
    meta["fimbulwinter_duration"] = cfg.steps - meta["global_last_motion"]
  return run.commit(meta)


def chunk_plan(start: int, steps: int, chunk: int, checkpoints) -> list:
  """[(start, length)] chunks covering start..steps, each ending at or before a checkpoint."""
  marks = sorted(c for c in set(checkpoints) if start < c < steps)
  plan, t = [], start
  for end in marks + [steps]:
    while t < end:
      n = min(chunk, end - t)
      plan.append((t, n))
      t += n
  return plan


def describe_corpus(corpus: corpus_lib.Corpus) -> str:
  """One line: where the data came from and its counts."""
  d = corpus.default
  source = ("the lab's files" if d is None else
            f"embedded default, built in {d.seconds:.0f} s" if d.built else
            f"embedded default, reused from {d.directory}")
  return (f"{len(corpus.tokens):,} tokens, vocab {corpus.vocab_size:,}, {corpus.n_dead:,} dead "
          f"({source})")


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
