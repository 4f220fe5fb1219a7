"""Crucible 3 (docs/experiments.md): Crucible 1's training, 500 steps, every row + h_mean.

W (uint16 bits) over all 10,000 rows [501, 10000, 64], h_mean f32 [500, 64]
(h_mean[t-1] is the mean post-ln_f hidden state of step t's forward over all
B x L positions), loss [501] and the dead mask and ids. The lab notebook is
not among the lab's notebooks; loss[0] = NaN as in Crucible 1.
"""

import dataclasses

from experiments import crucible1

from jaxdt.config import ExperimentConfig, ProbeConfig


def config() -> ExperimentConfig:
  base = crucible1.config()
  return dataclasses.replace(
      base, name="crucible3", steps=500,
      probes=ProbeConfig(names=("W", "h_mean", "loss"), rows="all", loss_initial=None),
      store=dataclasses.replace(
          base.store, trajectory_name="crucible_3_trajectory.safetensors",
          checkpoint_steps=(), experiment_title="Crucible 3",
          notes="All tokens + h_mean."))
