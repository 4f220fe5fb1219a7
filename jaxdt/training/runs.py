"""A Run: one or more members (run folders) trained by one compiled program.

A solo run is a sweep group of one member. `open_run(...)` builds the Run, on the
host: the members' layouts and step-0 states (a bad --init_checkpoint fails
here, before any folder is touched), their run folders (locked, begun or
resumed, then moved back to one common step), the static tensors of each member
(written here and nowhere else), and the compiled chunk program
(`step.make_chunk`) with the stacked state on its devices. The chunk loop
(`loop.run_chunks`) drives the Run, row 0 and checkpoint 0 of a fresh run being
its chunk 0; `loop.finish` commits every member.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.io import disk
from jaxdt.io import hosts
from jaxdt.io import rundir
from jaxdt.io import tensorfile
from jaxdt.numerics import backend
from jaxdt.training import fingerprint as fingerprint_lib
from jaxdt.training import layout as layout_lib
from jaxdt.training import initial
from jaxdt.training import step


@dataclasses.dataclass(frozen=True)
class Options:
  """How to run (never what: that is the config)."""

  resume: bool = False  # continue unfinished folders from their newest intact checkpoints
  progress: bool = True  # the progress bar
  stop_after: Optional[int] = None  # stop (unfinished, as if killed) after this step; tests
  exact: bool = True  # members one after another within a device (bits = their solo runs')
  devices: Optional[int] = None  # local devices the members spread over (`program_devices`)
  allow_host_change: bool = False  # resume where the run's host had other arithmetic


class MemberSpec(NamedTuple):
  """One member to run: its config, its folder, its name in notes, its extra metadata."""

  cfg: config_lib.ExperimentConfig
  out_dir: str
  label: str = ""  # "" for a solo run
  metadata: Mapping[str, Any] = {}  # e.g. a sweep member's "sweep" record


@dataclasses.dataclass
class Position:
  """Where a member is: steps written, the last recorded loss, the first non-finite step."""

  done: int = 0
  last_loss: float = float("nan")
  diverged: Optional[int] = None


@dataclasses.dataclass
class Member:
  """One run folder of a Run."""

  cfg: config_lib.ExperimentConfig
  folder: rundir.RunDir
  layout: layout_lib.Layout
  parts: layout_lib.MetadataParts  # its metadata.json's parts (`layout.run_metadata`)
  host: dict  # this host's record (`host_record`)
  label: str = ""
  pos: Position = dataclasses.field(default_factory=Position)
  elapsed_before: float = 0.0  # wall seconds of the run's earlier processes (its checkpoint's)
  fresh: bool = True  # begun from step 0 with no checkpoint: its row 0 is chunk 0's

  @property
  def metadata(self) -> dict:
    """metadata.json as it stands (`layout.run_metadata` of the parts)."""
    return layout_lib.run_metadata(self.parts)


@dataclasses.dataclass
class Run:
  """Members trained together, where they stand, and the program that steps them."""

  members: list
  corpus: corpus_lib.Corpus
  start: int  # the step every member continues after
  end: int  # the step this process stops after (the config's steps, or stop_after)
  checkpoint_steps: tuple
  state: Any  # the members' states stacked on a leading axis, on the program's devices
  dispatch: Callable  # dispatch(state, start, length) -> (state, (records, losses)), async
  t_start: float

  @property
  def cfg(self) -> config_lib.ExperimentConfig:
    """The members' shared structure (they differ only in traced values)."""
    return self.members[0].cfg

  @property
  def layout(self) -> layout_lib.Layout:
    return self.members[0].layout


# --- Host-side preparation -------------------------------------------------------------


def checkpoint_steps(cfg: config_lib.ExperimentConfig) -> tuple:
  """The config's checkpoint steps inside the run, in order."""
  return tuple(sorted(c for c in set(cfg.store.checkpoint_steps) if 0 <= c <= cfg.steps))


def host_record(cfg: config_lib.ExperimentConfig) -> dict:
  """This host's arithmetic for `cfg`: CPU, features, GEMM path, fingerprint (`io.hosts`)."""
  return {**backend.cpu_description(), "gemm_path": backend.gemm_path(cfg.model.gemm_operands),
          "arithmetic_fingerprint": fingerprint_lib.fingerprint(cfg.model.gemm_operands)}


def start_parts(spec: MemberSpec, corpus, lay) -> tuple[layout_lib.MetadataParts, dict]:
  """(a member's metadata parts at its start, this host's record). The inputs are what a
  resume must find unchanged; the arithmetic fingerprint is stored once, in `hosts` (the
  hosts the run's steps ran on, `io.hosts`; readers take the last with `hosts.host_of`)."""
  cfg = spec.cfg
  inputs = {"data_files": corpus.files,
            "init_checkpoint_sha256": disk.sha256_file(cfg.init_checkpoint)
            if cfg.init_checkpoint else None,
            # A resume on a host that resolves another GEMM path is refused (other bits).
            "gemm_path": backend.gemm_path(cfg.model.gemm_operands)}
  host = host_record(cfg)
  return layout_lib.MetadataParts(cfg, corpus, lay, inputs, ({"from_step": 0, **host},),
                                  dict(spec.metadata)), host


def program_devices(n_members: int, exact: bool, wanted: Optional[int] = None) -> list:
  """The local devices a program's members spread over: the most that split them evenly.

  Exact mode on CPU takes one device unless told otherwise: CPU "devices" in one
  process share its cores, and XLA:CPU splits a kernel's work by the threads it
  gives each device, so a member on one of two CPU devices can come out with
  other bits than its solo run (BUILD_NOTES, "Sweeps"). Accelerators are
  separate chips: all of them.
  """
  local = jax.local_devices()
  if wanted is not None:
    if not 1 <= wanted <= len(local):
      raise ValueError(f"--sweep_devices={wanted}: this process has {len(local)} device(s)")
    local = local[:wanted]
  elif exact and local[0].platform == "cpu":
    local = local[:1]
  n = max(d for d in range(1, min(len(local), n_members) + 1) if n_members % d == 0)
  return list(local)[:n]


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def program(cfgs: Sequence[config_lib.ExperimentConfig], tokens, rows, devs: Sequence,
            exact: bool = True) -> tuple:
  """(dispatch, sharding): the one compiled chunk program (`step.make_chunk`) of members
  with configs `cfgs` on `devs`; dispatch(states, s, n) runs steps s+1..s+n of the stacked
  states (a leading members axis, placed with `sharding`). Runs, tests and the profile
  all execute this program."""
  sharding = NamedSharding(Mesh(np.array(devs), ("m",)), P("m"))
  data = jax.device_put(_stack([initial.member_data(c) for c in cfgs]), sharding)
  chunk = step.make_chunk(cfgs[0], tokens, rows, sharding.mesh, exact)
  return (lambda st, s, n: chunk(st, data, jnp.int32(s), n)), sharding


def stacked(states: Sequence, sharding) -> Any:
  """Member states on a leading axis (their AdamW tables padded to one length), placed for
  `program`'s dispatch."""
  return jax.device_put(_stack(initial.pad_coefficients(list(states))), sharding)


# --- Opening the members' folders ------------------------------------------------------


def _folder_plan(m: Member, state, n_members: int, opts: Options) -> rundir.FolderPlan:
  cfg = m.cfg
  return rundir.FolderPlan(
      cfg.name, config_lib.to_dict(cfg), m.parts.inputs, m.layout.specs,
      layout_lib.FILE_METADATA,
      checkpoint_steps(cfg), layout_lib.state_bytes(step.without_coefficients(state)),
      3 * m.layout.chunk_bytes * n_members * min(cfg.store.chunk_steps, cfg.steps),
      host=m.host, allow_host_change=opts.allow_host_change)


def _restored(begun: rundir.Begun, like) -> rundir.Begun:
  """A begun folder's state (restored without its AdamW coefficients, as checkpoints store
  it) with the coefficients of the member's config (`like`: its step-0 state)."""
  if begun.state is None:
    return begun
  return begun._replace(state=step.with_coefficients(begun.state, like.opt_state.coef))


def _common_start(members: Sequence[Member], begun: list, states: Sequence) -> int:
  """Moves members that got further back to the earliest member's step; returns it."""
  start = min(b.step for b in begun)
  while any(b.step > start for b in begun):
    for i, m in enumerate(members):
      if begun[i].step > start:
        begun[i] = _restored(m.folder.rewind(start, step.without_coefficients(states[i])),
                             states[i])
    start = min(b.step for b in begun)
  return start


def _write_start(m: Member, state, begun: rundir.Begun, start: int, log) -> Any:
  """The hosts a member's steps ran on, its wall time so far and its static tensors, from
  where it continues (row 0 and checkpoint 0 of a fresh member are chunk 0's: `loop`)."""
  fresh = m.fresh = begun.state is None
  m.parts = m.parts._replace(hosts=tuple(hosts.hosts_after_resume(
      m.folder.previous_metadata, m.host, start)))
  m.elapsed_before = 0.0 if fresh else float(begun.extra.get("elapsed_s", 0.0))
  m.folder.rewrite_metadata(m.metadata)
  for k, a in m.layout.static.items():  # a resume rewrites the same bytes
    m.folder.write(k, a)
  m.pos.done = start
  log(f"run folder: {m.folder.path} ({os.path.basename(m.folder.partial)}, "
      f"{disk.fmt_bytes(tensorfile.estimate_bytes(m.layout.specs, layout_lib.FILE_METADATA))})")
  return state if fresh else begun.state


def _open_members(specs, corpus, opts: Options, stack, log) -> tuple[list, list]:
  """Layouts, step-0 states and begun folders of every member, from one common step."""
  prepared = []
  for spec in specs:  # every input is checked before any folder is touched
    lay = layout_lib.layout(spec.cfg, corpus)
    prepared.append((spec, lay, initial.init_state(spec.cfg, lay.dims)))
  backend.release_heap()  # what tokenizing and the init's compile freed
  members, states, begun = [], [], []
  for spec, lay, state in prepared:
    parts, host = start_parts(spec, corpus, lay)
    folder = stack.enter_context(rundir.RunDir(spec.out_dir, spec.cfg.store.trajectory_name,
                                               log=log))
    m = Member(spec.cfg, folder, lay, parts, host, spec.label)
    begun.append(_restored(folder.begin(_folder_plan(m, state, len(specs), opts),
                                        m.metadata, step.without_coefficients(state),
                                        opts.resume), state))
    members.append(m)
    states.append(state)
  start = _common_start(members, begun, states)
  states = [_write_start(m, s, b, start, log) for m, s, b in zip(members, states, begun)]
  return members, states


@contextlib.contextmanager
def open_run(specs: Sequence[MemberSpec], corpus: corpus_lib.Corpus, opts: Options, *,
          log: Callable[[str], None] = print, t_start: Optional[float] = None) -> Iterator[Run]:
  """Builds the Run of `specs` (members of one structure: `sweep.group_key`).

  Every member's folder stays locked while the Run is open; leaving by an
  exception leaves each folder unfinished and resumable.

  Raises:
    disk.StoreError, vocabulary.DataError, ValueError: bad input or folder (one
      line); nothing in any folder changed.
  """
  t_start = time.perf_counter() if t_start is None else t_start
  with contextlib.ExitStack() as stack:
    members, states = _open_members(specs, corpus, opts, stack, log)
    cfg = members[0].cfg
    devs = program_devices(len(members), opts.exact, opts.devices)
    if len(members) > 1:
      log(f"sweep group: {len(members)} members ({', '.join(m.label for m in members)}) on "
          f"{len(devs)} device(s), {'exact (lax.map)' if opts.exact else 'fast (vmap)'}")
    dispatch, sharding = program([m.cfg for m in members], corpus.tokens,
                                 members[0].layout.rows, devs, opts.exact)
    end = cfg.steps if opts.stop_after is None else min(cfg.steps, opts.stop_after)
    yield Run(members, corpus, members[0].pos.done, end, checkpoint_steps(cfg),
              stacked(states, sharding), dispatch, t_start)
