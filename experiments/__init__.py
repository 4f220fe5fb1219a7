"""One small config per experiment: `experiments/<name>.py` defines `config()`.

An experiment with a verification mode (thimble9: its first 1000 steps against
Thimble 8, bit for bit) also defines `verification() -> jaxdt.verify.Verification`.
"""

import importlib

# Studies: `experiments/<name>.py` defines `study() -> jaxdt.study.Study` (run.py --study).
STUDIES = ("findings",)

NAMES = ("crucible1", "crucible3", "crucible4", "thimble1", "thimble6", "thimble8", "thimble9",
         "lr_wd", "master_weights", "data_order")


def _module(name: str):
  if name not in NAMES:
    raise ValueError(f"unknown experiment {name!r}; use one of {sorted(NAMES)}")
  return importlib.import_module(f"experiments.{name}")


def load(name: str):
  """The ExperimentConfig of experiment `name`."""
  return _module(name).config()


def verification(name: str):
  """The Verification of experiment `name`; ValueError if it has none."""
  module = _module(name)
  if not hasattr(module, "verification"):
    having = [n for n in NAMES if hasattr(_module(n), "verification")]
    raise ValueError(f"experiment {name!r} has no verification mode; --verification works "
                     f"with {having}")
  return module.verification()


def load_study(name: str):
  """The Study declared by `experiments/<name>.py`."""
  if name not in STUDIES:
    raise ValueError(f"unknown study {name!r}; use --study=one of {list(STUDIES)}")
  return importlib.import_module(f"experiments.{name}").study()
