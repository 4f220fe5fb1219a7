"""Sweeps: many runs of one experiment in one process, one compiled program per group.

`--sweep="learning_rate=1e-3,3e-4;weight_decay=0,0.1"` is the cartesian
product of `;`-separated axes: any AdamW hyperparameter, `seed`, `data_seed`
(the data order apart from the init) and `precision`. Members whose programs
have the same shapes, dtypes and structure form a group (a precision axis
makes groups; so do weight_decay = 0 against != 0 and torch's two lerp forms,
which are different ops); each group is one Run (`training.runs`), the same
Run a solo run is with one member: one compiled program (`step.make_chunk`)
with the members on a leading axis, spread over the local devices, one after
another within a device in exact mode (every member byte-identical to its solo
run) or vmapped in fast mode (other summation orders, other bits).

Every member is a complete run folder (`member_dirs`), written, checkpointed,
resumed and committed by its own `rundir.RunDir`; its metadata records its own
config and the sweep it came from. Over hosts, each process takes the members
`i % process_count == process_index` (`jax.distributed` gives the index).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Callable, NamedTuple, Sequence

import jax

from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.io import metadata as metadata_lib
from jaxdt.numerics import backend
from jaxdt.optim import adamw
from jaxdt.training import loop
from jaxdt.training import runs

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
  structure = tuple(adamw.form(cfg.optim))  # the arithmetic's form; the values are traced
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


# --- Running the groups --------------------------------------------------------------


def train_sweep(cfg: config_lib.ExperimentConfig, spec: str, out_root: str,
                opts: runs.Options = runs.Options(), *,
                log: Callable[[str], None] = print) -> list:
  """Runs every member of `cfg` x `spec` this process owns; returns [(member, result)].

  Each group is one Run (`loop.train_members`); members whose folder is already
  finished are left out of a resumed sweep.
  """
  check(cfg, spec)
  ms = members(cfg, spec)
  rank, world = jax.process_index(), jax.process_count()
  mine = [m for m in ms if m.index % world == rank]
  os.makedirs(out_root, exist_ok=True)
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  log(f"data: {loop.describe_corpus(corpus)}")
  log(f"sweep {spec!r}: {len(ms)} members in {len(groups(ms))} group(s)"
      + (f"; process {rank} of {world} runs {len(mine)}" if world > 1 else "")
      + f"; GEMMs {backend.gemm_path(cfg.model.gemm_operands)}; folders under {out_root}")
  out = []
  for group in groups(mine):
    todo = [m for m in group
            if not (opts.resume and metadata_lib.is_complete(os.path.join(out_root, m.name),
                                                              m.cfg.store.trajectory_name))]
    for m in group:
      if m not in todo:
        log(f"{m.name}: finished already")
    if todo:
      specs = [runs.MemberSpec(m.cfg, d, m.name, {"sweep": _sweep_record(m, spec, out_root)})
               for m, d in zip(todo, member_dirs(out_root, todo))]
      out += list(zip(todo, loop.train_members(specs, opts, corpus=corpus, log=log)))
  return out


def _sweep_record(m: SweepMember, spec: str, out_root: str) -> dict:
  """A member's "sweep" entry in its metadata.json."""
  return {"spec": spec, "root": os.path.abspath(out_root), "member": m.index, "name": m.name,
          "assignment": m.assignment}
