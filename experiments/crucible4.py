"""Crucible 4 (docs/experiments.md): Crucible 3 run for 5000 steps.

Its first 500 steps are bitwise Crucible 3's (the lab's verify_reproducibility,
docs/definitions.md §Reproducibility). W over all rows [5001, 10000, 64], h_mean [5000, 64], loss.
`verification()` repeats that check: `run.py --experiment=crucible4
--verification --verify_against=.../crucible_3_trajectory.safetensors`.
"""

import dataclasses

from experiments import crucible3

from jaxdt.config import ExperimentConfig
from jaxdt.verify import Verification


def config() -> ExperimentConfig:
  base = crucible3.config()
  return dataclasses.replace(
      base, name="crucible4", steps=5000,
      store=dataclasses.replace(
          base.store, trajectory_name="crucible_4_trajectory.safetensors",
          # The lab's checkpoints are not recorded; these exist only for --resume.
          checkpoint_steps=(1000, 2000, 3000, 4000), experiment_title="Crucible 4"))


def verification() -> Verification:
  """The lab's verify_reproducibility (docs/definitions.md §Reproducibility): 500 steps against Crucible 3."""
  return Verification(steps=500, checkpoint_steps=(), keys=("W", "h_mean", "loss"),
                      title="Crucible 4", reference_title="Crucible 3")
