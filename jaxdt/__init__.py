"""jaxdt: dead-token dynamics in bf16, reimplemented functionally in JAX.

The public API (everything else is reachable through the subpackages):

  train(cfg, out_dir)          run an experiment into a run folder
  ExperimentConfig, ModelConfig, OptimConfig, DataConfig, ProbeConfig, StoreConfig
  load_corpus(data_cfg, V)     the lab's three files (or the embedded default)
  adamw(lr, ...)               the torch-exact AdamW as an optax transformation
  analyze(path), compare(a, b) the printed analyses, summary.json and plots

Packages, by where they run (docs/architecture.md):
  inside `jit`:  model, optim, training (probes, step), data.sampler
  host side:     io (files, run folders), analysis, report, data (loading)
  both:          numerics, config

Names resolve on first use, so `import jaxdt.io.rundir` (say) does not
import the training side.
"""

import importlib

from jaxdt.numerics import backend as _backend

if not _backend.backends_initialized():  # the run's XLA flags, before JAX starts a backend
  _backend.configure()

_EXPORTS = {
    "train": ("jaxdt.training.loop", "train"),
    "ExperimentConfig": ("jaxdt.config", "ExperimentConfig"),
    "ModelConfig": ("jaxdt.config", "ModelConfig"),
    "OptimConfig": ("jaxdt.config", "OptimConfig"),
    "DataConfig": ("jaxdt.config", "DataConfig"),
    "ProbeConfig": ("jaxdt.config", "ProbeConfig"),
    "StoreConfig": ("jaxdt.config", "StoreConfig"),
    "load_corpus": ("jaxdt.data.corpus", "load_corpus"),
    "adamw": ("jaxdt.optim.adamw", "adamw"),
    "analyze": ("jaxdt.report.outputs", "analyze"),
    "compare": ("jaxdt.report.outputs", "compare"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jaxdt' has no attribute {name!r}")
  module, attr = _EXPORTS[name]
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
