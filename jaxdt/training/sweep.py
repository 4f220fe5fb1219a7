"""Sweeps: many runs of one experiment in one process, one compiled program per group.

`--sweep="learning_rate=1e-3,3e-4;weight_decay=0,0.1"` is the cartesian
product of `;`-separated axes: any AdamW hyperparameter, `seed`, `data_seed`
(the data order apart from the init) and `precision`. Members whose programs
have the same shapes, dtypes and structure form a group (a precision axis
makes groups; so do weight_decay = 0 against != 0 and torch's two lerp forms,
which are different ops); each group is one jitted program:

  members on a leading axis, spread over the local devices (`shard_map` on a
  1-D mesh; on CPU one device in exact mode, `sweep_devices`), and within a device
    exact (default): `lax.map`, one member after another through the very step
      a solo run compiles; each member's hyperparameters and data key are
      traced data (`step.Member`) holding the values a solo run folds in as
      constants, so every member's trajectory is byte-identical to its solo run;
    fast (`exact=False`): `vmap`, the members batched into wider kernels; the
      batched GEMMs sum in other orders, so bits differ from a solo run.

Every member is a complete run folder (`member_dirs`), written, checkpointed,
resumed and committed by its own `rundir.RunDir`; its metadata records its own
config and the sweep it came from. Over hosts, each process takes the members
`i % process_count == process_index` (`jax.distributed` gives the index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.io import metadata as metadata_lib
from jaxdt.io import rundir
from jaxdt.numerics import backend
from jaxdt.optim import adamw
from jaxdt.training import layout as layout_lib
from jaxdt.training import loop
from jaxdt.training import step as step_lib

OPTIM_AXES = tuple(f.name for f in dataclasses.fields(config_lib.OptimConfig))
AXES = OPTIM_AXES + ("seed", "data_seed", "precision")


class SweepMember(NamedTuple):
  """One run of a sweep."""

  index: int
  name: str  # its folder under the sweep's output_dir
  assignment: dict  # axis -> value
  cfg: config_lib.ExperimentConfig


def _path(axis: str) -> str:
  return f"optim.{axis}" if axis in OPTIM_AXES else axis


def parse(spec: str) -> list[tuple[str, list[str]]]:
  """`a=1,2;b=3` -> [("a", ["1", "2"]), ("b", ["3"])], axes checked (one-line errors)."""
  axes = []
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      continue
    axis, eq, values = part.partition("=")
    axis = axis.strip().removeprefix("optim.")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not eq or not vals:
      raise ValueError(f"--sweep axis {part!r} has no values; write axis=v1,v2 (axes joined "
                       "by ';')")
    if axis not in AXES:
      raise ValueError(f"--sweep axis {axis!r} is not one of {', '.join(AXES)}")
    if axis in (a for a, _ in axes):
      raise ValueError(f"--sweep names {axis!r} twice; give each axis once")
    axes.append((axis, vals))
  if not axes:
    raise ValueError(f"--sweep={spec!r} names no axis; e.g. --sweep='learning_rate=1e-3,3e-4'")
  return axes


def _show(v) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


def members(cfg: config_lib.ExperimentConfig, spec: str) -> list[SweepMember]:
  """The cartesian product of `spec`'s axes applied to `cfg` (in the spec's order)."""
  axes = parse(spec)
  out = []
  for i, values in enumerate(itertools.product(*(v for _, v in axes))):
    member = cfg
    for (axis, _), text in zip(axes, values):
      member = config_lib.override(member, f"{_path(axis)}={text}")
    assignment = {axis: config_lib.get_path(member, _path(axis)) for axis, _ in axes}
    name = f"m{i:02d}_" + "_".join(f"{a}={_show(v)}" for a, v in assignment.items())
    out.append(SweepMember(i, name, assignment, member))
  values = [tuple(m.assignment.values()) for m in out]
  if len(set(values)) != len(values):
    raise ValueError(f"--sweep={spec!r} gives two members the same values; list each value once")
  return out


def group_key(cfg: config_lib.ExperimentConfig) -> tuple:
  """Members with equal keys share one compiled program (traced fields set aside)."""
  structure = (cfg.optim.weight_decay != 0, adamw.lerp_from_m(cfg.optim))
  neutral = dataclasses.replace(cfg, seed=0, data_seed=None, sweep="",
                                optim=config_lib.OptimConfig())
  return (config_lib.to_json(neutral), structure)


def groups(ms: Sequence[SweepMember]) -> list[list[SweepMember]]:
  """Members grouped by `group_key`, in order of first appearance."""
  out: dict = {}
  for m in ms:
    out.setdefault(group_key(m.cfg), []).append(m)
  return list(out.values())


def check(cfg: config_lib.ExperimentConfig, spec: str) -> None:
  """Refuses sweeps the tool cannot run exactly (one line)."""
  swept = {a for a, _ in parse(spec)}
  if cfg.init_checkpoint and "seed" in swept:
    raise ValueError("--init_checkpoint fixes the init, so a seed axis changes nothing but "
                     "the data order: sweep data_seed instead")


def member_dirs(out_root: str, ms: Sequence[SweepMember]) -> list[str]:
  return [os.path.join(out_root, m.name) for m in ms]


# --- The compiled group ----------------------------------------------------------------


def devices_for(n_members: int, devices: Sequence) -> list:
  """The most local devices that split the members evenly (at least one)."""
  n = max(d for d in range(1, min(len(devices), n_members) + 1) if n_members % d == 0)
  return list(devices)[:n]


def sweep_devices(exact: bool, wanted: Optional[int] = None) -> list:
  """The local devices a group may use.

  Exact mode on CPU takes one device unless told otherwise: CPU "devices" in one
  process share its cores, and XLA:CPU splits a kernel's work by the threads it
  gives each device, so at full size (V 10,000) a member on one of two CPU
  devices came out with other bits than its solo run (0/2 identical; at V 2,000
  and below 4/4 were). Accelerators are separate chips: all of them.
  """
  local = jax.local_devices()
  if wanted is not None:
    if not 1 <= wanted <= len(local):
      raise ValueError(f"--sweep_devices={wanted}: this process has {len(local)} device(s)")
    return local[:wanted]
  return local[:1] if exact and local[0].platform == "cpu" else local


def make_group_chunk(cfg, tokens, rows, mesh: Mesh, exact: bool = True):
  """`run(states, members, start, length) -> (states, (records, losses))` for a group.

  Leading axis = members, sharded over `mesh`'s "m" axis; records come back
  with the same leading axis.
  """

  def member_chunk(state, member, start, length):
    one_step = step_lib.make_step(cfg, tokens, rows, member)
    ts = start + 1 + jnp.arange(length, dtype=jnp.int32)
    return jax.lax.scan(one_step, state, ts)

  def run(states, consts, start, length):
    def local(states, consts, start):
      if exact:
        return jax.lax.map(lambda sc: member_chunk(sc[0], sc[1], start, length), (states, consts))
      return jax.vmap(member_chunk, in_axes=(0, 0, None, None))(states, consts, start, length)

    return jax.shard_map(local, mesh=mesh, in_specs=(P("m"), P("m"), P()),
                         out_specs=P("m"), check_vma=False)(states, consts, start)

  return jax.jit(run, static_argnums=3, donate_argnums=0)


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _member_slice(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


# --- The host loop ---------------------------------------------------------------------


def train_group(ms: Sequence[SweepMember], out_root: str, spec: str, corpus, *,
                resume: bool = False, exact: bool = True, stop_after: Optional[int] = None,
                progress: bool = True, log: Callable[[str], None] = print,
                devices: Optional[Sequence] = None) -> list:
  """Runs one group's members to completion; returns their RunResults (None if stopped).

  Members whose folder is already finished are left out (a resumed sweep).
  """
  t_start = time.perf_counter()
  cfg0 = ms[0].cfg
  lays = [layout_lib.layout(m.cfg, corpus) for m in ms]  # static tensors may differ (hp)
  lay = lays[0]
  assert all(x.specs == lay.specs for x in lays), "a group's members share one file layout"
  states = [step_lib.init_state(m.cfg, lay.dims) for m in ms]
  table_rows = max(len(adamw.scalar_table(m.cfg.optim)) for m in ms)
  consts = [step_lib.member_of(m.cfg, table_rows) for m in ms]
  checkpoint_steps = sorted(c for c in set(cfg0.store.checkpoint_steps) if 0 <= c <= cfg0.steps)
  end = cfg0.steps if stop_after is None else min(cfg0.steps, stop_after)
  devs = devices_for(len(ms), devices or sweep_devices(exact))
  mesh = Mesh(np.array(devs), ("m",))
  sweep_info = lambda m: {"spec": spec, "root": os.path.abspath(out_root), "member": m.index,
                          "name": m.name, "assignment": m.assignment}
  pos = [loop.Position() for _ in ms]
  metas, results = [None] * len(ms), [None] * len(ms)
  with contextlib.ExitStack() as stack:
    runs = [stack.enter_context(rundir.RunDir(d, cfg0.store.trajectory_name, log=log))
            for d in member_dirs(out_root, ms)]
    try:
      starts, restored = [], []
      for i, (m, run) in enumerate(zip(ms, runs)):
        inputs, metas[i] = loop.start_metadata(m.cfg, corpus, lays[i])
        metas[i]["sweep"] = sweep_info(m)
        s, r = run.begin(
            experiment=m.cfg.name, config=config_lib.to_dict(m.cfg), inputs=inputs,
            specs=lay.specs, file_metadata=layout_lib.FILE_METADATA, metadata=metas[i],
            like_state=states[i], resume=resume, checkpoint_steps=checkpoint_steps,
            checkpoint_bytes=layout_lib.state_bytes(states[i]),
            ram_bytes=3 * lay.chunk_bytes * len(ms) * min(cfg0.store.chunk_steps, cfg0.steps))
        starts.append(s)
        restored.append(r)
      start = min(starts)
      while any(s > start for s in starts):  # continue every member from one step
        for i, run in enumerate(runs):
          if starts[i] > start:
            starts[i], restored[i] = run.rewind(start, states[i])
        start = min(starts)
      for i, (m, run) in enumerate(zip(ms, runs)):
        states[i] = loop.write_start(run, m.cfg, lays[i], states[i], restored[i], checkpoint_steps)
        pos[i].done = start
      log(f"sweep group: {len(ms)} members ({', '.join(m.name for m in ms)}) on "
          f"{len(devs)} device(s), {'exact (lax.map)' if exact else 'fast (vmap)'}; "
          f"folders under {out_root}")
      sharding = NamedSharding(mesh, P("m"))
      state = jax.device_put(_stack(states), sharding)
      member_consts = jax.device_put(_stack(consts), sharding)
      run_chunk = make_group_chunk(cfg0, corpus.tokens, lay.rows, mesh, exact)
      bar = loop.Progress(cfg0.steps, start, progress)
      stack.callback(bar.close)
      plan = loop.chunk_plan(start, end, cfg0.store.chunk_steps, checkpoint_steps)
      state = loop.run_chunks(
          lambda st, s, n: run_chunk(st, member_consts, jnp.int32(s), n), state, plan,
          checkpoint_steps, lay.probes.series,
          [loop.Target(run, p, m.name) for m, run, p in zip(ms, runs, pos)], log, [bar.update],
          split=_member_slice)
      if min(p.done for p in pos) < cfg0.steps:
        return results
      final = jax.device_get(state)
      for i, (m, run) in enumerate(zip(ms, runs)):
        meta = loop.finish(run, m.cfg, corpus, lays[i], _member_slice(final, i), pos[i],
                           metas[i], t_start)
        results[i] = loop.RunResult(run.path, run.trajectory, meta)
    except KeyboardInterrupt as e:
      raise rundir.Interrupted.from_signal(e, min(p.done for p in pos),
                                           min((r.resume_from or 0) for r in runs)) from None
  return results


def train_sweep(cfg: config_lib.ExperimentConfig, spec: str, out_root: str, *,
                resume: bool = False, exact: bool = True, stop_after: Optional[int] = None,
                progress: bool = True, log: Callable[[str], None] = print,
                devices: Optional[int] = None) -> list:
  """Runs every member of `cfg` x `spec` this process owns; returns [(member, result)]."""
  check(cfg, spec)
  ms = members(cfg, spec)
  rank, world = jax.process_index(), jax.process_count()
  mine = [m for m in ms if m.index % world == rank]
  os.makedirs(out_root, exist_ok=True)
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  log(f"data: {loop.describe_corpus(corpus)}")
  log(f"sweep {spec!r}: {len(ms)} members in {len(groups(ms))} group(s)"
      + (f"; process {rank} of {world} runs {len(mine)}" if world > 1 else "")
      + f"; GEMMs {backend.gemm_path(cfg.model.gemm_operands)}")
  out = []
  for group in groups(mine):
    todo = [m for m in group
            if not (resume and metadata_lib.is_complete(os.path.join(out_root, m.name),
                                                         m.cfg.store.trajectory_name))]
    for m in group:
      if m not in todo:
        log(f"{m.name}: finished already")
    if todo:
      res = train_group(todo, out_root, spec, corpus, resume=resume, exact=exact,
                        stop_after=stop_after, progress=progress, log=log,
                        devices=sweep_devices(exact, devices))
      out += list(zip(todo, res))
  return out
