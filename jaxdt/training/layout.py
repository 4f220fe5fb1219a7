"""What a run records and where: the file's tensors, its sizes, its metadata keys.

`layout(cfg, corpus)` decides the trajectory's tensors (the declared probes'
series, the static masks and ids) before anything touches the folder, so the
preflight knows the bytes and probe key collisions are refused up front.
"""

from __future__ import annotations

import platform
import time
from typing import Mapping, NamedTuple, Optional

import jax
import numpy as np

from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.data import sampler
from jaxdt.model import tied_nll
from jaxdt.numerics import backend
from jaxdt.numerics import precision
from jaxdt import probes as probes_lib

FILE_METADATA = {"format": "pt"}  # the trajectory's safetensors metadata (the lab's)


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


def state_bytes(state) -> int:
  """Disk bytes of one checkpoint of `state` (arrays, header and marker, rounded up)."""
  leaves = jax.tree_util.tree_leaves(state)
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves) + (256 << 10)


class Progress(NamedTuple):
  """Where a run stands, for its metadata: none of it at the start; all of it at the end."""

  steps_done: int = 0
  final_loss: Optional[float] = None
  wall_time_s: Optional[float] = None  # set at the end (with steps_completed, diverged_at_step)
  diverged_at_step: Optional[int] = None
  last_motion: Optional[int] = None  # the lab's Crucible keys, where the run tracks motion


class MetadataParts(NamedTuple):
  """The typed parts of a run's metadata.json (`run_metadata`)."""

  cfg: config_lib.ExperimentConfig
  corpus: corpus_lib.Corpus
  layout: Layout
  inputs: Mapping  # what a resume must find unchanged (data files, init SHA-256, GEMM path)
  hosts: tuple  # the hosts the run's steps ran on (`io.hosts`), the fingerprint in each
  extra: Mapping = {}  # the caller's record (a sweep member's "sweep", a study's name)
  progress: Progress = Progress()


def run_metadata(parts: MetadataParts) -> dict:
  """metadata.json of a run, from its parts, while it runs and at its end: the one place
  it is assembled. The folder adds the commit's facts itself (`RunDir.commit`: completed,
  the trajectory's size and SHA-256s)."""
  cfg, p = parts.cfg, parts.progress
  meta = {**lab_metadata(cfg, parts.corpus, parts.layout, p.steps_done, p.final_loss),
          **our_metadata(cfg, parts.corpus), **parts.inputs, "hosts": list(parts.hosts),
          **parts.extra}
  if p.wall_time_s is not None:
    meta.update(wall_time_s=p.wall_time_s, steps_completed=p.steps_done,
                diverged_at_step=p.diverged_at_step)
  if p.last_motion is not None:
    meta.update(global_last_motion=p.last_motion, fimbulwinter_duration=cfg.steps - p.last_motion)
  return meta


def lab_metadata(cfg, corpus, lay: Layout, steps_done: int, final_loss) -> dict:
  """The lab notebooks' metadata.json keys (Crucible 1 and Thimble 8; docs/experiments.md)."""
  per_epoch = sampler.batches_per_epoch(len(corpus.tokens), cfg.data)
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
      "data_shapes": {k: list(shape) for k, (_, shape) in lay.specs.items()},
      "notes": cfg.store.notes,
  }


def our_metadata(cfg, corpus) -> dict:
  """jaxdt's metadata keys: the config, the data, the backend (`backend.describe`)."""
  return {
      "completed": False, "trajectory_bytes": None,
      "config": config_lib.to_dict(cfg), "data_files": corpus.files,
      "data_manifest": None if corpus.default is None else corpus.default.manifest,
      **backend.describe(), "gemm_path": backend.gemm_path(cfg.model.gemm_operands),
      "nll_block_rows": tied_nll.resolve_block_rows(cfg.model.nll_block_rows,
                                                    jax.default_backend()),
      "jaxlib_version": jax.lib.__version__,
      "python": platform.python_version(), "wall_time_s": None,
  }
