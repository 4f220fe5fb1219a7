"""The one training loop: chunks of the compiled program, streamed into run folders.

`train(cfg, out_dir)` is a Run of one member; `train_members` runs any Run
(a sweep group passes its members). `run_chunks` dispatches each chunk before
it hands the previous chunk's records to the members' folders, then calls the
hooks: divergence watching, checkpointing and progress are `on_chunk` hooks, as
levanter adds `checkpointer.on_step`. `finish` writes the trackers' final
values and commits every member. `rundir.RunDir` owns each folder's protocol;
analyses run after the loop (run.py), never inside it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from jaxdt import config as config_lib
from jaxdt import probes as probes_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.io import disk
from jaxdt.io import signals
from jaxdt.numerics import backend
from jaxdt.numerics import finite
from jaxdt.training import layout as layout_lib
from jaxdt.training import runs
from jaxdt.training import step as step_lib


@dataclasses.dataclass(frozen=True)
class RunResult:
  """Where a finished run lives and what it measured."""

  run_dir: str
  trajectory: str
  metadata: dict


class Chunk(NamedTuple):
  """One finished chunk, on the host: steps start+1..start+length of every member."""

  start: int
  length: int
  records: list  # per member: {file key: stacked rows}
  losses: list  # per member: f32 [length]
  # the stacked state after the chunk (as checkpoints store it: `step.without_coefficients`)
  # when it ends on a checkpoint, else None
  host_state: object

  @property
  def end(self) -> int:
    return self.start + self.length


Hook = Callable[[runs.Run, Chunk], None]


def train(cfg: config_lib.ExperimentConfig, out_dir: str, *, log=print,
          on_chunk: Optional[Callable[[int, float], None]] = None,
          **options) -> Optional[RunResult]:
  """Runs an experiment to completion, streaming its trajectory into `out_dir`.

  Args:
    cfg: the experiment.
    out_dir: the run folder (created); holds the trajectory, metadata.json and
      checkpoints/.
    log: where one-line notes go (phases, resume point, divergence).
    on_chunk: called as on_chunk(steps done, last loss) after each chunk's
      records are written (benchmarks use it).
    **options: `runs.Options` fields: resume (continue the unfinished run in
      out_dir from its newest intact checkpoint; from step 0 when there is
      none), progress (the bar), stop_after (stop, unfinished as if killed,
      once this many steps are done; tests of resume), allow_host_change.

  Returns:
    RunResult (metadata has "completed": True), or None when stopped early.

  Raises:
    disk.StoreError, vocabulary.DataError, ValueError: bad input or folder (one
      line); nothing in the folder changed.
    signals.Interrupted: SIGINT/SIGTERM; the folder is resumable.
  """
  opts = runs.Options(**options)
  return train_members([runs.MemberSpec(cfg, out_dir)], opts, log=log, on_chunk=on_chunk)[0]


def train_members(specs: Sequence[runs.MemberSpec], opts: runs.Options, *,
                  corpus: Optional[corpus_lib.Corpus] = None, log=print,
                  on_chunk: Optional[Callable[[int, float], None]] = None) -> list:
  """Runs members of one structure as one Run; returns their RunResults (None if stopped)."""
  t_start = time.perf_counter()
  if corpus is None:
    corpus = corpus_lib.load_corpus(specs[0].cfg.data, specs[0].cfg.model.vocab_size)
    log(f"data: {describe_corpus(corpus)}")
  done, run = [], None
  try:
    with runs.start(specs, corpus, opts, log=log, t_start=t_start) as run:
      bar = Progress(run.cfg.steps, run.start, opts.progress)
      hooks = [watch_divergence(log), checkpoint, bar.update]
      if on_chunk is not None:
        hooks.append(lambda r, c: on_chunk(c.end, mean_loss(r)))
      try:
        run_chunks(run, hooks, log)
      finally:
        bar.close()
      if min(m.pos.done for m in run.members) < run.cfg.steps:
        return [None] * len(specs)
      done = finish(run)
  except KeyboardInterrupt as e:
    raise _interrupted(e, run) from None
  return done


def _interrupted(e: KeyboardInterrupt, run: Optional[runs.Run]) -> signals.Interrupted:
  """The one-line report of a signal: the step reached and where --resume continues."""
  if run is None:  # before the first chunk
    return signals.Interrupted.from_signal(e, None, None)
  folders = [m.folder for m in run.members]
  marks = [f.resume_from for f in folders]
  finished = folders[0].path if len(folders) == 1 and folders[0].committed else None
  return signals.Interrupted.from_signal(e, min(m.pos.done for m in run.members),
                                         None if None in marks else min(marks), finished)


def run_chunks(run: runs.Run, hooks: Sequence[Hook], log=print) -> None:
  """Drives the Run from run.start to run.end; each chunk's rows are written while the
  next one computes, then every hook sees the chunk."""
  plan = chunk_plan(run.start, run.end, run.cfg.store.chunk_steps, run.checkpoint_steps)
  if not plan:
    return
  t_compile = time.perf_counter()
  pending = run.dispatch(run.state, *plan[0])  # the first call traces and compiles first
  log(f"compiled the {plan[0][1]}-step chunk in {time.perf_counter() - t_compile:.1f} s; "
      f"training steps {plan[0][0] + 1}..{plan[-1][0] + plan[-1][1]}")
  backend.release_heap()  # the compiler's garbage, before the chunk's buffers fill
  for k, (s, n) in enumerate(plan):
    run.state, outputs = pending
    # The next chunk donates the state: copy a checkpoint's state to the host first.
    host_state = (jax.device_get(step_lib.without_coefficients(run.state))
                  if s + n in run.checkpoint_steps else None)
    # Dispatch the next chunk before touching this one's records on the host.
    pending = run.dispatch(run.state, *plan[k + 1]) if k + 1 < len(plan) else None
    chunk = _write_rows(run, s, n, outputs, host_state)
    del outputs, host_state
    for hook in hooks:
      hook(run, chunk)
    signals.check_signals()  # a signal whose exception Python lost (`signals.raise_on_signals`)
    backend.release_heap()  # this chunk's host copies


def _member_part(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _write_rows(run: runs.Run, s: int, n: int, outputs, host_state) -> Chunk:
  """Every member's rows of steps s+1..s+n into its folder; its position moves to s+n."""
  records, losses = jax.device_get(outputs[0]), np.asarray(outputs[1])
  chunk = Chunk(s, n, [_member_part(records, i) for i in range(len(run.members))],
                [losses[i] for i in range(len(run.members))], host_state)
  for m, mine in zip(run.members, chunk.records):
    for ser in run.layout.probes.series:
      m.folder.write_rows(ser.key, probes_lib.file_row(ser, s + 1), np.asarray(mine[ser.key]))
  disk.fault_point("rows_written")
  for m, mine, my_losses in zip(run.members, chunk.records, chunk.losses):
    m.pos.done = s + n
    m.pos.last_loss = recorded_loss(mine, my_losses)
  return chunk


def watch_divergence(log) -> Hook:
  """A hook that notes each member's first non-finite loss (metadata: diverged_at_step)."""

  def hook(run: runs.Run, chunk: Chunk) -> None:
    for m, losses in zip(run.members, chunk.losses):
      if m.pos.diverged is None:
        m.pos.diverged = finite.first_nonfinite(losses, chunk.start + 1)
        if m.pos.diverged is not None:
          log(f"{m.label + ': ' if m.label else ''}loss became "
              f"{losses[m.pos.diverged - chunk.start - 1]} at step {m.pos.diverged}; the run "
              "goes on recording (metadata: diverged_at_step)")

  return hook


def checkpoint(run: runs.Run, chunk: Chunk) -> None:
  """A hook that checkpoints every member when the chunk ends on a checkpoint step (rows
  0..end are already written)."""
  if chunk.host_state is not None:
    for i, m in enumerate(run.members):
      m.folder.checkpoint(chunk.end, _member_part(chunk.host_state, i),
                          {"elapsed_s": elapsed(run, m)})


def elapsed(run: runs.Run, m: runs.Member) -> float:
  """A member's wall seconds so far, over every process that ran it."""
  return m.elapsed_before + time.perf_counter() - run.t_start


def mean_loss(run: runs.Run) -> float:
  return float(np.mean([m.pos.last_loss for m in run.members]))


def recorded_loss(records, losses) -> float:
  """The chunk's last loss as recorded (bf16, the lab's final_loss), else the f32 one."""
  for key in ("loss", "losses"):
    if key in records:
      return float(np.asarray(records[key])[-1])
  return float(losses[-1])


def finish(run: runs.Run) -> list:
  """Writes each member's trackers' final tensors and commits it with its final metadata."""
  final = jax.device_get(run.state)
  out = []
  for i, m in enumerate(run.members):
    for k, a in _member_part(final, i).probe_state.items():
      m.folder.write(k, np.asarray(a))
    disk.fault_point("final_tensors_written")
    meta = {**m.metadata,  # the backend facts are the start's; commit sets completed
            **layout_lib.lab_metadata(m.cfg, run.corpus, m.layout, m.cfg.steps, m.pos.last_loss),
            "wall_time_s": elapsed(run, m), "steps_completed": m.cfg.steps,
            "diverged_at_step": m.pos.diverged}
    lms = _member_part(final, i).probe_state.get("last_motion_step")
    if lms is not None:  # the lab's Crucible metadata keys
      meta["global_last_motion"] = int(np.max(lms))
      meta["fimbulwinter_duration"] = m.cfg.steps - meta["global_last_motion"]
    out.append(RunResult(m.folder.path, m.folder.trajectory, m.folder.commit(meta)))
  return out


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

  def update(self, run: runs.Run, chunk: Chunk):
    if not self.enabled:
      return
    done, loss = chunk.end, mean_loss(run)
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
