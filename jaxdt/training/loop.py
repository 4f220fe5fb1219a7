"""The one training loop: chunks of the compiled program, streamed into run folders.

`train(cfg, out_dir)` is a Run of one member; `train_members` runs any Run
(a sweep group passes its members). The lifecycle (docs/architecture.md): `runs.open_run`
opens the folders and builds the program; `run_chunks` emits chunk 0 (row 0 of a
fresh run: the state before any step), then dispatches each chunk before it hands
the previous chunk's records to the members' folders (the one writer of rows), then
calls the hooks that are due. A hook has its own cadence (`Hooks.add(fn, every=N)`
or at=steps, as levanter's `add_hook(fn, every=N)`); the chunk plan ends chunks where
a hook is due, and a hook that asks for the state (`take`) gets its own host copy,
taken before the next chunk is dispatched (it donates the state). Divergence
watching, progress and checkpointing (the one writer of checkpoints, chunk 0's
included) are hooks. `finish` writes the trackers' final values and commits every
member. `rundir.RunDir` owns each folder's protocol; analyses run after the loop
(run.py), never inside it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from jaxdt import config as config_lib
from jaxdt import probes as probes_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.io import checkpoints as checkpoints_lib
from jaxdt.io import disk
from jaxdt.io import metadata as metadata_lib
from jaxdt.io import signals
from jaxdt.numerics import backend
from jaxdt.numerics import finite
from jaxdt.training import layout as layout_lib
from jaxdt.training import runs
from jaxdt.training import initial
from jaxdt.training import step as step_lib


@dataclasses.dataclass(frozen=True)
class RunResult:
  """Where a finished run lives and what it measured."""

  run_dir: str
  trajectory: str
  metadata: dict


class Chunk(NamedTuple):
  """One finished chunk, on the host: steps start+1..start+length of every member. Chunk 0
  (start 0, length 0) holds row 0 of a fresh run: the records of the state before any step."""

  start: int
  length: int
  records: list  # per member: {file key: stacked rows}
  losses: list  # per member: f32 [length]

  @property
  def end(self) -> int:
    return self.start + self.length


class Hook(NamedTuple):
  """fn(run, chunk, taken) after the chunks that end where the hook is due: every chunk
  (every and at both None), every N steps, or at the steps `at` (none if empty).
  `take(run)`, if given, runs before the next chunk is dispatched and its result is
  `taken` (else None)."""

  fn: Callable[[runs.Run, Chunk, object], None]
  every: Optional[int] = None
  at: Optional[tuple] = None
  take: Optional[Callable[[runs.Run], object]] = None

  def due(self, end: int) -> bool:
    if self.every is None and self.at is None:
      return True
    return end in (self.at or ()) or (self.every is not None and end % self.every == 0)

  def marks(self, start: int, stop: int) -> set:
    """The steps in (start, stop) where this hook is due and a chunk must end."""
    if self.every is None and self.at is None:
      return set()
    every = range(start - start % self.every + self.every, stop, self.every) if self.every else ()
    return {s for s in (*(self.at or ()), *every) if start < s < stop}


class Hooks:
  """The hooks of a run, each with its cadence (levanter's `add_hook(fn, every=N)`)."""

  def __init__(self):
    self.hooks: list = []

  def add(self, fn, *, every: Optional[int] = None, at: Optional[Sequence[int]] = None,
          take=None) -> None:
    """Adds fn(run, chunk, taken): after every chunk, or every N steps, or at the steps
    `at` (an empty `at`: never)."""
    if every is not None and every < 1:
      raise ValueError(f"a hook's cadence must be >= 1 step, got every={every}")
    self.hooks.append(Hook(fn, every, None if at is None else tuple(at), take))

  def marks(self, start: int, stop: int) -> set:
    return set().union(*(h.marks(start, stop) for h in self.hooks))

  def due(self, end: int) -> list:
    return [h for h in self.hooks if h.due(end)]


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
    with runs.open_run(specs, corpus, opts, log=log, t_start=t_start) as run:
      bar = Progress(run.cfg.steps, run.start, opts.progress)
      hooks = Hooks()
      hooks.add(watch_divergence(log))
      hooks.add(checkpoint_hook, at=run.checkpoint_steps, take=take_state)
      hooks.add(bar.update)
      if on_chunk is not None:
        hooks.add(lambda r, c, _: c.length and on_chunk(c.end, mean_loss(r)))
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
  """The one-line report of a signal: the step reached and where --resume continues, as
  each folder stands on disk (a finished one is reported finished)."""
  if run is None:  # before the first chunk
    return signals.Interrupted.from_signal(e, None, None)
  states = [_on_disk(m.folder) for m in run.members]
  marks = [newest for _, newest in states]
  finished = run.members[0].folder.path if len(states) == 1 and states[0][0] else None
  return signals.Interrupted.from_signal(e, min(m.pos.done for m in run.members),
                                         None if None in marks else min(marks), finished)


def _on_disk(folder) -> tuple[bool, Optional[int]]:
  """(whether the run is committed, the newest checkpoint step whose marker is written) as
  the disk says: a signal can land after the commit rename or a marker's write and before
  the RunDir has noted it."""
  try:
    done = folder.committed or metadata_lib.is_complete(folder.path,
                                                        os.path.basename(folder.trajectory))
    marks = [st for st, _ in checkpoints_lib.intact_checkpoints(folder.ckpt_dir)]
  except (OSError, ValueError):  # a message must not fail: what the RunDir knows
    done, marks = folder.committed, []
  newest = max([m for m in (folder.resume_from, *marks[:1]) if m is not None], default=None)
  return done, newest


def run_chunks(run: runs.Run, hooks: Hooks, log=print) -> None:
  """Drives the Run from run.start to run.end: chunk 0 first for fresh members, then each
  chunk's rows are written while the next one computes, and the hooks due at its end run."""
  if run.start == 0 and any(m.fresh for m in run.members):
    _after(run, hooks, _write_rows(run, 0, 0, _initial_records(run)), {
        id(h): h.take(run) for h in hooks.due(0) if h.take is not None})
  plan = chunk_plan(run.start, run.end, run.cfg.store.chunk_steps,
                    hooks.marks(run.start, run.end))
  if not plan:
    return
  t_compile = time.perf_counter()
  pending = run.dispatch(run.state, *plan[0])  # the first call traces and compiles first
  log(f"compiled the {plan[0][1]}-step chunk in {time.perf_counter() - t_compile:.1f} s; "
      f"training steps {plan[0][0] + 1}..{plan[-1][0] + plan[-1][1]}")
  backend.release_heap()  # the compiler's garbage, before the chunk's buffers fill
  for k, (s, n) in enumerate(plan):
    run.state, outputs = pending
    # The next chunk donates the state: hooks that want it take their copies first.
    taken = {id(h): h.take(run) for h in hooks.due(s + n) if h.take is not None}
    # Dispatch the next chunk before touching this one's records on the host.
    pending = run.dispatch(run.state, *plan[k + 1]) if k + 1 < len(plan) else None
    records, losses = jax.device_get(outputs[0]), np.asarray(outputs[1])
    del outputs
    _after(run, hooks, _write_rows(run, s, n, (records, losses)), taken)
    del records, losses, taken
    signals.check_signals()  # a signal whose exception Python lost (`signals.raise_on_signals`)
    backend.release_heap()  # this chunk's host copies


def _after(run: runs.Run, hooks: Hooks, chunk: Chunk, taken: dict) -> None:
  for h in hooks.due(chunk.end):
    h.fn(run, chunk, taken.get(id(h)))


def _member_part(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _initial_records(run: runs.Run) -> tuple:
  """Chunk 0's outputs: every member's row 0 (the series that have one), stacked as a
  chunk's records are, and no losses."""
  states = [_member_part(run.state, i) for i in range(len(run.members))]
  rows = [initial.initial_records(m.cfg, st, m.layout.rows)
          for m, st in zip(run.members, states)]
  return ({k: np.stack([r[k][None] for r in rows]) for k in rows[0]},
          np.zeros((len(run.members), 0), np.float32))


def _write_rows(run: runs.Run, s: int, n: int, outputs) -> Chunk:
  """Every member's rows of steps s+1..s+n (chunk 0: row 0) into its folder; its position
  moves to s+n. The one writer of trajectory rows."""
  records, losses = outputs
  chunk = Chunk(s, n, [_member_part(records, i) for i in range(len(run.members))],
                [losses[i] for i in range(len(run.members))])
  for m, mine in zip(run.members, chunk.records):
    if n == 0 and not m.fresh:  # resumed from checkpoint 0: its row 0 is on disk
      continue
    for ser in run.layout.probes.series:
      if ser.key in mine:
        row = 0 if n == 0 else probes_lib.file_row(ser, s + 1)
        m.folder.write_rows(ser.key, row, np.asarray(mine[ser.key]))
  disk.fault_point("initial_rows_written" if n == 0 else "rows_written")
  if n == 0:
    return chunk
  for m, mine, my_losses in zip(run.members, chunk.records, chunk.losses):
    m.pos.done = s + n
    m.pos.last_loss = recorded_loss(mine, my_losses)
  return chunk


def watch_divergence(log):
  """A hook that notes each member's first non-finite loss (metadata: diverged_at_step)."""

  def hook(run: runs.Run, chunk: Chunk, _) -> None:
    for m, losses in zip(run.members, chunk.losses):
      if m.pos.diverged is None:
        m.pos.diverged = finite.first_nonfinite(losses, chunk.start + 1)
        if m.pos.diverged is not None:
          log(f"{m.label + ': ' if m.label else ''}loss became "
              f"{losses[m.pos.diverged - chunk.start - 1]} at step {m.pos.diverged}; the run "
              "goes on recording (metadata: diverged_at_step)")

  return hook


def take_state(run: runs.Run):
  """The checkpoint hook's own host copy of the stacked state, as checkpoints store it
  (`step.without_coefficients`)."""
  return jax.device_get(step_lib.without_coefficients(run.state))


def checkpoint_hook(run: runs.Run, chunk: Chunk, state) -> None:
  """The checkpoint hook (at the config's checkpoint steps, step 0 included): every member's
  state after the chunk, once its rows 0..end are written."""
  for i, m in enumerate(run.members):
    if chunk.length or m.fresh:  # checkpoint 0: of fresh members only
      m.folder.checkpoint(chunk.end, _member_part(state, i), {"elapsed_s": elapsed(run, m)})


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
    lms = _member_part(final, i).probe_state.get("last_motion_step")
    m.parts = m.parts._replace(progress=layout_lib.Progress(
        m.cfg.steps, m.pos.last_loss, elapsed(run, m), m.pos.diverged,
        None if lms is None else int(np.max(lms))))
    out.append(RunResult(m.folder.path, m.folder.trajectory, m.folder.commit(m.metadata)))
  return out


def chunk_plan(start: int, steps: int, chunk: int, marks) -> list:
  """[(start, length)] chunks covering start..steps, each ending at or before a mark (a
  step where a hook is due)."""
  marks = sorted(c for c in set(marks) if start < c < steps)
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

  def update(self, run: runs.Run, chunk: Chunk, _=None):
    if not self.enabled or chunk.length == 0:
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
