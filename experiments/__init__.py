"""One small config per experiment: `experiments/<name>.py` defines `config()`."""

import importlib

NAMES = ("crucible1",)


def load(name: str):
  """The ExperimentConfig of experiment `name`."""
  if name not in NAMES:
    raise ValueError(f"unknown experiment {name!r}; use one of {sorted(NAMES)}")
  return importlib.import_module(f"experiments.{name}").config()
